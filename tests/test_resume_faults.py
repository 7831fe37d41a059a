"""Runs that survive what clusters do to them: kills at every named point, stop signals, changed configs,
hostile checkpoints, divergence, write failures, two writers on one folder. Each scenario is compared with
an uninterrupted run of the same command: results.json, every checkpoint tensor and every TensorBoard
scalar (``perf/*`` aside: wall-clock speed) must be identical."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_cli import ONE_THREAD, SMALL, sbn_train, scalars

# log_every does not divide eval_every, so a resume from an evaluation checkpoint starts mid log window
RUN = SMALL + ["estimator=nvil", "train.max_steps=30", "train.eval_every=10", "train.log_every=7",
               "variance.every=10", "variance.samples=3", "test.elbo_samples=5", "test.iwae_k=20"]


def flat(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from flat(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from flat(v, f"{prefix}/{i}")
    else:
        yield prefix, obj


def record(folder: Path) -> dict:
    """What a finished run leaves, minus wall-clock speed."""
    results = json.loads((folder / "results.json").read_text())
    results["metrics"] = {k: v for k, v in results["metrics"].items() if not k.startswith("perf/")}
    ckpt = dict(flat(torch.load(folder / "checkpoint.pt", weights_only=True)))
    best = dict(flat(torch.load(folder / "best.pt", weights_only=True)))
    tb = {k: v for k, v in scalars(folder).items() if not k.startswith("perf/")}
    return {"results": results, "checkpoint": ckpt, "best": best, "tb": tb}


def assert_same(a: dict, b: dict, what: str) -> None:
    assert a["results"] == b["results"], what
    assert a["tb"] == b["tb"], what
    for part in ("checkpoint", "best"):
        assert a[part].keys() == b[part].keys(), (what, part)
        for k, v in a[part].items():
            w = b[part][k]
            same = torch.equal(v, w) if torch.is_tensor(v) else v == w
            assert same, (what, part, k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted") / "run"
    out = sbn_train(*RUN, f"hydra.run.dir={folder}")
    assert out.returncode == 0, out.stderr
    return record(folder)


# (point, step): mid-step (after the backward pass, before the update), mid-checkpoint (temporary file
# written, not renamed), mid-evaluation, mid-test, mid-results (temporary file written, not renamed)
KILLS = [("step", 13), ("checkpoint", 20), ("eval", 20), ("test", 30), ("results", 30)]


@pytest.mark.parametrize("point,step", KILLS)
def test_kill_then_resume_is_exact(tmp_path, reference, point, step):
    folder = tmp_path / "run"
    killed = sbn_train(*RUN, f"hydra.run.dir={folder}", env={"SBN_TRAIN_KILL_AT": f"{point}:{step}"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (folder / "results.json").exists()
    resumed = sbn_train(*RUN, f"hydra.run.dir={folder}", "train.resume=true")
    assert resumed.returncode == 0, resumed.stderr
    assert_same(reference, record(folder), f"kill at {point}:{step}")


# a stop signal inside a step (saved after it), inside an evaluation (saved as before the step's jobs), and
# inside the final test (nothing to save: the checkpoint of the last step is there); SIGHUP: a closed terminal
SIGNALS = [("step", 13, "SIGTERM"), ("eval", 20, "SIGINT"), ("test", 30, "SIGUSR2"), ("step", 17, "SIGHUP")]


@pytest.mark.parametrize("point,step,sig", SIGNALS)
def test_stop_signal_saves_prints_one_line_and_resumes_exactly(tmp_path, reference, point, step, sig):
    folder = tmp_path / "run"
    stopped = sbn_train(*RUN, f"hydra.run.dir={folder}", env={"SBN_TRAIN_KILL_AT": f"{point}:{step}:{sig}"})
    signum = signal.Signals[sig]
    assert stopped.returncode == 128 + signum, stopped.stderr
    last = stopped.stderr.strip().splitlines()[-1]
    assert "Traceback" not in stopped.stderr
    # the command as this one was started (here: python -m sbn_train.cli), so that it works as printed
    assert last.startswith(f"sbn-train: stopped at step {step} ({sig}); continue with: {sys.executable} -m "
                           f"sbn_train.cli ")
    assert last.endswith("train.resume=true")
    saved = torch.load(folder / "checkpoint.pt", weights_only=True)
    assert saved["step"] == step                                   # no step lost
    resumed = sbn_train(*RUN, f"hydra.run.dir={folder}", "train.resume=true")
    assert resumed.returncode == 0, resumed.stderr
    assert_same(reference, record(folder), f"{sig} at {point}:{step}")


def test_changed_config_is_refused_by_key(tmp_path):
    folder = tmp_path / "run"
    first = sbn_train(*RUN, "train.max_steps=10", f"hydra.run.dir={folder}")
    assert first.returncode == 0, first.stderr
    changes = [(["estimator=reinforce_ma"], "estimator_choice: nvil -> reinforce_ma"),
               (["train.batch_size=10"], "train.batch_size: 20 -> 10"),
               (["seed=5"], "seed: 0 -> 5"),
               (["optim.lr=0.01"], "optim.lr: 0.0003 -> 0.01"),
               (["model.latent_sizes=[8,4]"], "model.latent_sizes: [8, 8] -> [8, 4]"),
               (["optim=adam"], "optim.name: rmsprop -> adam")]
    for override, expected in changes:
        out = sbn_train(*RUN, *override, "train.max_steps=20", f"hydra.run.dir={folder}", "train.resume=true")
        assert out.returncode == 2, (override, out.stderr)
        assert "Traceback" not in out.stderr and expected in out.stderr, (override, out.stderr)
        assert len(out.stderr.strip().splitlines()[-1]) > 0
    # keys that may change: the length of the run and what is measured
    ok = sbn_train(*RUN, "train.max_steps=20", "variance.every=0", "eval.iwae_k=3", f"hydra.run.dir={folder}",
                   "train.resume=true")
    assert ok.returncode == 0, ok.stderr


class Hostile:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["checkpoint.pt", "best.pt"])
def test_checkpoint_that_would_run_code_is_refused(tmp_path, name):
    folder = tmp_path / "run"
    first = sbn_train(*RUN, "train.max_steps=10", f"hydra.run.dir={folder}")
    assert first.returncode == 0, first.stderr
    (folder / "results.json").unlink()
    marker = tmp_path / "pwned"
    Hostile.marker = marker
    state = torch.load(folder / name, weights_only=True)
    state["extra"] = Hostile()
    torch.save(state, folder / name)
    out = sbn_train(*RUN, "train.max_steps=10", f"hydra.run.dir={folder}", "train.resume=true")
    assert out.returncode == 2, out.stderr
    assert not marker.exists()
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert f"cannot read checkpoint {folder / name} (refused: the file holds objects other than tensors" in last
    assert "weights_only" not in out.stderr


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    folder = tmp_path / "run"
    out = sbn_train(*SMALL, "estimator=reinforce", "optim.lr=10", "train.max_steps=1000", "train.eval_every=20",
                    "train.log_every=50", "variance.every=0", f"hydra.run.dir={folder}")
    assert out.returncode == 2, out.stderr
    assert "training diverged at step" in out.stderr and "Traceback" not in out.stderr
    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert json.loads((folder / "failed.json").read_text())["error"]


def test_a_second_writer_is_refused(tmp_path):
    folder = tmp_path / "run"
    env = {**os.environ, **ONE_THREAD}
    first = subprocess.Popen([sys.executable, "-m", "sbn_train.cli", *RUN, "train.max_steps=100000",
                              "train.eval_every=100000", "variance.every=0", f"hydra.run.dir={folder}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while not (folder / "run.lock").exists() or not (folder / "run.lock").read_text().strip():
            assert time.time() < deadline and first.poll() is None, "first run did not start"
            time.sleep(0.2)
        second = sbn_train(*RUN, "train.max_steps=100000", "train.eval_every=100000", "variance.every=0",
                           f"hydra.run.dir={folder}", "train.resume=true")
        assert second.returncode == 2, second.stderr
        assert f"is in use by process {first.pid}" in second.stderr and "Traceback" not in second.stderr
        assert not (folder / "failed.json").exists()      # the refused writer writes nothing there
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, first.stderr.read()


def test_unwritable_run_folder_is_one_line(tmp_path):
    if os.geteuid() == 0:
        # root ignores permission bits: fill the path of the run's config record with a directory instead
        folder = tmp_path / "run"
        (folder / ".hydra" / "config.yaml").mkdir(parents=True)
        (folder / ".hydra" / "config.yaml" / "x").write_text("")
    else:
        folder = tmp_path / "run"
        folder.mkdir()
        os.chmod(folder, 0o500)
    out = sbn_train(*RUN, "train.max_steps=10", f"hydra.run.dir={folder}")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "cannot write" in out.stderr or "Permission denied" in out.stderr
