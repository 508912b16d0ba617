#!/bin/bash
# Submit the whole MixupOE pipeline (mixupoe.txt; docs: DESIGN.md "Pipelines") as a chain of
# Slurm jobs, one MLflow parent run over all of it.  Run on the login node with plain bash, not sbatch:
#
#   bash slurm/mixupoe_pipeline.sh PRESET DATA_ROOT OUTLIER_POOL OOD_SET [OOD_SET ...]
#   bash slurm/mixupoe_pipeline.sh bird /data/shards/cub /data/shards/webvision-bird \
#       /data/places365 /data/dtd/images noise:gaussian
#   SEEDS=0 METHODS=mixup_oe EVAL_PRESET=debug NPROC_PER_NODE=2 SBATCH_ARGS="--gpus-per-node=0 --cpus-per-task=2" \
#       bash slurm/mixupoe_pipeline.sh debug demo_data demo_data/outliers demo_data/far_ood
#
# For every seed S of SEEDS, with P = PRESET:
#   seed-S/standard              recipes/train_classifier.py --preset P data.root=DATA_ROOT runtime.seed=S
#   seed-S/finetune-M            recipes/finetune_oe.py --preset P method=M standard=seed-S/standard
#                                  data.root=DATA_ROOT outliers.root=OUTLIER_POOL runtime.seed=S   (afterok standard)
#   seed-S/evaluate-standard     recipes/evaluate.py --preset EVAL_PRESET model=... id=DATA_ROOT/test
#   seed-S/evaluate-M              fit=DATA_ROOT/train ood=[DATA_ROOT/holdout,OOD_SET,...]
#                                  interpolate=[0.5,0.6,0.7] interpolate_with=INTERPOLATE_WITH runtime.seed=S
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
#   METHODS="oe energy_oe mixup_oe"   finetune_oe methods
#   EVAL_PRESET=mixupoe          evaluate preset (the paper's scorers and base rate)
#   INTERPOLATE_WITH=SET         OOD set mixed into ID images for interpolate=[...] (default: the last OOD_SET)
#   TRAIN_ARGS / FINETUNE_ARGS / EVALUATE_ARGS / REPORT_ARGS
#                                extra key=value words for every job of that stage (they come last: they win)
#   SBATCH_ARGS="..."            extra sbatch options for every job, e.g. "--partition=gpu --account=X", or
#                                "--gpus-per-node=0 --cpus-per-task=2" on CPUs (not --export: it is set here)
#   NPROC_PER_NODE=N             processes per node of every stage but the report (default: the node's GPUs)
#   PIPELINE_DIR=DIR             default runs/pipeline/mixupoe-PRESET-<date>
#   MLFLOW_TRACKING_URI=URI      the MLflow store of the parent run and every stage (default: the repository's
#                                mlflow.db); exported to the jobs like the rest of this environment
#   DRY_RUN=1                    print the sbatch commands (placeholder job ids), submit nothing, no MLflow run
#   DISTTRAIN_ROOT=DIR           repository (default: the one holding this script)
#   DISTTRAIN=/p/disttrain, SBATCH=/p/sbatch   the CLIs (default: DISTTRAIN_ROOT/.venv/bin/disttrain or PATH)
# Relative paths in the arguments are taken from the current directory.

set -euo pipefail

usage() {
    cat >&2 <<EOF
usage: bash slurm/mixupoe_pipeline.sh PRESET DATA_ROOT OUTLIER_POOL OOD_SET [OOD_SET ...]
  e.g. bash slurm/mixupoe_pipeline.sh bird /data/shards/cub /data/shards/webvision-bird /data/places365
  DATA_ROOT holds the shard splits train/ test/ holdout/; OUTLIER_POOL is a shard split; the
  environment knobs (SEEDS, METHODS, SBATCH_ARGS, DRY_RUN=1, ...): bash slurm/mixupoe_pipeline.sh --help
EOF
}
PIPELINE=mixupoe PIPELINE_TITLE=MixupOE
# shellcheck source=slurm/pipeline_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/pipeline_lib.sh"

# ----------------------------------------------------------------- inputs
pipeline_args 4 "PRESET DATA_ROOT OUTLIER_POOL and at least one OOD_SET" "$@"
PRESET="$1" OUTLIER_POOL="$3"
data_root "$2" train test holdout
shift 3
is_split "$OUTLIER_POOL" ||
    die "OUTLIER_POOL '$OUTLIER_POOL' is not a shard split (a folder with manifest.json)"
OUTLIER_POOL="$(abspath "$OUTLIER_POOL")"
add_ood_sets "$DATA_ROOT/holdout" "$@"
INTERPOLATE_WITH="$(resolve_set "${INTERPOLATE_WITH:-${*: -1}}")" || exit 2
found=""
for spec in "${OOD_SETS[@]}"; do
    if [ "$spec" = "$INTERPOLATE_WITH" ]; then found=1; fi
done
[ -n "$found" ] || die "INTERPOLATE_WITH=$INTERPOLATE_WITH is not one of the OOD sets: ${OOD_SETS[*]}"
pipeline_knobs "oe energy_oe mixup_oe" mixupoe

# ----------------------------------------------------------------- the jobs
start_pipeline
for seed in "${SEED_LIST[@]}"; do
    dir="$PIPELINE_DIR/seed-$seed"
    submit "s$seed-standard" "$dir/standard" "" "$NPROC_ENV" -- "$ROOT/slurm/train_classifier.sh" \
        --preset "$PRESET" "data.root=$DATA_ROOT" "runtime.seed=$seed" "${TRAIN_EXTRA[@]}"
    standard_job="$JOB"
    MODELS=("standard=$standard_job")
    for method in "${METHOD_LIST[@]}"; do
        submit "s$seed-finetune-$method" "$dir/finetune-$method" "afterok:$standard_job" "$NPROC_ENV" \
            --kill-on-invalid-dep=yes -- "$ROOT/slurm/finetune_oe.sh" \
            --preset "$PRESET" "method=$method" "standard=$dir/standard" "data.root=$DATA_ROOT" \
            "outliers.root=$OUTLIER_POOL" "runtime.seed=$seed" "${FINETUNE_EXTRA[@]}"
        MODELS+=("finetune-$method=$JOB")
    done
    submit_evaluations "$seed" "$dir" "interpolate=[0.5,0.6,0.7]" "interpolate_with=$INTERPOLATE_WITH"
done

finish_pipeline
