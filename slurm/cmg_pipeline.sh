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
PIPELINE=cmg PIPELINE_TITLE=CMG
# shellcheck source=slurm/pipeline_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/pipeline_lib.sh"

# ----------------------------------------------------------------- inputs
pipeline_args 3 "PRESET DATA_ROOT and at least one OOD_SET" "$@"
PRESET="$1"
data_root "$2" train test
shift 2
add_ood_sets "$@"
pipeline_knobs "cmg_softmax cmg_energy" cmg
read -r -a CVAE_EXTRA <<<"${CVAE_ARGS:-}"
read -r -a SYNTH_EXTRA <<<"${SYNTH_ARGS:-}"

# ----------------------------------------------------------------- the jobs
start_pipeline
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
    MODELS=("classifier=$classifier_job")
    for method in "${METHOD_LIST[@]}"; do
        submit "s$seed-finetune-$method" "$dir/finetune-$method" "afterok:$synthesize_job" "$NPROC_ENV" \
            --kill-on-invalid-dep=yes -- "$ROOT/slurm/finetune_head.sh" \
            --preset "$PRESET" "method=$method" "classifier=$dir/classifier" "pseudo=$dir/synthesize" \
            "data.root=$DATA_ROOT" "runtime.seed=$seed" "${FINETUNE_EXTRA[@]}"
        MODELS+=("finetune-$method=$JOB")
    done
    submit_evaluations "$seed" "$dir"
done

finish_pipeline
