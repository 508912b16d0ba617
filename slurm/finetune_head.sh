#!/bin/bash
#SBATCH --job-name=finetune_head
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=4:00:00
#SBATCH --signal=B:USR1@90
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=runs/slurm/%x-%j.out
#
# CMG stage 2: fine-tune a trained classifier's last layer on ID + pseudo-OOD data with
# recipes/finetune_head.py (see slurm/train_classifier.sh for the options and environment
# variables; they are the same).
#   mkdir -p runs/slurm
#   sbatch slurm/finetune_head.sh --preset cifar10 method=cmg_energy classifier=runs/train_classifier/cifar10 \
#       pseudo=runs/synthesize/cifar10 data.root=/data/shards/cifar10-p1
#   sbatch slurm/finetune_head.sh --preset cifar10 method=cmg_softmax classifier=... pseudo=... data.root=...
# A pre-empted job is requeued and resumes from its newest checkpoint (same RUN_DIR).

_dt_common="${DISTTRAIN_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
if [ ! -f "$_dt_common" ]; then
    echo "error: cannot find the disttrain repository: no $_dt_common." \
        "Submit from the repository root or set DISTTRAIN_ROOT=/path/to/disttrain." >&2
    exit 2
fi
# shellcheck source=slurm/common.sh
source "$_dt_common"

run_stage finetune_head.py "$@"
exit $?
