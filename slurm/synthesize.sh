#!/bin/bash
#SBATCH --job-name=synthesize
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=2:00:00
#SBATCH --signal=B:USR1@90
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=runs/slurm/%x-%j.out
#
# CMG's pseudo-OOD images with recipes/synthesize.py: a finished CVAE (slurm/train_cvae.sh)
# decodes class-mixed conditions into shards (RUN_DIR/pseudo_ood/) for slurm/finetune_head.sh.
# Every rank (every process of every node) generates its share and writes its own shards.
# See slurm/train_classifier.sh for the options and environment variables; they are the same.
#   mkdir -p runs/slurm
#   sbatch slurm/synthesize.sh --preset cifar10 method=cmg cvae=runs/train_cvae/cifar10 \
#       classifier=runs/train_classifier/cifar10
# Synthesis keeps no checkpoint: a pre-empted job is requeued and synthesizes again.

_dt_common="${DISTTRAIN_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
if [ ! -f "$_dt_common" ]; then
    echo "error: cannot find the disttrain repository: no $_dt_common." \
        "Submit from the repository root or set DISTTRAIN_ROOT=/path/to/disttrain." >&2
    exit 2
fi
# shellcheck source=slurm/common.sh
source "$_dt_common"

run_stage synthesize.py "$@"
exit $?
