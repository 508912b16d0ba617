#!/bin/bash
#SBATCH --job-name=train_classifier
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
# Train the classifier with recipes/train_classifier.py on a Slurm cluster.
# One task per node runs "disttrain launch" (accelerate launch, passing the stage's exit code on),
# which starts one process per GPU.
#
# Usage (from the repository root; the log directory must exist):
#   mkdir -p runs/slurm
#   sbatch slurm/train_classifier.sh --preset debug
#   sbatch slurm/train_classifier.sh --preset NAME train.max_steps=5000 key=value ...
#   sbatch --nodes=4 slurm/train_classifier.sh --preset NAME ...
#   sbatch --gpus-per-node=4 --cpus-per-task=8 --time=2:00:00 slurm/train_classifier.sh ...
#   sbatch --gpus-per-node=0 --cpus-per-task=2 slurm/train_classifier.sh ...   # CPU only:
#        set NPROC_PER_NODE (default: GPUs on the node, else 1)
# Arguments after the script name are passed unchanged to the recipe.
# Command-line sbatch options override the #SBATCH lines above.
#
# Environment (exported to the job by sbatch):
#   RUN_DIR=DIR            run directory (default runs/train_classifier/slurm-<jobid>,
#                          kept across requeues; resume=auto continues from its
#                          newest checkpoint)
#   NPROC_PER_NODE=N       processes per node (default $SLURM_GPUS_ON_NODE, else 1)
#   MAIN_PORT=P            rendezvous port (default 20000 + jobid % 20000)
#   ACCELERATE_CONFIG=F    accelerate config file passed as --config_file
#   ACCELERATE=/p/accelerate or PYTHON=/p/python   instead of the repo's .venv
#   DISTTRAIN_ROOT=DIR     repository root if not submitting from it
#
# Pre-emption: 90 s before the time limit (or on "scancel --batch --signal=USR1
# JOBID") the training is told to checkpoint and stop, and the job requeues
# itself; see slurm/common.sh.

# sbatch runs a copy of this file from the spool directory: find the repository
# through the submit directory (or DISTTRAIN_ROOT), not through $0.
_dt_common="${DISTTRAIN_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
if [ ! -f "$_dt_common" ]; then
    echo "error: cannot find the disttrain repository: no $_dt_common." \
        "Submit from the repository root (cd /path/to/disttrain && sbatch slurm/train_classifier.sh ...)" \
        "or set DISTTRAIN_ROOT=/path/to/disttrain." >&2
    exit 2
fi
# shellcheck source=slurm/common.sh
source "$_dt_common"

run_stage train_classifier.py "$@"
exit $?
