# Shared by the pipeline submit scripts (mixupoe_pipeline.sh, cmg_pipeline.sh), sourced on the login
# node after they have checked their inputs; they set PIPELINE (the job and run name prefix),
# PIPELINE_TITLE, PRESET, DRY_RUN, SEED_LIST, METHOD_LIST, EXTRA_SBATCH and die() first.
# Resolves ROOT, PIPELINE_DIR, DISTTRAIN, SBATCH; cds to ROOT; defines submit / sq / show / join;
# cancels what was submitted if the script fails; opens the MLflow parent run (PARENT).
# shellcheck shell=bash disable=SC2034

# ----------------------------------------------------------------- tools, places
ROOT="${DISTTRAIN_ROOT:-$(dirname "${BASH_SOURCE[0]}")/..}"
[ -f "$ROOT/slurm/common.sh" ] || die "no slurm/common.sh in '$ROOT': set DISTTRAIN_ROOT=/path/to/disttrain"
ROOT="$(cd "$ROOT" && pwd -P)"  # as slurm/common.sh resolves it

PIPELINE_DIR="${PIPELINE_DIR:-$ROOT/runs/pipeline/$PIPELINE-$PRESET-$(date +%Y%m%d-%H%M%S)}"
case "$PIPELINE_DIR" in
    /*) ;;
    *) PIPELINE_DIR="$PWD/$PIPELINE_DIR" ;;
esac
case "$PIPELINE_DIR" in
    *,*) die "PIPELINE_DIR '$PIPELINE_DIR' contains a comma, which sbatch --export cannot carry" ;;
esac

DISTTRAIN="${DISTTRAIN:-}"
SBATCH="${SBATCH:-sbatch}"
if [ "$DRY_RUN" = 0 ]; then
    if [ -z "$DISTTRAIN" ]; then
        if [ -x "$ROOT/.venv/bin/disttrain" ]; then
            DISTTRAIN="$ROOT/.venv/bin/disttrain"
        else
            DISTTRAIN="$(command -v disttrain)" ||
                die "'disttrain' not found: no $ROOT/.venv/bin/disttrain and none on PATH (make venv, or set DISTTRAIN=)"
        fi
    fi
    [ -x "$DISTTRAIN" ] || die "DISTTRAIN=$DISTTRAIN is not an executable"
    command -v "$SBATCH" >/dev/null 2>&1 || die "'$SBATCH' not found: run this on a Slurm login node (or set SBATCH=)"
fi

# The stages, the parent run and the closing job all use the store of the repository's
# directory (unless MLFLOW_TRACKING_URI says otherwise): work from there.
cd "$ROOT" || die "cannot enter $ROOT"

# ----------------------------------------------------------------- submission
JOB_IDS=()      # every submitted job, in order
JOB=""          # the id of the last submission
PARENT=""

abort() {
    local status=$?
    trap - EXIT
    [ "$status" -eq 0 ] && return 0
    if [ "$DRY_RUN" = 0 ] && [ "${#JOB_IDS[@]}" -gt 0 ]; then
        echo "${PIPELINE}_pipeline: submission failed; cancelling the ${#JOB_IDS[@]} job(s) already submitted: ${JOB_IDS[*]}" >&2
        scancel "${JOB_IDS[@]}" >&2 || true
    fi
    if [ "$DRY_RUN" = 0 ] && [ -n "$PARENT" ]; then
        "$DISTTRAIN" pipeline end "$PARENT" --status FAILED >&2 || true
    fi
    exit "$status"
}
trap abort EXIT

# submit NAME RUN_DIR DEPENDENCY ENV SBATCH_OPTION... -- COMMAND...
# sbatch with the common options; NAME labels the job (and its placeholder id in a dry run),
# ENV is extra VAR=value,... for --export.  Sets JOB.
submit() {
    local name="$1" run_dir="$2" dependency="$3" env="$4"
    shift 4
    local -a options=()
    while [ "$1" != -- ]; do
        options+=("$1")
        shift
    done
    shift
    local export="ALL,DISTTRAIN_ROOT=$ROOT,DISTTRAIN_PARENT_RUN_ID=${PARENT:-<parent-run-id>}"
    if [ -n "$run_dir" ]; then export+=",RUN_DIR=$run_dir"; fi
    if [ -n "$env" ]; then export+=",$env"; fi
    local -a cmd=("$SBATCH" --parsable --job-name="$PIPELINE-$PRESET-$name"
        --output="$PIPELINE_DIR/logs/%x-%j.out" --export="$export")
    if [ -n "$dependency" ]; then cmd+=(--dependency="$dependency"); fi
    cmd+=("${options[@]}" "${EXTRA_SBATCH[@]}" "$@")

    if [ "$DRY_RUN" = 1 ]; then
        JOB="<$name>"
        show "${cmd[@]}"
    else
        local out
        out="$("${cmd[@]}")" || die "sbatch failed for $name"
        JOB="${out%%;*}"
        case "$JOB" in '' | *[!0-9]*) die "sbatch printed '$out' for $name, not a job id" ;; esac
        printf '%s\t%s\t%s\t%s\n' "$JOB" "$name" "${run_dir:--}" "${dependency:--}" >>"$PIPELINE_DIR/jobs.tsv"
        printf '  %-8s %-32s %s\n' "$JOB" "$name" "${dependency:+($dependency)}"
    fi
    JOB_IDS+=("$JOB")
}

# sq WORD: WORD in single quotes, for sh
sq() {
    local q="'\\''"
    printf "'%s'" "${1//\'/$q}"
}

# show WORD...: the command line, quoting only the words that need it (placeholders stay readable)
show() {
    local word line=""
    for word in "$@"; do
        if [[ "$word" =~ ^[][A-Za-z0-9_./:=,@%+\<\>-]+$ ]]; then
            line+="$word "
        else
            line+="$(sq "$word") "
        fi
    done
    printf '%s\n' "${line% }"
}

join() {
    local IFS="$1"
    shift
    printf '%s' "$*"
}

if [ "$DRY_RUN" = 1 ]; then
    echo "# dry run: nothing is submitted, no MLflow run is created"
else
    mkdir -p "$PIPELINE_DIR/logs"
    : >"$PIPELINE_DIR/jobs.tsv"
    PARENT="$("$DISTTRAIN" pipeline start "$PIPELINE-$PRESET" | tail -n 1)" ||
        die "'$DISTTRAIN pipeline start $PIPELINE-$PRESET' failed (MLflow store: ${MLFLOW_TRACKING_URI:-$ROOT/mlflow.db})"
    [[ "$PARENT" =~ ^[0-9a-f]{32}$ ]] || die "'$DISTTRAIN pipeline start' printed '$PARENT', not an MLflow run id"
    printf '%s\n' "$PARENT" >"$PIPELINE_DIR/parent_run_id"
    echo "submitting the $PIPELINE_TITLE pipeline (preset $PRESET, seeds ${SEED_LIST[*]}, methods ${METHOD_LIST[*]}):"
fi

