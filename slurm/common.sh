# shellcheck shell=bash
# Shared setup for the disttrain sbatch scripts in slurm/.  Source it, then
# call run_stage:
#
#     source "${DISTTRAIN_ROOT:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
#     run_stage train_classifier.py "$@"
#
# or, for a single-process driver that launches its own stages (sweep_oe.py),
#
#     run_driver sweep_oe.py "launcher=$(node_launcher)" "$@"
#
# What it provides
#   * DISTTRAIN_ROOT  repository root.  sbatch runs a *copy* of the script from
#                     the slurmd spool directory, so "$0" is useless; the root
#                     is $SLURM_SUBMIT_DIR (submit from the repository root) or
#                     the DISTTRAIN_ROOT environment variable.  We cd into it.
#   * MAIN_ADDR       first host of the allocation (rendezvous address);
#                     override with MAIN_ADDR=...
#   * MAIN_PORT       rendezvous port, default 20000 + JOBID % 20000
#   * NPROC           processes per node: $NPROC_PER_NODE, else
#                     $SLURM_GPUS_ON_NODE, else 1
#   * NNODES          $SLURM_NNODES
#   * python env      $DISTTRAIN_ROOT/.venv is activated if present, unless
#                     PYTHON=/path/to/python (an interpreter with disttrain
#                     installed) or ACCELERATE=/path/to/accelerate (the python
#                     beside it is used) is given.  Stages start with
#                     "disttrain launch" (accelerate launch's options), which
#                     passes the stage's exit code on: 0 finished, 2 bad input,
#                     75 stopped with its state saved, 1 failed
#   * ACCELERATE_CONFIG   optional accelerate config file (--config_file)
#   * RUN_DIR         default runs/<stage>/slurm-$SLURM_JOB_ID (the job id is
#                     kept on requeue, so a requeued job finds its checkpoints)
#
# Pre-emption / requeue
#   The sbatch scripts use "#SBATCH --signal=B:USR1@90" and "--requeue".  When
#   the batch shell receives USR1 (or TERM sent to the batch shell only, e.g.
#   "scancel --batch --signal=TERM JOBID"), the trap below sends SIGTERM to the
#   training step(s) with "scancel --signal=TERM JOBID.STEP".  slurmstepd
#   delivers it to every process of the step: the accelerate/torchrun agent
#   (which then also SIGTERMs its workers and waits for them) and the python
#   workers themselves.  The trainer checkpoints and exits (code 75); once the
#   step has ended the job is put back into the queue with
#   "scontrol requeue $SLURM_JOB_ID".  The requeued job reruns the same script
#   with the same job id, hence the same RUN_DIR, and the trainer's default
#   resume=auto continues from the newest checkpoint.
#   We do NOT "kill -TERM" the srun process: srun turns SIGTERM into SIGKILL of
#   its tasks ("srun: forcing job termination").  SIGUSR1 is not forwarded
#   either: it would kill the torchrun agent (no handler) and orphan workers.
#   A TERM that arrives because the job is being cancelled or timed out (job
#   state no longer RUNNING) does not requeue.
#   A stage that exits 75 without a signal (the watchdog ended a run whose rank
#   stalled, or whose launcher died) also requeues, at most
#   DISTTRAIN_MAX_STALL_REQUEUES times (default 3) per job.
#   Exit code 2 (bad input) never requeues: the same input would fail again.
#   If training fails for any other reason, the script exits with its code.

if [ -n "${_DISTTRAIN_COMMON_SOURCED:-}" ]; then
    return 0
fi
_DISTTRAIN_COMMON_SOURCED=1

_dt_log() { printf '[disttrain-slurm %s] %s\n' "$(date '+%F %T')" "$*"; }
_dt_die() {
    printf '[disttrain-slurm] error: %s\n' "$*" >&2
    exit 2
}

if [ -z "${SLURM_JOB_ID:-}" ]; then
    _dt_die "this script must run inside a Slurm job: sbatch slurm/<stage>.sh ..."
fi

# ----------------------------------------------------------------- repository
if [ -n "${DISTTRAIN_ROOT:-}" ]; then
    _dt_root_from="DISTTRAIN_ROOT"
else
    DISTTRAIN_ROOT="${SLURM_SUBMIT_DIR:-$PWD}"
    _dt_root_from="SLURM_SUBMIT_DIR"
fi
if [ ! -d "$DISTTRAIN_ROOT/recipes" ]; then
    _dt_die "no recipes/ directory in '$DISTTRAIN_ROOT' (taken from $_dt_root_from). Submit from the repository root (cd /path/to/disttrain && sbatch slurm/<stage>.sh ...) or set DISTTRAIN_ROOT=/path/to/disttrain."
fi
DISTTRAIN_ROOT="$(cd "$DISTTRAIN_ROOT" && pwd -P)"
export DISTTRAIN_ROOT
cd "$DISTTRAIN_ROOT" || _dt_die "cannot cd to $DISTTRAIN_ROOT"

# ----------------------------------------------------------------- topology
NNODES="${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}"
if [ -z "${MAIN_ADDR:-}" ]; then
    MAIN_ADDR="$(scontrol show hostnames "${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}" | head -n1)"
    [ -n "$MAIN_ADDR" ] || MAIN_ADDR="$(hostname)"
fi
MAIN_PORT="${MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"

if [ -n "${NPROC_PER_NODE:-}" ]; then
    NPROC="$NPROC_PER_NODE"
elif [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ "${SLURM_GPUS_ON_NODE}" -gt 0 ] 2>/dev/null; then
    NPROC="$SLURM_GPUS_ON_NODE"
else
    NPROC=1
fi
case "$NPROC" in
    '' | *[!0-9]* | 0) _dt_die "invalid number of processes per node: '$NPROC'" ;;
esac
NUM_PROCESSES=$((NNODES * NPROC))
export NNODES MAIN_ADDR MAIN_PORT NPROC NUM_PROCESSES

# ----------------------------------------------------------------- python
# `disttrain launch` takes accelerate launch's options and passes the stage's exit code on
if [ -z "${PYTHON:-}" ] && [ -n "${ACCELERATE:-}" ]; then
    PYTHON="$(dirname "$ACCELERATE")/python"
    [ -x "$PYTHON" ] || _dt_die "no python beside ACCELERATE=$ACCELERATE; set PYTHON=/path/to/python instead"
fi
if [ -n "${PYTHON:-}" ]; then
    _DT_LAUNCHER=("$PYTHON" -m disttrain.runtime.launch)
else
    if [ -f "$DISTTRAIN_ROOT/.venv/bin/activate" ]; then
        # shellcheck disable=SC1091
        source "$DISTTRAIN_ROOT/.venv/bin/activate"
    fi
    command -v disttrain >/dev/null 2>&1 ||
        _dt_die "'disttrain' not found (no $DISTTRAIN_ROOT/.venv?); set PYTHON=/path/to/python"
    _DT_LAUNCHER=(disttrain launch)
fi
# flush python output promptly into the job log
export PYTHONUNBUFFERED="${PYTHONUNBUFFERED:-1}"
# how long the torchrun agent lets its workers finish (checkpoint) after
# SIGTERM before it SIGKILLs them (torch's default is 30 s); the USR1 comes
# 90 s before the time limit
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-75}"

# ----------------------------------------------------------------- signals
_DT_STEP_PID=""    # pid of the srun running the current stage
_DT_PREEMPTED=""   # signal name once a pre-emption signal arrived
_DT_REQUEUED=""    # set once we asked Slurm to requeue us

_dt_job_state() {
    scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p'
}

# SIGTERM to the running job step(s) -- not to srun, not to the batch shell.
_dt_forward_term() {
    local steps
    steps="$(squeue -h -s -j "$SLURM_JOB_ID" -o '%i' 2>/dev/null | grep -E '^[0-9_]+\.[0-9]+$' | tr '\n' ' ')"
    if [ -n "$steps" ]; then
        _dt_log "sending SIGTERM to job step(s) $steps"
        # shellcheck disable=SC2086
        scancel --signal=TERM $steps
    else
        # step not registered (yet): signal every step of the job; without
        # --batch/--full scancel never signals the batch shell itself
        _dt_log "sending SIGTERM to all steps of job $SLURM_JOB_ID"
        scancel --signal=TERM "$SLURM_JOB_ID"
    fi
}

_dt_on_signal() {
    local sig="$1" state
    [ -n "$_DT_REQUEUED" ] && return 0     # Slurm is ending this run after requeue
    if [ "$sig" = TERM ]; then
        state="$(_dt_job_state)"
        if [ -n "$state" ] && [ "$state" != RUNNING ]; then
            # scancel / time limit: Slurm signals the steps itself; no requeue
            _dt_log "caught SIGTERM, job state $state: not requeueing"
            return 0
        fi
    fi
    if [ -n "$_DT_PREEMPTED" ]; then
        _dt_log "caught SIG$sig again; already stopping"
        return 0
    fi
    _DT_PREEMPTED="$sig"
    _dt_log "caught SIG$sig: asking training to checkpoint and stop, then requeueing"
    if [ -n "$_DT_STEP_PID" ] && kill -0 "$_DT_STEP_PID" 2>/dev/null; then
        _dt_forward_term
    fi
}
trap '_dt_on_signal USR1' USR1
trap '_dt_on_signal TERM' TERM

_dt_requeue() {
    _DT_REQUEUED=1
    _dt_log "requeueing job $SLURM_JOB_ID (restart count so far: ${SLURM_RESTART_COUNT:-0})"
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0
    fi
    _DT_REQUEUED=""
    _dt_log "scontrol requeue failed (job submitted with --no-requeue?)"
    return 1
}

# ----------------------------------------------------------------- run_stage
# run_stage RECIPE.py [key=value ...]
# Launches recipes/RECIPE.py on every node of the allocation with
# disttrain launch, run_dir=$RUN_DIR and the given arguments.  Returns the
# exit code of the training; on pre-emption it requeues the job and exits.
run_stage() {
    local recipe="${1:?usage: run_stage RECIPE.py [args...]}"
    shift
    local stage="${recipe%.py}"
    stage="${stage##*/}"
    [ -f "recipes/$recipe" ] || _dt_die "recipes/$recipe not found in $DISTTRAIN_ROOT"

    local run_dir="${RUN_DIR:-runs/$stage/slurm-$SLURM_JOB_ID}"
    case "$run_dir" in /*) ;; *) run_dir="$DISTTRAIN_ROOT/$run_dir" ;; esac
    mkdir -p "$run_dir"

    local -a launch=("${_DT_LAUNCHER[@]}"
        --num_machines "$NNODES"
        --main_process_ip "$MAIN_ADDR"
        --main_process_port "$MAIN_PORT"
        --num_processes "$NUM_PROCESSES")
    [ "$NUM_PROCESSES" -gt 1 ] && launch+=(--multi_gpu)
    [ -n "${ACCELERATE_CONFIG:-}" ] && launch+=(--config_file "$ACCELERATE_CONFIG")
    local -a script_args=("recipes/$recipe" "run_dir=$run_dir" "$@")

    local -a srun_args=(--export=ALL --nodes="$NNODES" --ntasks="$NNODES"
        --ntasks-per-node=1 --kill-on-bad-exit=1)
    # srun (Slurm >= 22.05) does not inherit --cpus-per-task from sbatch
    [ -n "${SLURM_CPUS_PER_TASK:-}" ] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")

    _dt_log "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: stage $stage on $NNODES node(s) x $NPROC process(es), main $MAIN_ADDR:$MAIN_PORT"
    _dt_log "run_dir $run_dir"
    _dt_log "launch: ${launch[*]} --machine_rank \$SLURM_NODEID ${script_args[*]}"

    # --machine_rank must be evaluated on each node, so the launch command is
    # assembled by a small bash -c on the node: the first $1 words are the
    # launcher with its options, the rest the recipe and its arguments.
    # shellcheck disable=SC2016
    srun "${srun_args[@]}" bash -c \
        'n=$1; shift; exec "${@:1:n}" --machine_rank "${SLURM_NODEID:-0}" "${@:n+1}"' \
        disttrain-launch "${#launch[@]}" "${launch[@]}" "${script_args[@]}" &
    _DT_STEP_PID=$!
    # a signal that arrived before srun existed
    [ -n "$_DT_PREEMPTED" ] && _dt_forward_term
    _dt_wait_step "$stage"
}

# ----------------------------------------------------------------- run_driver
# node_launcher
# Prints the "disttrain launch ..." command line, shell-quoted as one string,
# that starts NPROC processes on this node: the launcher= of a driver recipe.
node_launcher() {
    local -a launch=("${_DT_LAUNCHER[@]}"
        --num_machines 1
        --main_process_port "$MAIN_PORT"
        --num_processes "$NPROC")
    [ "$NPROC" -gt 1 ] && launch+=(--multi_gpu)
    [ -n "${ACCELERATE_CONFIG:-}" ] && launch+=(--config_file "$ACCELERATE_CONFIG")
    local quoted
    quoted="$(printf '%q ' "${launch[@]}")"
    printf '%s\n' "${quoted% }"
}

# The interpreter of a driver: $PYTHON, the python next to $ACCELERATE, or the
# (activated) environment's python.
_dt_python() {
    if [ -n "${PYTHON:-}" ]; then
        printf '%s\n' "$PYTHON"
    elif [ -n "${ACCELERATE:-}" ] && [ -x "$(dirname "$ACCELERATE")/python" ]; then
        printf '%s\n' "$(dirname "$ACCELERATE")/python"
    else
        command -v python || command -v python3
    fi
}

# run_driver RECIPE.py [key=value ...]
# Runs recipes/RECIPE.py as ONE plain python process on the batch host, with
# run_dir=$RUN_DIR and the given arguments: for drivers (sweep_oe.py) that
# start their own stages with a launcher= such as "$(node_launcher)".  The
# driver runs as a job step, so pre-emption works as in run_stage: SIGTERM
# reaches the driver and the stage it is running (which checkpoints), the job
# is requeued, and the driver, run again on the same run dir, continues.
# One node only: the stages it starts run on this node.
run_driver() {
    local recipe="${1:?usage: run_driver RECIPE.py [args...]}"
    shift
    local stage="${recipe%.py}"
    stage="${stage##*/}"
    [ -f "recipes/$recipe" ] || _dt_die "recipes/$recipe not found in $DISTTRAIN_ROOT"
    [ "$NNODES" -eq 1 ] ||
        _dt_die "$stage is a single-process driver whose stages run on its own node: submit it with --nodes=1 (got $NNODES nodes)"
    local python
    python="$(_dt_python)" || _dt_die "no python found; set PYTHON=/path/to/python"

    local run_dir="${RUN_DIR:-runs/$stage/slurm-$SLURM_JOB_ID}"
    case "$run_dir" in /*) ;; *) run_dir="$DISTTRAIN_ROOT/$run_dir" ;; esac
    mkdir -p "$run_dir"

    local -a command=("$python" "recipes/$recipe" "run_dir=$run_dir" "$@")
    local -a srun_args=(--export=ALL --nodes=1 --ntasks=1 --kill-on-bad-exit=1)
    [ -n "${SLURM_CPUS_PER_TASK:-}" ] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")

    _dt_log "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: driver $stage on $(hostname) ($NPROC process(es) per stage)"
    _dt_log "run_dir $run_dir"
    _dt_log "run: $(printf '%q ' "${command[@]}")"
    srun "${srun_args[@]}" "${command[@]}" &
    _DT_STEP_PID=$!
    [ -n "$_DT_PREEMPTED" ] && _dt_forward_term
    _dt_wait_step "$stage"
}

# _dt_wait_step STAGE
# Waits for the srun in $_DT_STEP_PID, then returns its exit code, or requeues
# the job if a pre-emption signal arrived.  "wait" returns early whenever a
# trapped signal arrives; keep waiting until srun has really exited.
_dt_wait_step() {
    local stage="$1" rc=0
    while kill -0 "$_DT_STEP_PID" 2>/dev/null; do
        wait "$_DT_STEP_PID"
    done
    wait "$_DT_STEP_PID" || rc=$?
    _DT_STEP_PID=""

    if [ -n "$_DT_PREEMPTED" ]; then
        if [ "$rc" -eq 0 ]; then
            _dt_log "stage $stage finished before it could be pre-empted"
            _DT_PREEMPTED=""
            return 0
        fi
        _dt_log "stage $stage stopped after SIG$_DT_PREEMPTED (exit code $rc)"
        _dt_requeue
        return "$rc"
    fi
    if [ "$rc" -eq 75 ]; then
        if [ "${SLURM_RESTART_COUNT:-0}" -lt "${DISTTRAIN_MAX_STALL_REQUEUES:-3}" ]; then
            _dt_log "stage $stage stopped with its state saved (exit code 75: a stalled rank or a lost launcher)"
            _dt_requeue
        fi
        _dt_log "stage $stage stopped with its state saved (exit code 75) too often; not requeueing"
        return "$rc"
    fi
    if [ "$rc" -eq 2 ]; then
        _dt_log "stage $stage failed with exit code 2 (bad input: fix the arguments or the data); not requeueing"
    elif [ "$rc" -ne 0 ]; then
        _dt_log "stage $stage failed with exit code $rc"
    else
        _dt_log "stage $stage finished"
    fi
    return "$rc"
}
