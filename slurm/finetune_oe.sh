#!/bin/bash
#SBATCH --job-name=finetune_oe
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@90
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=runs/slurm/%x-%j.out
#
# Outlier-exposure fine-tuning with recipes/finetune_oe.py (see slurm/train_classifier.sh for the
# options and environment variables; they are the same).
#   mkdir -p runs/slurm
#   sbatch slurm/finetune_oe.sh --preset bird method=mixup_oe standard=runs/train_classifier/bird \
#       data.root=/data/shards/cub outliers.root=/data/shards/webvision
#   sbatch slurm/finetune_oe.sh --preset debug method=oe standard=... data.root=demo_data outliers.root=demo_data/outliers
# A pre-empted job is requeued and resumes from its newest checkpoint (same RUN_DIR).

_dt_common="${DISTTRAIN_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
if [ ! -f "$_dt_common" ]; then
    echo "error: cannot find the disttrain repository: no $_dt_common." \
        "Submit from the repository root or set DISTTRAIN_ROOT=/path/to/disttrain." >&2
    exit 2
fi
# shellcheck source=slurm/common.sh
source "$_dt_common"

run_stage finetune_oe.py "$@"
exit $?
