# Shared by the pipeline submit scripts (mixupoe_pipeline.sh, cmg_pipeline.sh), sourced on the login
# node right after `set -euo pipefail`, with PIPELINE (the job and run name prefix), PIPELINE_TITLE and
# usage() set.  A pipeline script then:
#   pipeline_args MIN "WHAT" "$@"        --help, or at least MIN arguments (else usage + error naming WHAT)
#   data_root DIR SPLIT...               DATA_ROOT, made absolute, holding those shard splits
#   add_ood_sets SPEC...                 OOD_SETS += folders (made absolute) or specs such as noise:gaussian
#   pipeline_knobs "M1 M2" EVAL_PRESET   SEED_LIST, METHOD_LIST (one of M1 M2), EXTRA_SBATCH, TRAIN_EXTRA,
#                                        FINETUNE_EXTRA, EVALUATE_EXTRA, REPORT_EXTRA, EVAL_PRESET, DRY_RUN
#   start_pipeline                       ROOT, PIPELINE_DIR, DISTTRAIN, SBATCH; cds to ROOT; the MLflow
#                                        parent run (PARENT); cancels what was submitted if the script fails
#   submit ... / submit_evaluations ...  the jobs (below; MODELS=(NAME=JOB ...) names a seed's models)
#   finish_pipeline                      the report, the closing job, the summary
# shellcheck shell=bash disable=SC2034

die() {
    printf '%s_pipeline: error: %s\n' "$PIPELINE" "$*" >&2
    exit 2
}

# ----------------------------------------------------------------- inputs
pipeline_args() {
    local min="$1" what="$2"
    shift 2
    if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then
        sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[${#BASH_SOURCE[@]} - 1]}"  # the pipeline script's header
        exit 0
    fi
    if [ "$#" -lt "$min" ]; then
        usage
        die "expected $what, got $# argument(s)"
    fi
    [ -n "$1" ] || die "PRESET is empty"
}

OOD_SETS=()

is_split() { [ -f "$1/manifest.json" ]; }
abspath() { (cd "$1" && pwd); }

data_root() {
    local split missing=()
    [ -d "$1" ] || die "DATA_ROOT '$1' is not a directory"
    DATA_ROOT="$(abspath "$1")"
    shift
    for split in "$@"; do
        is_split "$DATA_ROOT/$split" || missing+=("$split")
    done
    [ "${#missing[@]}" -eq 0 ] ||
        die "DATA_ROOT $DATA_ROOT has no shard split(s) ${missing[*]} (each a folder with manifest.json;" \
            "build them with 'disttrain shards build ...')"
}

# resolve_set SPEC: a folder, made absolute (the jobs run from the repository), or a spec such as noise:gaussian
resolve_set() {
    case "$1" in
        *:*) printf '%s\n' "$1" ;;
        *) [ -d "$1" ] || die "OOD set '$1' is not a directory (nor a spec such as noise:gaussian)"
           abspath "$1" ;;
    esac
}

add_ood_sets() {
    local spec
    for spec in "$@"; do
        spec="$(resolve_set "$spec")" || exit 2
        OOD_SETS+=("$spec")
    done
}

pipeline_knobs() {
    local methods="$1" seed method
    read -r -a SEED_LIST <<<"${SEEDS:-0 1 2 3 4}"
    read -r -a METHOD_LIST <<<"${METHODS:-$methods}"
    read -r -a EXTRA_SBATCH <<<"${SBATCH_ARGS:-}"
    read -r -a TRAIN_EXTRA <<<"${TRAIN_ARGS:-}"
    read -r -a FINETUNE_EXTRA <<<"${FINETUNE_ARGS:-}"
    read -r -a EVALUATE_EXTRA <<<"${EVALUATE_ARGS:-}"
    read -r -a REPORT_EXTRA <<<"${REPORT_ARGS:-}"
    EVAL_PRESET="${EVAL_PRESET:-$2}"
    [ "${#SEED_LIST[@]}" -gt 0 ] || die "SEEDS is empty"
    for seed in "${SEED_LIST[@]}"; do
        case "$seed" in '' | *[!0-9]*) die "SEEDS: '$seed' is not a non-negative integer" ;; esac
    done
    [ "${#METHOD_LIST[@]}" -gt 0 ] || die "METHODS is empty (${methods// /, })"
    for method in "${METHOD_LIST[@]}"; do
        case " $methods " in
            *" $method "*) ;;
            *) die "METHODS: unknown method '$method' (${methods// /, })" ;;
        esac
    done
    DRY_RUN="${DRY_RUN:-0}"
    [ "$DRY_RUN" = 0 ] || [ "$DRY_RUN" = 1 ] || die "DRY_RUN must be 0 or 1"
}

# ----------------------------------------------------------------- tools, places, the parent run
JOB_IDS=()        # every submitted job, in order
JOB=""            # the id of the last submission
PARENT=""
MODELS=()         # a seed's models to evaluate, NAME=JOB (run dir SEED_DIR/NAME)
EVALUATIONS=()    # evaluate run dirs, for the report
EVALUATE_JOBS=()

start_pipeline() {
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
    NPROC_ENV="${NPROC_PER_NODE:+NPROC_PER_NODE=$NPROC_PER_NODE}"
    OOD_LIST="[$(join , "${OOD_SETS[@]}")]"

    # The stages, the parent run and the closing job all use the store of the repository's
    # directory (unless MLFLOW_TRACKING_URI says otherwise): work from there.
    cd "$ROOT" || die "cannot enter $ROOT"
    trap abort EXIT

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
}

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

# ----------------------------------------------------------------- submission
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

# submit_evaluations SEED SEED_DIR [EVALUATE_ARG...]
# One evaluate job per entry MODEL=JOB of MODELS: the model run dir SEED_DIR/MODEL, after the job that
# made it, on the ID test set and OOD_LIST (run dir evaluate-<MODEL without finetune->); adds them to
# EVALUATIONS / EVALUATE_JOBS.
submit_evaluations() {
    local seed="$1" dir="$2" entry model label
    shift 2
    for entry in "${MODELS[@]}"; do
        model="${entry%%=*}"
        label="${model#finetune-}"
        submit "s$seed-evaluate-$label" "$dir/evaluate-$label" "afterok:${entry#*=}" "$NPROC_ENV" \
            --kill-on-invalid-dep=yes -- "$ROOT/slurm/evaluate.sh" \
            --preset "$EVAL_PRESET" "model=$dir/$model" "id=$DATA_ROOT/test" "fit=$DATA_ROOT/train" \
            "ood=$OOD_LIST" "$@" "runtime.seed=$seed" "${EVALUATE_EXTRA[@]}"
        EVALUATIONS+=("$dir/evaluate-$label")
        EVALUATE_JOBS+=("$JOB")
    done
}

# finish_pipeline: the report over every evaluation, the job that closes the parent run, the summary
finish_pipeline() {
    submit report "$PIPELINE_DIR/report" "afterok:$(join : "${EVALUATE_JOBS[@]}")" "NPROC_PER_NODE=1" \
        --kill-on-invalid-dep=yes -- "$ROOT/slurm/report.sh" \
        "evaluations=[$(join , "${EVALUATIONS[@]}")]" "${REPORT_EXTRA[@]}"

    # Close the parent run once every job has ended, whatever happened (a job whose dependency failed
    # is cancelled, so this always runs): FINISHED when the report finished.
    local parent="${PARENT:-<parent-run-id>}" end_cmd ui
    end_cmd="if grep -qs '\"state\": *\"finished\"' $(sq "$PIPELINE_DIR/report/status.json");"
    end_cmd+=" then s=FINISHED; else s=FAILED; fi; echo \"pipeline $parent: \$s\";"
    end_cmd+=" exec $(sq "${DISTTRAIN:-disttrain}") pipeline end $(sq "$parent") --status \"\$s\""
    submit end "" "afterany:$(join : "${JOB_IDS[@]}")" "" \
        --chdir="$ROOT" --nodes=1 --ntasks=1 --time=0:15:00 -- --wrap="$end_cmd"

    trap - EXIT
    [ "$DRY_RUN" = 1 ] && return 0

    local uri="${MLFLOW_TRACKING_URI:-sqlite:///$ROOT/mlflow.db}"
    case "$uri" in
        sqlite:* | file:* | /*) ui="mlflow ui --backend-store-uri $uri" ;;
        *) ui="open $uri" ;;
    esac
    cat <<EOF
submitted ${#JOB_IDS[@]} jobs: ${JOB_IDS[*]}
pipeline dir:      $PIPELINE_DIR   (run dirs; jobs.tsv; logs/)
MLflow parent run: $PARENT   (experiment disttrain, run $PIPELINE-$PRESET)
follow:            squeue -j $(join , "${JOB_IDS[@]}") -o '%.10i %.34j %.10T %.10M %R'
                   tail -f $PIPELINE_DIR/logs/*.out
                   $ui
cancel:            scancel ${JOB_IDS[*]}
EOF
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
