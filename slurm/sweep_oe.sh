#!/bin/bash
#SBATCH --job-name=sweep_oe
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@90
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=runs/slurm/%x-%j.out
#
# Hyper-parameter sweep of outlier exposure with recipes/sweep_oe.py (see slurm/train_classifier.sh
# for the options and environment variables; they are the same).  sweep_oe.py is a single-process
# driver: it runs here, on the batch host, and starts every trial's finetune_oe / evaluate with
#   launcher="disttrain launch --num_machines 1 --num_processes $NPROC [--multi_gpu] ..."
# on this node (one node only; NPROC_PER_NODE processes, default: the node's GPUs).
#   mkdir -p runs/slurm
#   sbatch slurm/sweep_oe.sh --preset bird finetune=[standard=runs/train_classifier/bird,data.root=...,outliers.root=...] \
#       id=/data/shards/cub/test
#   RUN_DIR=runs/sweep_oe/bird sbatch slurm/sweep_oe.sh --preset bird ...
# A launcher=... argument replaces the one above.  Pre-emption: the running trial checkpoints and
# the job requeues itself; the driver, run again on the same RUN_DIR, skips finished trials and
# resumes the interrupted one.

_dt_common="${DISTTRAIN_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
if [ ! -f "$_dt_common" ]; then
    echo "error: cannot find the disttrain repository: no $_dt_common." \
        "Submit from the repository root or set DISTTRAIN_ROOT=/path/to/disttrain." >&2
    exit 2
fi
# shellcheck source=slurm/common.sh
source "$_dt_common"

run_driver sweep_oe.py "launcher=$(node_launcher)" "$@"
exit $?
