#!/bin/bash
# Submit the whole CMG pipeline (cmg.txt; docs: DESIGN.md "Pipelines") as a chain of Slurm jobs,
# one MLflow parent run over all of it.  Run on the login node with plain bash, not sbatch:
#
#   bash slurm/cmg_pipeline.sh PRESET DATA_ROOT OOD_SET [OOD_SET ...]
#   bash slurm/cmg_pipeline.sh cifar10 /data/shards/cifar10-p1 /data/shards/cifar10-p1/holdout noise:gaussian
#   SEEDS=0 METHODS=cmg_energy EVAL_PRESET=debug NPROC_PER_NODE=2 SBATCH_ARGS="--gpus-per-node=0 --cpus-per-task=2" \
#       bash slurm/cmg_pipeline.sh debug demo_data demo_data/far_ood
#
# For every seed S of SEEDS, with P = PRESET:
#   seed-S/classifier            recipes/train_classifier.py --preset P data.root=DATA_ROOT runtime.seed=S
#   seed-S/cvae                  recipes/train_cvae.py --preset P data.root=DATA_ROOT runtime.seed=S
#                                  (stage 1: no dependency, runs at the same time as the classifier)
#   seed-S/synthesize            recipes/synthesize.py --preset P method=cmg cvae=seed-S/cvae
#                                  classifier=seed-S/classifier runtime.seed=S   (afterok classifier and cvae)
#   seed-S/finetune-M            recipes/finetune_head.py --preset P method=M classifier=seed-S/classifier
#                                  pseudo=seed-S/synthesize data.root=DATA_ROOT runtime.seed=S   (afterok synthesize)
#   seed-S/evaluate-classifier   recipes/evaluate.py --preset EVAL_PRESET model=... id=DATA_ROOT/test
#   seed-S/evaluate-M              fit=DATA_ROOT/train ood=[OOD_SET,...] runtime.seed=S
#                                  (afterok on the job that made the model)
# then
#   report                       recipes/report.py evaluations=[every evaluate run dir]   (afterok all evaluations)
#   pipeline end                 disttrain pipeline end PARENT --status FINISHED|FAILED   (afterany every job)
# Run dirs live under PIPELINE_DIR, job logs in PIPELINE_DIR/logs, the job list in PIPELINE_DIR/jobs.tsv.
# A job whose dependency failed is cancelled (--kill-on-invalid-dep=yes), so the pipeline always
# ends: the parent run is FINISHED when the report finished, FAILED otherwise.
#
# Environment:
#   SEEDS="0 1 2 3 4"            training seeds (the paper's 5 repeats)
#   METHODS="cmg_softmax cmg_energy"   finetune_head methods (stage 2)
#   EVAL_PRESET=cmg              evaluate preset (the paper's scorers)
#   TRAIN_ARGS / CVAE_ARGS / SYNTH_ARGS / FINETUNE_ARGS / EVALUATE_ARGS / REPORT_ARGS
#                                extra key=value words for every job of that stage (they come last: they win)
#   SBATCH_ARGS="..."            extra sbatch options for every job, e.g. "--partition=gpu --account=X", or
#                                "--gpus-per-node=0 --cpus-per-task=2" on CPUs (not --export: it is set here)
#   NPROC_PER_NODE=N             processes per node of every stage but the report (default: the node's GPUs)
#   PIPELINE_DIR=DIR             default runs/pipeline/cmg-PRESET-<date>
#   MLFLOW_TRACKING_URI=URI      the MLflow store of the parent run and every stage (default: the repository's
#                                mlflow.db); exported to the jobs like the rest of this environment
#   DRY_RUN=1                    print the sbatch commands (placeholder job ids), submit nothing, no MLflow run
#   DISTTRAIN_ROOT=DIR           repository (default: the one holding this script)
#   DISTTRAIN=/p/disttrain, SBATCH=/p/sbatch   the CLIs (default: DISTTRAIN_ROOT/.venv/bin/disttrain or PATH)
# Relative paths in the arguments are taken from the current directory.

set -euo pipefail

usage() {
    cat >&2 <<EOF
usage: bash slurm/cmg_pipeline.sh PRESET DATA_ROOT OOD_SET [OOD_SET ...]
  e.g. bash slurm/cmg_pipeline.sh cifar10 /data/shards/cifar10-p1 /data/shards/cifar10-p1/holdout
  DATA_ROOT holds the shard splits train/ test/; an OOD_SET is a folder or a spec such as
  noise:gaussian; the environment knobs (SEEDS, METHODS, SBATCH_ARGS, DRY_RUN=1, ...):
  bash slurm/cmg_pipeline.sh --help
EOF
}
die() {
    printf 'cmg_pipeline: error: %s\n' "$*" >&2
    exit 2
}

# ----------------------------------------------------------------- inputs
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then
    sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
    exit 0
fi
if [ "$#" -lt 3 ]; then
    usage
    die "expected PRESET DATA_ROOT and at least one OOD_SET, got $# argument(s)"
fi
PRESET="$1" DATA_ROOT="$2"
shift 2
[ -n "$PRESET" ] || die "PRESET is empty"

is_split() { [ -f "$1/manifest.json" ]; }
abspath() { (cd "$1" && pwd); }

[ -d "$DATA_ROOT" ] || die "DATA_ROOT '$DATA_ROOT' is not a directory"
DATA_ROOT="$(abspath "$DATA_ROOT")"
missing=()
for split in train test; do
    is_split "$DATA_ROOT/$split" || missing+=("$split")
done
[ "${#missing[@]}" -eq 0 ] ||
    die "DATA_ROOT $DATA_ROOT has no shard split(s) ${missing[*]} (each a folder with manifest.json;" \
        "build them with 'disttrain shards build ...')"

# OOD sets: folders (made absolute: the jobs run from the repository) or specs such as noise:gaussian
OOD_SETS=()
resolve_set() {
    case "$1" in
        *:*) printf '%s\n' "$1" ;;
        *) [ -d "$1" ] || die "OOD set '$1' is not a directory (nor a spec such as noise:gaussian)"
           abspath "$1" ;;
    esac
}
for spec in "$@"; do
    spec="$(resolve_set "$spec")" || exit 2
    OOD_SETS+=("$spec")
done

read -r -a SEED_LIST <<<"${SEEDS:-0 1 2 3 4}"
read -r -a METHOD_LIST <<<"${METHODS:-cmg_softmax cmg_energy}"
read -r -a EXTRA_SBATCH <<<"${SBATCH_ARGS:-}"
read -r -a TRAIN_EXTRA <<<"${TRAIN_ARGS:-}"
read -r -a CVAE_EXTRA <<<"${CVAE_ARGS:-}"
read -r -a SYNTH_EXTRA <<<"${SYNTH_ARGS:-}"
read -r -a FINETUNE_EXTRA <<<"${FINETUNE_ARGS:-}"
read -r -a EVALUATE_EXTRA <<<"${EVALUATE_ARGS:-}"
read -r -a REPORT_EXTRA <<<"${REPORT_ARGS:-}"
EVAL_PRESET="${EVAL_PRESET:-cmg}"
[ "${#SEED_LIST[@]}" -gt 0 ] || die "SEEDS is empty"
for seed in "${SEED_LIST[@]}"; do
    case "$seed" in '' | *[!0-9]*) die "SEEDS: '$seed' is not a non-negative integer" ;; esac
done
[ "${#METHOD_LIST[@]}" -gt 0 ] || die "METHODS is empty (cmg_softmax, cmg_energy)"
for method in "${METHOD_LIST[@]}"; do
    case "$method" in cmg_softmax | cmg_energy) ;; *) die "METHODS: unknown method '$method' (cmg_softmax, cmg_energy)" ;; esac
done
DRY_RUN="${DRY_RUN:-0}"
[ "$DRY_RUN" = 0 ] || [ "$DRY_RUN" = 1 ] || die "DRY_RUN must be 0 or 1"

# ----------------------------------------------------------------- tools, places
ROOT="${DISTTRAIN_ROOT:-$(dirname "${BASH_SOURCE[0]}")/..}"
[ -f "$ROOT/slurm/common.sh" ] || die "no slurm/common.sh in '$ROOT': set DISTTRAIN_ROOT=/path/to/disttrain"
ROOT="$(cd "$ROOT" && pwd -P)"  # as slurm/common.sh resolves it

PIPELINE_DIR="${PIPELINE_DIR:-$ROOT/runs/pipeline/cmg-$PRESET-$(date +%Y%m%d-%H%M%S)}"
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
cd "$ROOT"

# ----------------------------------------------------------------- submission
JOB_IDS=()      # every submitted job, in order
JOB=""          # the id of the last submission
PARENT=""

abort() {
    local status=$?
    trap - EXIT
    [ "$status" -eq 0 ] && return 0
    if [ "$DRY_RUN" = 0 ] && [ "${#JOB_IDS[@]}" -gt 0 ]; then
        echo "cmg_pipeline: submission failed; cancelling the ${#JOB_IDS[@]} job(s) already submitted: ${JOB_IDS[*]}" >&2
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
    local -a cmd=("$SBATCH" --parsable --job-name="cmg-$PRESET-$name"
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
    PARENT="$("$DISTTRAIN" pipeline start "cmg-$PRESET" | tail -n 1)" ||
        die "'$DISTTRAIN pipeline start cmg-$PRESET' failed (MLflow store: ${MLFLOW_TRACKING_URI:-$ROOT/mlflow.db})"
    [[ "$PARENT" =~ ^[0-9a-f]{32}$ ]] || die "'$DISTTRAIN pipeline start' printed '$PARENT', not an MLflow run id"
    printf '%s\n' "$PARENT" >"$PIPELINE_DIR/parent_run_id"
    echo "submitting the CMG pipeline (preset $PRESET, seeds ${SEED_LIST[*]}, methods ${METHOD_LIST[*]}):"
fi

NPROC_ENV="${NPROC_PER_NODE:+NPROC_PER_NODE=$NPROC_PER_NODE}"
OOD_LIST="[$(join , "${OOD_SETS[@]}")]"
EVALUATIONS=()
EVALUATE_JOBS=()
for seed in "${SEED_LIST[@]}"; do
    dir="$PIPELINE_DIR/seed-$seed"
    # stage 1: the classifier and the CVAE are independent, both start at once
    submit "s$seed-classifier" "$dir/classifier" "" "$NPROC_ENV" -- "$ROOT/slurm/train_classifier.sh" \
        --preset "$PRESET" "data.root=$DATA_ROOT" "runtime.seed=$seed" "${TRAIN_EXTRA[@]}"
    classifier_job="$JOB"
    submit "s$seed-cvae" "$dir/cvae" "" "$NPROC_ENV" -- "$ROOT/slurm/train_cvae.sh" \
        --preset "$PRESET" "data.root=$DATA_ROOT" "runtime.seed=$seed" "${CVAE_EXTRA[@]}"
    cvae_job="$JOB"
    submit "s$seed-synthesize" "$dir/synthesize" "afterok:$classifier_job:$cvae_job" "$NPROC_ENV" \
        --kill-on-invalid-dep=yes -- "$ROOT/slurm/synthesize.sh" \
        --preset "$PRESET" "method=cmg" "cvae=$dir/cvae" "classifier=$dir/classifier" \
        "runtime.seed=$seed" "${SYNTH_EXTRA[@]}"
    synthesize_job="$JOB"
    # stage 2: the classifier's last layer on ID + pseudo-OOD data, one run per method
    models=("classifier=$classifier_job")
    for method in "${METHOD_LIST[@]}"; do
        submit "s$seed-finetune-$method" "$dir/finetune-$method" "afterok:$synthesize_job" "$NPROC_ENV" \
            --kill-on-invalid-dep=yes -- "$ROOT/slurm/finetune_head.sh" \
            --preset "$PRESET" "method=$method" "classifier=$dir/classifier" "pseudo=$dir/synthesize" \
            "data.root=$DATA_ROOT" "runtime.seed=$seed" "${FINETUNE_EXTRA[@]}"
        models+=("finetune-$method=$JOB")
    done
    for entry in "${models[@]}"; do
        model="${entry%%=*}" model_job="${entry#*=}"
        label="${model#finetune-}"
        submit "s$seed-evaluate-$label" "$dir/evaluate-$label" "afterok:$model_job" "$NPROC_ENV" \
            --kill-on-invalid-dep=yes -- "$ROOT/slurm/evaluate.sh" \
            --preset "$EVAL_PRESET" "model=$dir/$model" "id=$DATA_ROOT/test" "fit=$DATA_ROOT/train" \
            "ood=$OOD_LIST" "runtime.seed=$seed" "${EVALUATE_EXTRA[@]}"
        EVALUATIONS+=("$dir/evaluate-$label")
        EVALUATE_JOBS+=("$JOB")
    done
done

submit report "$PIPELINE_DIR/report" "afterok:$(join : "${EVALUATE_JOBS[@]}")" "NPROC_PER_NODE=1" \
    --kill-on-invalid-dep=yes -- "$ROOT/slurm/report.sh" \
    "evaluations=[$(join , "${EVALUATIONS[@]}")]" "${REPORT_EXTRA[@]}"

# Close the parent run once every job has ended, whatever happened (a job whose dependency failed
# is cancelled, so this always runs): FINISHED when the report finished.
parent="${PARENT:-<parent-run-id>}"
end_cmd="if grep -qs '\"state\": *\"finished\"' $(sq "$PIPELINE_DIR/report/status.json");"
end_cmd+=" then s=FINISHED; else s=FAILED; fi; echo \"pipeline $parent: \$s\";"
end_cmd+=" exec $(sq "${DISTTRAIN:-disttrain}") pipeline end $(sq "$parent") --status \"\$s\""
submit end "" "afterany:$(join : "${JOB_IDS[@]}")" "" \
    --chdir="$ROOT" --nodes=1 --ntasks=1 --time=0:15:00 -- --wrap="$end_cmd"

trap - EXIT
[ "$DRY_RUN" = 1 ] && exit 0

uri="${MLFLOW_TRACKING_URI:-sqlite:///$ROOT/mlflow.db}"
case "$uri" in
    sqlite:* | file:* | /*) ui="mlflow ui --backend-store-uri $uri" ;;
    *) ui="open $uri" ;;
esac
cat <<EOF
submitted ${#JOB_IDS[@]} jobs: ${JOB_IDS[*]}
pipeline dir:      $PIPELINE_DIR   (run dirs; jobs.tsv; logs/)
MLflow parent run: $PARENT   (experiment disttrain, run cmg-$PRESET)
follow:            squeue -j $(join , "${JOB_IDS[@]}") -o '%.10i %.34j %.10T %.10M %R'
                   tail -f $PIPELINE_DIR/logs/*.out
                   $ui
cancel:            scancel ${JOB_IDS[*]}
EOF
