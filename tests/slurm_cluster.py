"""A throw-away single-host Slurm cluster for tests.

Usage (from a test module)::

    pytest_plugins = ["tests.slurm_cluster"]      # or register in conftest.py

    def test_something(slurm_cluster):
        job = slurm_cluster.submit("slurm/train_classifier.sh", "--preset", "debug")
        assert slurm_cluster.wait(job, timeout=120) == "COMPLETED"

The session-scoped ``slurm_cluster`` fixture writes a private ``slurm.conf``
into a temporary directory and starts its own ``munged``, ``slurmctld`` and
``slurmd`` (all in the foreground, as child processes of pytest) with every
state/spool/log/socket/pid path inside that directory and with free TCP ports,
so it neither needs nor touches a system-wide Slurm or MUNGE installation.  At
teardown it cancels the jobs it submitted, stops exactly the processes it
started (by PID) and deletes its temporary directory.

Requirements: Debian/Ubuntu packages ``slurmctld slurmd slurm-client munge``
and root (slurmd must be able to launch jobs).  Otherwise the tests are skipped.
Tested with Slurm 22.05 (Debian 12).

Environment knobs:
  DISTTRAIN_SLURM_KEEP=1      keep the temporary directory (logs) after the run
  DISTTRAIN_SLURM_TIMEOUT=N   seconds to wait for the node to become idle (60)
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "sinfo", "scancel", "srun", "squeue")

# States after which a job record will not change any more (unless requeued
# by someone).  REQUEUED / REQUEUE_HOLD / REQUEUE_FED are *not* terminal.
TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
        "SPECIAL_EXIT",
    }
)


def _which_all(names: Iterable[str]) -> list[str]:
    # Daemons live in /usr/sbin, which is not always on a non-root PATH.
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin:/usr/local/sbin"
    return [n for n in names if shutil.which(n, path=path) is None]


def _sbin(name: str) -> str:
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin:/usr/local/sbin"
    found = shutil.which(name, path=path)
    assert found, name
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_hardware() -> str:
    """``CPUs=.. Boards=.. ... RealMemory=..`` as detected by ``slurmd -C``.

    Using slurmd's own detection guarantees that the node definition matches
    what slurmd reports, so the node is not drained for "Low RealMemory" etc.
    """
    try:
        out = subprocess.run(
            [_sbin("slurmd"), "-C"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    m = re.search(r"^NodeName=\S+\s+(.*)$", out, re.M)
    if m and "CPUs=" in m.group(1):
        hw = m.group(1).strip()
        # Leave a little headroom for the OS.
        mem = re.search(r"RealMemory=(\d+)", hw)
        if mem:
            real = max(256, int(mem.group(1)) - 256)
            hw = hw.replace(mem.group(0), f"RealMemory={real}")
        return hw
    cpus = os.cpu_count() or 1
    mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    return f"CPUs={cpus} RealMemory={max(256, mem_mb - 256)}"


@dataclass
class SlurmCluster:
    root: Path
    hostname: str
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    submitted: list[str] = field(default_factory=list)
    # last known record of every job seen by ``job_info`` (survives purging)
    _last: dict[str, dict[str, str]] = field(default_factory=dict)

    # ------------------------------------------------------------------ paths
    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    # --------------------------------------------------------------- commands
    def run(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster."""
        full_env = dict(self.env)
        if env:
            full_env.update(env)
        proc = subprocess.run(
            list(args),
            env=full_env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(map(str, args))} failed with {proc.returncode}:\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def submit(
        self,
        script: str | os.PathLike,
        *args: str,
        env: Mapping[str, str] | None = None,
        sbatch_args: Sequence[str] = (),
        cwd: str | os.PathLike | None = None,
    ) -> str:
        """``sbatch [sbatch_args] script [args]``; returns the job id.

        ``env`` is added to the cluster environment (sbatch exports the whole
        submitting environment to the job by default).  ``cwd`` becomes the
        job's ``SLURM_SUBMIT_DIR``.
        """
        proc = self.run(
            ["sbatch", "--parsable", *sbatch_args, str(script), *args],
            env=env,
            cwd=cwd,
        )
        job_id = proc.stdout.strip().split(";")[0]
        assert job_id.isdigit(), proc.stdout
        self.submitted.append(job_id)
        return job_id

    def job_info(self, job_id: str) -> dict[str, str] | None:
        """Parsed ``scontrol show job -o``; the last seen record once purged."""
        proc = self.run(
            ["scontrol", "show", "job", "-o", str(job_id)], check=False, timeout=30
        )
        if proc.returncode != 0 or "JobId=" not in proc.stdout:
            return None
        info: dict[str, str] = {}
        # key=value pairs separated by spaces; values may contain spaces only
        # in a few fields (e.g. Command, Reason) which we do not rely on.
        for m in re.finditer(r"(\w[\w:/]*)=(\S*)", proc.stdout):
            info.setdefault(m.group(1), m.group(2))
        self._last[str(job_id)] = info
        return info

    def state(self, job_id: str) -> str | None:
        info = self.job_info(job_id)
        if info is None:
            info = self._last.get(str(job_id))
        return info.get("JobState") if info else None

    def requeue_count(self, job_id: str) -> int:
        """How many times the job has been requeued/restarted (``Restarts=``)."""
        info = self.job_info(job_id) or self._last.get(str(job_id)) or {}
        return int(info.get("Restarts", "0") or 0)

    def wait(
        self,
        job_id: str,
        timeout: float = 120,
        *,
        states: Iterable[str] = TERMINAL_STATES,
        poll: float = 0.5,
    ) -> str:
        """Poll until the job reaches one of ``states``; return that state.

        Raises ``TimeoutError`` (with the daemon logs) when it does not.
        """
        wanted = set(states)
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info is None and str(job_id) in self._last:
                # purged from slurmctld memory: its last state is final
                last = self._last[str(job_id)].get("JobState")
                if last in wanted:
                    return last
                raise RuntimeError(
                    f"job {job_id} disappeared in state {last}\n{self.logs()}"
                )
            if info is not None:
                last = info.get("JobState")
                if last in wanted:
                    return last
            time.sleep(poll)
        raise TimeoutError(
            f"job {job_id} still {last} after {timeout}s\n{self.logs()}"
        )

    def wait_until(self, predicate, timeout: float, what: str, poll: float = 0.5):
        """Poll ``predicate()`` until truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(poll)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{self.logs()}")

    def signal(self, job_id: str, sig: str = "USR1", *, batch: bool = True) -> None:
        """``scancel --signal=SIG [--batch] JOBID`` (``--batch``: only the
        batch shell, which is what ``#SBATCH --signal=B:SIG@T`` delivers)."""
        args = ["scancel", f"--signal={sig}"]
        if batch:
            args.append("--batch")
        self.run([*args, str(job_id)])

    def cancel(self, job_id: str) -> None:
        self.run(["scancel", str(job_id)], check=False)

    def logs(self, tail: int = 60) -> str:
        parts = []
        for path in sorted(self.log_dir.glob("*")):
            try:
                lines = path.read_text(errors="replace").splitlines()[-tail:]
            except OSError:
                continue
            parts.append(f"----- {path.name} (last {tail} lines) -----")
            parts.extend(lines)
        return "\n".join(parts)

    # -------------------------------------------------------------- lifecycle
    def _spawn(self, name: str, args: list[str]) -> None:
        out = open(self.log_dir / f"{name}.stdout", "ab")
        self.procs[name] = subprocess.Popen(
            args,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            # own process group, so a ^C of pytest does not hit the daemons
            # before teardown had a chance to stop them in order
            start_new_session=True,
        )
        out.close()

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {proc.returncode} during start-up\n{self.logs()}"
                )

    def start(self, timeout: float) -> None:
        munge_sock = self.root / "munge" / "munge.socket"
        key = self.root / "munge" / "munge.key"
        # Private key: our munged only serves this cluster (own socket).
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._spawn(
            "munged",
            [
                _sbin("munged"),
                "--foreground",
                "--force",
                f"--socket={munge_sock}",
                f"--key-file={key}",
                f"--log-file={self.log_dir / 'munged.log'}",
                f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                f"--seed-file={self.root / 'munge' / 'munged.seed'}",
                "--num-threads=4",
            ],
        )
        deadline = time.monotonic() + timeout
        while not munge_sock.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"munged did not create its socket\n{self.logs()}")
            time.sleep(0.1)

        self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [_sbin("slurmd"), "-D", "-f", str(self.conf), "-N", self.hostname])

        state = None
        while time.monotonic() < deadline:
            self._check_alive()
            proc = self.run(
                ["sinfo", "-h", "-N", "-n", self.hostname, "-o", "%t"],
                check=False,
                timeout=30,
            )
            state = proc.stdout.strip()
            if proc.returncode == 0 and state in ("idle", "mix", "alloc"):
                return
            if state in ("drain", "down", "drng", "fail"):
                # ReturnToService=2 should prevent this; try to resume once
                self.run(
                    ["scontrol", "update", f"NodeName={self.hostname}", "State=RESUME"],
                    check=False,
                )
            time.sleep(0.5)
        raise TimeoutError(
            f"node {self.hostname} not idle after {timeout}s (state {state!r})\n{self.logs()}"
        )

    def stop(self) -> None:
        # 1. cancel our jobs and give their processes a moment to go away
        #    (job steps are run by slurmstepd, which is started by slurmd but
        #    not a child we could signal ourselves).
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            for job_id in self.submitted:
                self.run(["scancel", job_id], check=False, timeout=30)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                proc = self.run(["squeue", "-h", "-o", "%i %T"], check=False, timeout=30)
                if proc.returncode != 0 or not proc.stdout.strip():
                    break
                time.sleep(0.5)
        # 2. stop the daemons we started, by PID, in reverse order
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _write_conf(root: Path, hostname: str) -> Path:
    for sub in ("etc", "state", "spool", "log", "munge", "jobs"):
        (root / sub).mkdir(mode=0o700, exist_ok=True)
    ctld_port = _free_port()
    slurmd_port = _free_port()
    while slurmd_port == ctld_port:
        slurmd_port = _free_port()
    conf = root / "etc" / "slurm.conf"
    conf.write_text(
        f"""\
# generated by tests/slurm_cluster.py -- single-host throw-away cluster
ClusterName=disttraintest
SlurmctldHost={hostname}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also bounds how long a requeued job waits before it may start
AuthInfo=socket={root}/munge/munge.socket,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/slurmd-%n
SlurmctldPidFile={root}/state/slurmctld.pid
SlurmdPidFile={root}/spool/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=1024
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
# keep finished job records visible long enough to be polled reliably
MinJobAge=300
ReturnToService=2
JobRequeue=1
MailProg=/bin/true
KillWait=30
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
Waittime=0
GresTypes=gpu
NodeName={hostname} NodeAddr=127.0.0.1 {_node_hardware()} State=UNKNOWN
PartitionName=debug Nodes={hostname} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
    )
    return conf


def _skip_reason() -> str | None:
    missing = _which_all(DAEMONS + CLIENTS)
    if missing:
        return (
            "Slurm/MUNGE not installed (missing: "
            + ", ".join(missing)
            + "); install with: apt-get install -y slurmctld slurmd slurm-client munge"
        )
    if os.geteuid() != 0:
        return "the local Slurm test cluster needs root (slurmd must start job processes)"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    hostname = subprocess.run(
        ["hostname", "-s"], capture_output=True, text=True, check=True
    ).stdout.strip()
    root = Path(tempfile.mkdtemp(prefix="disttrain-slurm-"))
    root.chmod(0o700)  # munged insists on safe directory permissions
    conf = _write_conf(root, hostname)
    env = dict(os.environ)
    env["SLURM_CONF"] = str(conf)
    env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
    # do not let an outer Slurm job's variables leak into our submissions
    for key in list(env):
        if key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and key != "SLURM_CONF":
            del env[key]
    cluster = SlurmCluster(root=root, hostname=hostname, env=env)
    try:
        cluster.start(timeout=float(os.environ.get("DISTTRAIN_SLURM_TIMEOUT", "60")))
        yield cluster
    finally:
        cluster.stop()
        if os.environ.get("DISTTRAIN_SLURM_KEEP"):
            print(f"\nkept Slurm test cluster dir {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
