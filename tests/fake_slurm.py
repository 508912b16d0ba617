"""A fake `sbatch` for the pipeline submit scripts (slurm/*_pipeline.sh), without Slurm.

The fake sbatch (first on PATH) records each call's arguments and prints an increasing job id
("1001;fake", as `--parsable` does on a multi-cluster setup); scancel and disttrain stand-ins log
their calls. `run_pipeline(script, fake, ...)` runs a pipeline script against them, `submitted`
reads the calls back as `Job`s, and the check_* helpers hold what every pipeline must do.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, VENV_BIN

FAKE_RUN_ID = "0123456789abcdef0123456789abcdef"

FAKE_SBATCH = """#!/bin/bash
# records "$@" NUL-separated in $FAKE_SLURM/sbatch/<id>; fails at call $FAKE_SBATCH_FAIL_AT
n=$(( $(find "$FAKE_SLURM/sbatch" -type f | wc -l) + 1 ))
if [ "$n" = "${FAKE_SBATCH_FAIL_AT:-0}" ]; then echo "sbatch: error: Batch job submission failed" >&2; exit 1; fi
id=$((1000 + n))
printf '%s\\0' "$@" > "$FAKE_SLURM/sbatch/$id"
echo "$id;fake"
"""
FAKE_SCANCEL = """#!/bin/bash
echo "$@" >> "$FAKE_SLURM/scancel.log"
"""
FAKE_DISTTRAIN = f"""#!/bin/bash
echo "$@" >> "$FAKE_SLURM/disttrain.log"
if [ "$1 $2" = "pipeline start" ]; then echo {FAKE_RUN_ID}; fi
"""


@dataclass
class Job:
    id: str
    args: list[str]

    def option(self, name: str) -> str | None:
        prefix = f"--{name}="
        return next((a[len(prefix):] for a in self.args if a.startswith(prefix)), None)

    @property
    def name(self) -> str:
        return self.option("job-name") or ""

    @property
    def export(self) -> dict[str, str]:
        items = (self.option("export") or "").split(",")
        assert items[0] == "ALL", self.args
        return dict(item.split("=", 1) for item in items[1:])

    @property
    def dependency(self) -> tuple[str, list[str]]:
        kind, _, ids = (self.option("dependency") or ":").partition(":")
        return kind, [i for i in ids.split(":") if i]

    @property
    def script(self) -> str:
        return next((Path(a).name for a in self.args if a.endswith(".sh")), "")

    @property
    def preset(self) -> str:
        return self.args[self.args.index("--preset") + 1]

    def stage_args(self) -> dict[str, str]:
        """The recipe's key=value words (after the script)."""
        words = self.args[[Path(a).name for a in self.args].index(self.script) + 1:]
        return dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))


@pytest.fixture
def fake_slurm(tmp_path: Path) -> Path:
    """tmp_path/fake: bin/ with the sbatch, scancel and disttrain stand-ins, sbatch/ for the recorded calls."""
    root = tmp_path / "fake"
    (root / "bin").mkdir(parents=True)
    (root / "sbatch").mkdir()
    for name, text in {"sbatch": FAKE_SBATCH, "scancel": FAKE_SCANCEL, "disttrain": FAKE_DISTTRAIN}.items():
        path = root / "bin" / name
        path.write_text(text)
        path.chmod(0o755)
    return root


def run_pipeline(script: str, fake: Path, *args: str, fake_disttrain: bool = True,
                 **env: str) -> subprocess.CompletedProcess:
    """bash slurm/<script> ARGS against the fakes; fake_disttrain=False uses the real `disttrain` (MLflow
    sqlite store in the fake dir)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH"))}
    full_env.update({"PATH": f"{fake / 'bin'}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM": str(fake),
                     "MLFLOW_TRACKING_URI": f"sqlite:///{fake}/mlflow.db"})
    if fake_disttrain:
        full_env["DISTTRAIN"] = str(fake / "bin" / "disttrain")
    elif (VENV_BIN / "disttrain").exists():
        full_env["DISTTRAIN"] = str(VENV_BIN / "disttrain")
    full_env.update(env)
    return subprocess.run(["bash", str(REPO / "slurm" / script), *args], env=full_env, cwd=fake,
                          capture_output=True, text=True, timeout=120, check=False)


def submitted(fake: Path) -> list[Job]:
    calls = sorted((fake / "sbatch").iterdir(), key=lambda p: int(p.name))
    return [Job(p.name, p.read_text().split("\0")[:-1]) for p in calls]


def by_name(jobs: list[Job], prefix: str) -> dict[str, Job]:
    """Jobs by name without the `<pipeline>-<preset>-` prefix, in submission order."""
    return {re.sub(rf"^{re.escape(prefix)}", "", j.name): j for j in jobs}


def check_every_job(jobs: list[Job], named: dict[str, Job], parent: str, pipeline_dir: Path) -> dict[str, str]:
    """Every job under the parent run, with the common options and SBATCH_ARGS before its script; the run
    dirs (all but the closing job's) distinct, under the pipeline dir. Returns the run dirs by job name."""
    for job in jobs:
        assert job.export["DISTTRAIN_PARENT_RUN_ID"] == parent, job.args
        assert job.export["DISTTRAIN_ROOT"] == str(REPO)
        assert "--parsable" in job.args
        assert job.option("output") == f"{pipeline_dir}/logs/%x-%j.out"
        assert {"--gpus-per-node=0", "--cpus-per-task=2"} <= set(job.args), job.args
        if job.script:  # SBATCH_ARGS are sbatch options: before the script
            assert job.args.index("--cpus-per-task=2") < [Path(a).name for a in job.args].index(job.script)
    run_dirs = {name: job.export.get("RUN_DIR") for name, job in named.items() if name != "end"}
    assert all(run_dirs.values()) and len(set(run_dirs.values())) == len(run_dirs)
    assert run_dirs["report"] == str(pipeline_dir / "report")
    return run_dirs


def check_report_and_end(jobs: list[Job], named: dict[str, Job], evaluations: list[Job], parent: str) -> None:
    """The report after every evaluation, on one process; the closing job after every job, last."""
    report = named["report"]
    assert report.script == "report.sh"
    assert report.dependency == ("afterok", [e.id for e in evaluations])
    assert report.export["NPROC_PER_NODE"] == "1"
    assert report.stage_args() == {"evaluations": f"[{','.join(e.export['RUN_DIR'] for e in evaluations)}]"}
    end = named["end"]
    kind, after = end.dependency
    assert kind == "afterany" and report.id in after and set(after) == {j.id for j in jobs if j is not end}
    assert end.id == jobs[-1].id and "RUN_DIR" not in end.export
    assert (end.option("wrap") or "").endswith(f"pipeline end '{parent}' --status \"$s\"")


def check_user_is_told(proc: subprocess.CompletedProcess, jobs: list[Job], named: dict[str, Job], parent: str,
                       pipeline_dir: Path) -> None:
    """Job ids, pipeline dir, parent run, how to follow; jobs.tsv lists the jobs in order."""
    for job in jobs:
        assert job.id in proc.stdout
    assert str(pipeline_dir) in proc.stdout and parent in proc.stdout
    assert "squeue -j" in proc.stdout and "mlflow ui --backend-store-uri sqlite:///" in proc.stdout
    tsv = [line.split("\t") for line in (pipeline_dir / "jobs.tsv").read_text().splitlines()]
    assert [row[0] for row in tsv] == [j.id for j in jobs]
    assert [row[1] for row in tsv] == list(named)


def check_closing_job(fake: Path, pipeline_dir: Path, prefix: str) -> None:
    """The closing job's command ends the parent run FAILED without a finished report, FINISHED with one."""
    wrap = by_name(submitted(fake), prefix)["end"].option("wrap")
    assert wrap
    env = {**os.environ, "FAKE_SLURM": str(fake)}
    subprocess.run(["sh", "-c", wrap], env=env, check=True, capture_output=True)  # the report never ran
    (pipeline_dir / "report").mkdir()
    (pipeline_dir / "report" / "status.json").write_text('{\n  "state": "finished",\n  "stage": "report"\n}')
    subprocess.run(["sh", "-c", wrap], env=env, check=True, capture_output=True)
    assert (fake / "disttrain.log").read_text().splitlines() == [
        f"pipeline start {prefix.removesuffix('-')}",
        f"pipeline end {FAKE_RUN_ID} --status FAILED",
        f"pipeline end {FAKE_RUN_ID} --status FINISHED",
    ]


def check_failed_submission(proc: subprocess.CompletedProcess, fake: Path, failed_job: str) -> None:
    """The third sbatch failed: exit 2 naming the job, the two submitted cancelled, the parent run FAILED."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"sbatch failed for {failed_job}" in proc.stderr
    assert (fake / "scancel.log").read_text().split() == ["1001", "1002"]
    assert (fake / "disttrain.log").read_text().splitlines()[-1] == f"pipeline end {FAKE_RUN_ID} --status FAILED"


def check_refused(proc: subprocess.CompletedProcess, fake: Path, message: str) -> None:
    """Bad input: exit 2 with the message, nothing submitted, no parent run."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr, proc.stderr
    assert not submitted(fake) and not (fake / "disttrain.log").exists()


def check_dry_run(fake: Path, pipeline_dir: Path) -> None:
    """DRY_RUN=1: no sbatch call, no MLflow run, no pipeline dir."""
    assert not submitted(fake)
    assert not (fake / "disttrain.log").exists() and not (fake / "mlflow.db").exists()
    assert not pipeline_dir.exists()
