#!/bin/bash
#SBATCH --job-name=train_cvae
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@90
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=runs/slurm/%x-%j.out
#
# CMG stage 1's generator: the conditional VAE with recipes/train_cvae.py (see
# slurm/train_classifier.sh for the options and environment variables; they are the same).
# It does not need the classifier: submit it next to slurm/train_classifier.sh, both run at once.
#   mkdir -p runs/slurm
#   sbatch slurm/train_cvae.sh --preset cifar10 data.root=/data/shards/cifar10-p1
#   RUN_DIR=runs/train_cvae/cifar10 sbatch slurm/train_cvae.sh --preset cifar10 data.root=/data/shards/cifar10-p1
# A pre-empted job is requeued and resumes from its newest checkpoint (same RUN_DIR).

_dt_common="${DISTTRAIN_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
if [ ! -f "$_dt_common" ]; then
    echo "error: cannot find the disttrain repository: no $_dt_common." \
        "Submit from the repository root or set DISTTRAIN_ROOT=/path/to/disttrain." >&2
    exit 2
fi
# shellcheck source=slurm/common.sh
source "$_dt_common"

run_stage train_cvae.py "$@"
exit $?
