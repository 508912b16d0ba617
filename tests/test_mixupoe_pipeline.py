"""slurm/mixupoe_pipeline.sh against a fake `sbatch`: the job chain it submits, without Slurm.

The fake sbatch (first on PATH) records each call's arguments and prints an increasing job id
("1001;fake", as `--parsable` does on a multi-cluster setup). One test uses the real
`disttrain pipeline start` with an MLflow sqlite store in tmp_path; the others a fake `disttrain`
that records its calls. The same chain on a real cluster: tests/test_slurm.py -k pipeline.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "mixupoe_pipeline.sh"
VENV_BIN = Path(sys.executable).parent
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

    def stage_args(self) -> dict[str, str]:
        """The recipe's key=value words (after the script)."""
        words = self.args[[Path(a).name for a in self.args].index(self.script) + 1:]
        return dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))


@pytest.fixture
def fake_slurm(tmp_path: Path) -> Path:
    root = tmp_path / "fake"
    (root / "bin").mkdir(parents=True)
    (root / "sbatch").mkdir()
    for name, text in {"sbatch": FAKE_SBATCH, "scancel": FAKE_SCANCEL, "disttrain": FAKE_DISTTRAIN}.items():
        path = root / "bin" / name
        path.write_text(text)
        path.chmod(0o755)
    return root


def run_pipeline(fake: Path, *args: str, fake_disttrain: bool = True, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH"))}
    full_env.update({"PATH": f"{fake / 'bin'}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM": str(fake),
                     "MLFLOW_TRACKING_URI": f"sqlite:///{fake}/mlflow.db"})
    if fake_disttrain:
        full_env["DISTTRAIN"] = str(fake / "bin" / "disttrain")
    elif (VENV_BIN / "disttrain").exists():
        full_env["DISTTRAIN"] = str(VENV_BIN / "disttrain")
    full_env.update(env)
    return subprocess.run(["bash", str(SCRIPT), *args], env=full_env, cwd=fake, capture_output=True, text=True,
                          timeout=120, check=False)


def submitted(fake: Path) -> list[Job]:
    calls = sorted((fake / "sbatch").iterdir(), key=lambda p: int(p.name))
    return [Job(p.name, p.read_text().split("\0")[:-1]) for p in calls]


def by_name(jobs: list[Job]) -> dict[str, Job]:
    return {re.sub(r"^mixupoe-debug-", "", j.name): j for j in jobs}


def pipeline_args(demo: Path) -> list[str]:
    return ["debug", str(demo), str(demo / "outliers"), "noise:gaussian:50", str(demo / "far_ood")]


def test_submits_the_chain_with_one_parent_run(fake_slurm, demo_root, tmp_path):
    pipeline_dir = tmp_path / "pipeline"
    proc = run_pipeline(fake_slurm, *pipeline_args(demo_root), fake_disttrain=False, SEEDS="0 1",
                        METHODS="oe mixup_oe", EVAL_PRESET="debug", PIPELINE_DIR=str(pipeline_dir),
                        NPROC_PER_NODE="2", SBATCH_ARGS="--gpus-per-node=0 --cpus-per-task=2",
                        EVALUATE_ARGS="num_draws=2")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    jobs = submitted(fake_slurm)
    # per seed: standard, 2 fine-tunes, 3 evaluations; then the report and the closing job
    assert len(jobs) == 2 * (1 + 2 + 3) + 2, [j.name for j in jobs]
    named = by_name(jobs)
    assert len(named) == len(jobs)
    ids = {name: job.id for name, job in named.items()}

    # one MLflow parent run, created at submission (real `disttrain pipeline start`), for every job
    parent = (pipeline_dir / "parent_run_id").read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{32}", parent)
    with sqlite3.connect(fake_slurm / "mlflow.db") as db:
        assert db.execute("select name, status from runs where run_uuid = ?", (parent,)).fetchall() == \
            [("mixupoe-debug", "RUNNING")]
    for job in jobs:
        assert job.export["DISTTRAIN_PARENT_RUN_ID"] == parent, job.args
        assert job.export["DISTTRAIN_ROOT"] == str(REPO)
        assert "--parsable" in job.args
        assert job.option("output") == f"{pipeline_dir}/logs/%x-%j.out"
        assert {"--gpus-per-node=0", "--cpus-per-task=2"} <= set(job.args), job.args
        if job.script:  # SBATCH_ARGS are sbatch options: before the script
            assert job.args.index("--cpus-per-task=2") < [Path(a).name for a in job.args].index(job.script)

    # distinct run dirs under the pipeline dir (all but the closing job)
    run_dirs = {name: job.export.get("RUN_DIR") for name, job in named.items() if name != "end"}
    assert all(run_dirs.values()) and len(set(run_dirs.values())) == len(run_dirs)
    assert all(Path(d).parent in (pipeline_dir, pipeline_dir / "seed-0", pipeline_dir / "seed-1")
               for d in run_dirs.values()), run_dirs
    assert run_dirs["s0-finetune-mixup_oe"] == str(pipeline_dir / "seed-0" / "finetune-mixup_oe")
    assert run_dirs["report"] == str(pipeline_dir / "report")

    evaluations = []
    for seed in (0, 1):
        standard = named[f"s{seed}-standard"]
        assert standard.script == "train_classifier.sh"
        assert standard.option("dependency") is None
        assert standard.export["NPROC_PER_NODE"] == "2"
        assert standard.stage_args() == {"data.root": str(demo_root), "runtime.seed": str(seed)}
        assert standard.args[standard.args.index("--preset") + 1] == "debug"
        models = {"standard": standard}
        for method in ("oe", "mixup_oe"):
            finetune = named[f"s{seed}-finetune-{method}"]
            assert finetune.script == "finetune_oe.sh"
            assert finetune.dependency == ("afterok", [standard.id])
            assert "--kill-on-invalid-dep=yes" in finetune.args
            assert finetune.stage_args() == {
                "method": method, "standard": run_dirs[f"s{seed}-standard"], "data.root": str(demo_root),
                "outliers.root": str(demo_root / "outliers"), "runtime.seed": str(seed)}
            models[method] = finetune
        for label, model in models.items():
            evaluate = named[f"s{seed}-evaluate-{label}"]
            assert evaluate.script == "evaluate.sh"
            assert evaluate.dependency == ("afterok", [model.id])  # the job that made its model
            assert evaluate.args[evaluate.args.index("--preset") + 1] == "debug"
            assert evaluate.stage_args() == {
                "model": model.export["RUN_DIR"], "id": f"{demo_root}/test", "fit": f"{demo_root}/train",
                "ood": f"[{demo_root}/holdout,noise:gaussian:50,{demo_root}/far_ood]",
                "interpolate": "[0.5,0.6,0.7]", "interpolate_with": f"{demo_root}/far_ood",  # the last OOD set
                "runtime.seed": str(seed), "num_draws": "2"}
            evaluations.append(evaluate)

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

    # what the user is told
    for job_id in ids.values():
        assert job_id in proc.stdout
    assert str(pipeline_dir) in proc.stdout and parent in proc.stdout
    assert "squeue -j" in proc.stdout and "mlflow ui --backend-store-uri sqlite:///" in proc.stdout
    tsv = [line.split("\t") for line in (pipeline_dir / "jobs.tsv").read_text().splitlines()]
    assert [row[0] for row in tsv] == [j.id for j in jobs]


def test_closing_job_marks_the_parent_run_by_the_report(fake_slurm, demo_root, tmp_path):
    pipeline_dir = tmp_path / "pipeline"
    proc = run_pipeline(fake_slurm, *pipeline_args(demo_root), SEEDS="0", METHODS="mixup_oe",
                        PIPELINE_DIR=str(pipeline_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wrap = by_name(submitted(fake_slurm))["end"].option("wrap")
    assert wrap
    log = fake_slurm / "disttrain.log"
    env = {**os.environ, "FAKE_SLURM": str(fake_slurm)}

    subprocess.run(["sh", "-c", wrap], env=env, check=True, capture_output=True)  # the report never ran
    (pipeline_dir / "report").mkdir()
    (pipeline_dir / "report" / "status.json").write_text('{\n  "state": "finished",\n  "stage": "report"\n}')
    subprocess.run(["sh", "-c", wrap], env=env, check=True, capture_output=True)
    assert log.read_text().splitlines() == [
        "pipeline start mixupoe-debug",
        f"pipeline end {FAKE_RUN_ID} --status FAILED",
        f"pipeline end {FAKE_RUN_ID} --status FINISHED",
    ]


def test_dry_run_submits_nothing(fake_slurm, demo_root, tmp_path):
    pipeline_dir = tmp_path / "pipeline"
    proc = run_pipeline(fake_slurm, *pipeline_args(demo_root), SEEDS="0 1", METHODS="oe mixup_oe", DRY_RUN="1",
                        PIPELINE_DIR=str(pipeline_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("sbatch ")]
    assert len(lines) == 14
    assert "--dependency=afterok:<s1-standard>" in lines[7]
    assert "DISTTRAIN_PARENT_RUN_ID=<parent-run-id>" in lines[0]
    assert not submitted(fake_slurm)
    assert not (fake_slurm / "disttrain.log").exists() and not (fake_slurm / "mlflow.db").exists()
    assert not pipeline_dir.exists()


def test_failed_submission_cancels_what_was_submitted(fake_slurm, demo_root, tmp_path):
    proc = run_pipeline(fake_slurm, *pipeline_args(demo_root), SEEDS="0", METHODS="oe",
                        PIPELINE_DIR=str(tmp_path / "pipeline"), FAKE_SBATCH_FAIL_AT="3")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "sbatch failed for s0-evaluate-standard" in proc.stderr
    assert (fake_slurm / "scancel.log").read_text().split() == ["1001", "1002"]
    assert (fake_slurm / "disttrain.log").read_text().splitlines()[-1] == \
        f"pipeline end {FAKE_RUN_ID} --status FAILED"


@pytest.mark.parametrize("case, message", [
    ("no arguments", "expected PRESET DATA_ROOT OUTLIER_POOL and at least one OOD_SET, got 0"),
    ("no OOD set", "expected PRESET DATA_ROOT OUTLIER_POOL and at least one OOD_SET, got 3"),
    ("DATA_ROOT missing", "is not a directory"),
    ("DATA_ROOT without shard splits", "has no shard split(s) holdout"),
    ("outlier pool not a split", "is not a shard split"),
    ("OOD set missing", "OOD set"),
    ("INTERPOLATE_WITH not an OOD set", "is not one of the OOD sets"),
    ("unknown method", "unknown method 'mixup'"),
    ("no sbatch", "not found: run this on a Slurm login node"),
    ("no disttrain", "is not an executable"),
])
def test_bad_input_exits_2_with_a_message(fake_slurm, demo_root, tmp_path, case, message):
    demo = str(demo_root)
    args, env = pipeline_args(demo_root), {}
    if case == "no arguments":
        args = []
    elif case == "no OOD set":
        args = args[:3]
    elif case == "DATA_ROOT missing":
        args[1] = str(tmp_path / "nowhere")
    elif case == "DATA_ROOT without shard splits":
        root = tmp_path / "partial"
        root.mkdir()
        for name in ("train", "test", "outliers"):
            (root / name).symlink_to(demo_root / name)
        (root / "holdout").mkdir()  # a folder, but no manifest.json
        args[1] = str(root)
    elif case == "outlier pool not a split":
        args[2] = demo
    elif case == "OOD set missing":
        args.append(str(tmp_path / "places365"))
    elif case == "INTERPOLATE_WITH not an OOD set":
        env["INTERPOLATE_WITH"] = f"{demo}/test"
    elif case == "unknown method":
        env["METHODS"] = "oe mixup"
    elif case == "no sbatch":
        env["SBATCH"] = str(tmp_path / "no" / "sbatch")
    elif case == "no disttrain":
        env["DISTTRAIN"] = str(tmp_path / "no" / "disttrain")
    proc = run_pipeline(fake_slurm, *args, PIPELINE_DIR=str(tmp_path / "pipeline"), **env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr, proc.stderr
    assert not submitted(fake_slurm) and not (fake_slurm / "disttrain.log").exists()
