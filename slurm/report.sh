#!/bin/bash
#SBATCH --job-name=report
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=0
#SBATCH --cpus-per-task=4
#SBATCH --time=1:00:00
#SBATCH --signal=B:USR1@90
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=runs/slurm/%x-%j.out
#
# The paper's tables and confidence densities with recipes/report.py from finished evaluate runs
# (see slurm/train_classifier.sh for the options and environment variables; they are the same).
# It reads tables and scores, no images: one CPU process is enough (NPROC_PER_NODE defaults to 1).
#   mkdir -p runs/slurm
#   sbatch slurm/report.sh evaluations=[runs/evaluate/bird-standard-s0,runs/evaluate/bird-mixup_oe-s0,...]
#   RUN_DIR=runs/report/bird sbatch slurm/report.sh evaluations=[...]
# A pre-empted job is requeued and writes the report again.

_dt_common="${DISTTRAIN_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
if [ ! -f "$_dt_common" ]; then
    echo "error: cannot find the disttrain repository: no $_dt_common." \
        "Submit from the repository root or set DISTTRAIN_ROOT=/path/to/disttrain." >&2
    exit 2
fi
# shellcheck source=slurm/common.sh
source "$_dt_common"

run_stage report.py "$@"
exit $?
