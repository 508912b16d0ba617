#!/bin/bash
#SBATCH --job-name=evaluate
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
# OOD evaluation with recipes/evaluate.py (see slurm/train_classifier.sh for the options
# and environment variables; they are the same).
#   mkdir -p runs/slurm
#   sbatch slurm/evaluate.sh --preset mixupoe model=runs/train_classifier/bird id=... fit=... ood=[...]
# Evaluation keeps no checkpoint: a pre-empted job is requeued and evaluates again.

_dt_common="${DISTTRAIN_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
if [ ! -f "$_dt_common" ]; then
    echo "error: cannot find the disttrain repository: no $_dt_common." \
        "Submit from the repository root or set DISTTRAIN_ROOT=/path/to/disttrain." >&2
    exit 2
fi
# shellcheck source=slurm/common.sh
source "$_dt_common"

run_stage evaluate.py "$@"
exit $?
