"""``sbn-train -m ... train.replicas=N``: a sweep's jobs as replica groups, through the real CLI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_cli import SMALL, sbn_train
from test_resume_faults import assert_same, record

RUN = SMALL + ["estimator=nvil", "train.max_steps=30", "train.eval_every=10", "train.log_every=7",
               "variance.every=10", "variance.samples=3", "test.elbo_samples=5", "test.iwae_k=20"]
SWEEP = ["seed=0,1", "optim.lr=1e-3,3e-3"]
REPORT = Path(__file__).resolve().parents[1] / "scripts" / "report.py"


def sweep(folder: Path, *extra: str, env=None):
    return sbn_train("-m", *RUN, *SWEEP, f"hydra.sweep.dir={folder}", *extra, env=env)


def runs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grouped")
    out = sweep(folder, "train.replicas=3")
    assert out.returncode == 0, out.stderr
    assert "4 finished, 0 failed" in out.stderr
    return folder


def test_replica_sweep_reports_like_a_serial_sweep(grouped, tmp_path):
    """The same four jobs one at a time: the same folders, and report.py gives the same rows and columns
    (values agree to float32 rounding of the batched products)."""
    serial = tmp_path / "serial"
    out = sweep(serial)
    assert out.returncode == 0, out.stderr
    assert [p.name for p in runs(serial)] == [p.name for p in runs(grouped)]
    for a, b in zip(runs(serial), runs(grouped)):
        ra, rb = (json.loads((p / "results.json").read_text()) for p in (a, b))
        assert ra["hparams"] == rb["hparams"] and ra["step"] == rb["step"] == 30
        assert sorted(ra["metrics"]) == sorted(rb["metrics"])
        for k, v in ra["metrics"].items():
            if not k.startswith("perf/") and isinstance(v, float):
                assert rb["metrics"][k] == pytest.approx(v, rel=1e-3, abs=1e-3), (a.name, k)
    tables = []
    for folder in (serial, grouped):
        rep = subprocess.run([sys.executable, str(REPORT), str(folder)], capture_output=True, text=True)
        assert rep.returncode == 0, rep.stderr
        tables.append([line.split("|")[1:3] for line in rep.stdout.splitlines() if line.startswith("|")])
    assert tables[0] == tables[1] and len(tables[0]) > 2


@pytest.mark.parametrize("fault", ["eval:20:SIGTERM", "checkpoint:20", "step:17"])
def test_a_stopped_or_killed_group_resumes_exactly(grouped, tmp_path, fault):
    """A signal or a kill -9 inside the group, then the same command with train.resume=true: every run's
    results.json, checkpoint, best model and TensorBoard scalars equal the uninterrupted group's."""
    folder = tmp_path / "sweep"
    out = sweep(folder, "train.replicas=3", env={"SBN_TRAIN_KILL_AT": fault})
    assert out.returncode != 0
    if "SIGTERM" in fault:
        assert "continue with:" in out.stderr and "train.resume=true" in out.stderr
    out = sweep(folder, "train.replicas=3", "train.resume=true")
    assert out.returncode == 0, out.stderr
    for a, b in zip(runs(grouped), runs(folder)):
        assert_same(record(a), record(b), f"{fault} {a.name}")


def test_bad_cap_is_refused(tmp_path):
    out = sweep(tmp_path / "s", "train.replicas=0")
    assert out.returncode == 2 and "train.replicas" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_other_launchers_run_the_jobs_one_by_one(tmp_path):
    """train.replicas with a launcher that starts each job on its own (here joblib): one warning line, and
    every job runs as an ordinary run."""
    out = sweep(tmp_path / "s", "train.replicas=2", "hydra/launcher=local", "hydra.launcher.n_jobs=1")
    assert out.returncode == 0, out.stderr
    assert "replica groups need Hydra's basic launcher" in out.stderr and "4 finished, 0 failed" in out.stderr
    assert "waits for its replica group" not in out.stderr
