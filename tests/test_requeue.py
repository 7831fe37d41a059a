"""Preemption under submitit, as on a cluster: SIGUSR2 to a running job saves its step, submitit requeues
the job, and the new attempt resumes the run by itself (submitit's local executor stands in for SLURM:
it requeues a job that exits through submitit's requeue, exactly as the SLURM executor does)."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sbn_train.launcher import MAIN_PID_ENV, resume_overrides, resume_when_requeued, started_by_sweep
from test_cli import ONE_THREAD, SMALL

LONG, SHORT = 3000, 40        # steps of the preempted run (still running when signalled) and of its neighbour
EVAL_EVERY = 200


def test_resume_overrides_replace_resume_and_overwrite():
    assert resume_overrides(["estimator=nvil", "train.resume=false", "+train.overwrite=true", "seed=1"]) == \
        ["estimator=nvil", "seed=1", "train.resume=true"]
    assert resume_overrides(resume_overrides(["a=1"])) == ["a=1", "train.resume=true"]


def test_only_a_child_of_the_sweep_process_is_a_sweep_worker(monkeypatch):
    monkeypatch.delenv(MAIN_PID_ENV, raising=False)
    assert not started_by_sweep()                                   # a run started by hand
    monkeypatch.setenv(MAIN_PID_ENV, str(os.getpid()))
    assert not started_by_sweep()                                   # the sweep's own process
    monkeypatch.setenv(MAIN_PID_ENV, str(os.getppid()))
    assert started_by_sweep()                                       # a worker it started
    monkeypatch.setenv(MAIN_PID_ENV, str(os.getppid() + 100000))
    assert not started_by_sweep()                                   # submitit's jobs: another parent


def test_outside_submitit_nothing_is_requeued():
    assert not resume_when_requeued()


def wait_for(condition, timeout: float, proc: subprocess.Popen, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        assert proc.poll() is None, f"the sweep ended (rc {proc.returncode}) before {what}"
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def lock_pid(folder: Path) -> int | None:
    try:
        text = (folder / "run.lock").read_text().strip()
    except OSError:
        return None
    return int(text) if text else None


def test_preempted_job_is_requeued_and_resumes_by_itself(tmp_path):
    sweep = tmp_path / "sweep"
    args = [str(Path(sys.executable).parent / "sbn-train"), "-m", "hydra/launcher=submitit_local", *SMALL,
            "estimator=nvil", f"train.max_steps={LONG},{SHORT}", f"train.eval_every={EVAL_EVERY}",
            "variance.every=0", "device=cpu", f"hydra.sweep.dir={sweep}"]
    long, short = sweep / f"train.max_steps={LONG}", sweep / f"train.max_steps={SHORT}"
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen(args, cwd=tmp_path, stdout=out, stderr=err, env={**os.environ, **ONE_THREAD})
        try:
            wait_for(lambda: (long / "checkpoint.pt").exists() and lock_pid(long), 90, proc,
                     "the first checkpoint of the long run")
            saved_before = torch.load(long / "checkpoint.pt", weights_only=True)["step"]
            first_pid = lock_pid(long)
            os.kill(first_pid, signal.SIGUSR2)                      # what SLURM sends on preemption
            rc = proc.wait(timeout=150)
        finally:
            if proc.poll() is None:
                proc.kill()
    stderr = (tmp_path / "stderr").read_text()
    assert rc == 0, stderr[-3000:]

    results = json.loads((long / "results.json").read_text())
    assert (results["status"], results["step"]) == ("finished", LONG)
    assert json.loads((short / "results.json").read_text())["step"] == SHORT
    log = (long / "cli.log").read_text()                            # both attempts append to the run's log
    resumed = re.findall(rf"resumed from {re.escape(str(long / 'checkpoint.pt'))} at step (\d+)", log)
    assert len(resumed) == 1, log[-3000:]
    assert int(resumed[0]) > saved_before >= EVAL_EVERY             # the step at the signal, not step 0
    assert lock_pid(long) != first_pid                              # a new process ran the second attempt
    assert "already holds a run" not in log + stderr

    job_logs = {d: "".join(p.read_text() for p in d.glob("*_0_log.*")) for d in (sweep / ".submitit").glob("[0-9]*")}
    requeued = [d for d, text in job_logs.items() if "Requeued job" in text]
    assert len(requeued) == 1 and f"resumed from {long}" in job_logs[requeued[0]], list(job_logs)

    # every job's pickle now runs it with train.resume=true: the preempted one's through submitit's
    # checkpoint, the other one's since it started (a restart by SLURM itself resumes too). Each job is a
    # replica group of one run (train.replicas=1: hydra_plugins/sbn_train_submitit), its call a list of one.
    from submitit.core.utils import DelayedSubmission
    pickles = sorted((sweep / ".submitit").glob("*/*_submitted.pkl"))
    assert len(pickles) == 2
    for p in pickles:
        (overrides,) = DelayedSubmission.load(p).args[0]
        assert overrides[-1] == "train.resume=true" and overrides.count("train.resume=true") == 1, overrides
