"""Runs on shared machines and in batch logs: the CPU thread policy, and plain progress lines in files."""
import logging
import os
import subprocess
import sys

import pytest

from sbn_train.cli import command_line, tool
from sbn_train.progress import StepLines
from sbn_train.threads import choose_threads, parse_threads

from test_cli import ONE_THREAD, SMALL

JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
BASIC = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


# ----- the thread policy ---------------------------------------------------------------------------
@pytest.mark.parametrize("launcher, environ, cores, want", [
    (None, {}, 8, 8),                                                  # one run: every usable core
    ({"_target_": BASIC}, {}, 8, 8),                                   # a sweep run one job after another
    ({"_target_": JOBLIB, "n_jobs": 2}, {}, 2, 1),                     # 2 jobs on 2 cores: 1 thread each
    ({"_target_": JOBLIB, "n_jobs": 3}, {}, 8, 2),
    ({"_target_": JOBLIB, "n_jobs": 16}, {}, 8, 1),                    # at least 1
    ({"_target_": JOBLIB, "n_jobs": -1}, {}, 8, 1),                    # joblib: -1 is one job per core
    ({"_target_": JOBLIB, "n_jobs": -2}, {}, 8, 1),                    # ... -2: all cores but one
    ({"_target_": JOBLIB, "n_jobs": -7}, {}, 8, 4),                    # ... -7: 2 jobs
    ({"_target_": SLURM, "cpus_per_task": 4}, {}, 64, 4),
    ({"_target_": SLURM, "cpus_per_task": 4}, {"SLURM_CPUS_PER_TASK": "6"}, 64, 6),
    ({"_target_": SLURM, "cpus_per_task": 4}, {}, 2, 2),               # never more than the usable cores
    (None, {"OMP_NUM_THREADS": "1"}, 8, 1),                            # a lower count in the environment
    (None, {"OMP_NUM_THREADS": "32"}, 8, 8),                           # ... a higher one is not
])
def test_auto_threads(launcher, environ, cores, want):
    n, why = choose_threads("auto", launcher, environ, cores)
    assert n == want, why
    assert why.startswith("threads=auto")


def test_explicit_threads_win():
    assert choose_threads("3", {"_target_": JOBLIB, "n_jobs": 2}, {"OMP_NUM_THREADS": "1"}, 2)[0] == 3
    assert choose_threads(5, None, {}, 2)[0] == 5                      # an int from the command line


@pytest.mark.parametrize("bad", ["0", "-1", "abc", "1.5", "", "2x"])
def test_bad_threads_values_raise(bad):
    with pytest.raises(ValueError, match="threads must be auto or a positive whole number"):
        parse_threads(bad)


@pytest.mark.parametrize("bad", ["0", "-2", "many"])
def test_bad_threads_one_line_exit_2_nothing_written(tmp_path, bad):
    out = subprocess.run([sys.executable, "-m", "sbn_train.cli", *SMALL, f"threads={bad}",
                          f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True,
                         env={**os.environ, **ONE_THREAD}, timeout=300)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sbn-train: error: threads must be auto or a positive"), lines
    assert not (tmp_path / "run").exists()


# ----- plain progress lines ------------------------------------------------------------------------
class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_step_lines_first_every_30_s_and_last(caplog):
    clock = FakeClock()
    lines = StepLines(total=1000, initial=0, min_seconds=30.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="sbn_train"):
        for step in range(1, 1001):
            clock.t += 0.25                       # 4 steps/s
            lines.update(1)
            if step % 100 == 0:                   # train.log_every = 100 (the loop logs, then evaluates)
                lines.set_postfix(elbo=f"{-100.0 - step / 1000:.2f}", refresh=False)
            if step == 500:                       # an evaluation of 100 s: not in the rate
                clock.t += 100.0
                lines.unpause()
    got = [r.getMessage() for r in caplog.records]
    # 100 steps take 25 s: the first log, then the next log 30 s or more after a line, then the last step
    assert [g.split(":")[0] for g in got] == ["step 100/1,000 (10%)", "step 300/1,000 (30%)",
                                              "step 500/1,000 (50%)", "step 600/1,000 (60%)",
                                              "step 800/1,000 (80%)", "step 1,000/1,000 (100%)"]
    assert got[0] == "step 100/1,000 (10%): 4.0 steps/s, ETA 3 min 45 s, running ELBO -100.10"
    assert got[3] == "step 600/1,000 (60%): 4.0 steps/s, ETA 1 min 40 s, running ELBO -100.60"   # 100 s left out
    assert got[5] == "step 1,000/1,000 (100%): 4.0 steps/s, running ELBO -101.00"


def test_step_lines_wait_for_the_next_log_step(caplog):
    """Slow steps: a line at every logged step, never between them."""
    clock = FakeClock()
    lines = StepLines(total=10, initial=4, clock=clock)       # resumed at step 4
    with caplog.at_level(logging.INFO, logger="sbn_train"):
        for step in range(5, 11):
            clock.t += 40.0
            lines.update(1)
            if step % 3 == 0:
                lines.set_postfix(elbo="-90.00")
    got = [r.getMessage() for r in caplog.records]
    assert got == ["step 6/10 (60%): 0.0 steps/s, ETA 2 min 40 s, running ELBO -90.00",
                   "step 9/10 (90%): 0.0 steps/s, ETA 40 s, running ELBO -90.00"]


def test_cli_output_to_a_file_holds_plain_lines(tmp_path):
    """A run with its output redirected (progress on, as by default): no bar redraws (carriage returns),
    the plain step lines, the evaluation lines and the CPU thread line."""
    args = [a for a in SMALL if a != "train.progress=false"]
    args += ["train.max_steps=4", "train.eval_every=2", "train.log_every=2", "variance.every=4",
             "variance.samples=5", f"hydra.run.dir={tmp_path / 'run'}"]
    log = tmp_path / "log.txt"
    env = {**{k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}, **ONE_THREAD}
    with open(log, "w") as f:
        out = subprocess.run([sys.executable, "-m", "sbn_train.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                             env=env, timeout=600)
    text = log.read_text()
    assert out.returncode == 0, text
    assert "\r" not in text
    assert "step 2/4 (50%)" in text and "step 4/4 (100%)" in text and "running ELBO" in text
    assert "evaluating valid: 100 rows ..." in text and "evaluating valid: done in" in text
    assert "CPU threads: 1 (threads=auto: OMP_NUM_THREADS=1;" in text
    assert "OMP_WAIT_POLICY=PASSIVE)" in text                 # set by the CLI when the environment has none
    # what the final test costs, said at the start; the variance probe's start and end
    assert ("the final test (test.*): 100 rows x (20 ELBO samples + K = 100) = 12,000 samples, 5.0x one "
            "evaluation (2.5x all 2 of this run)") in text   # (100 + 300) x (1 + 5) = 2,400 per evaluation
    assert "variance probe: M = 5 estimates per view (minibatch, latent, exact) ..." in text
    assert "variance probe: done in" in text
    # the last lines: where the results are, and TensorBoard on the folder above the run
    folder = (tmp_path / "run").resolve()
    last = [line.split(" - ", 1)[1] for line in text.strip().splitlines()[-3:]]
    assert last == [f"run folder: {folder}", f"results: {folder / 'results.json'}",
                    f"TensorBoard (this run is run there): {tool('tensorboard')} --logdir {folder.parent}"], last
    # the same command again: refused, saying the run there finished
    again = subprocess.run([sys.executable, "-m", "sbn_train.cli", *args], capture_output=True, text=True,
                           env={**os.environ, **ONE_THREAD}, timeout=600)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"sbn-train: error: {tmp_path / 'run'} already holds a run (finished at step 4). Continue it with "
        f"train.resume=true, discard it with train.overwrite=true, or set hydra.run.dir=<another folder>"]


def test_evaluation_bar_only_on_a_terminal(capsys, caplog):
    """stderr not a terminal (here: captured): the start and end lines, no bar."""
    import torch

    from sbn_train.evaluation import split_bounds
    from sbn_train.progress import Progress
    from conftest import random_sbn
    model = random_sbn(x_dim=6, latent_sizes=(3, 2), seed=4)
    data = torch.rand(30, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.INFO, logger="sbn_train"):
        split_bounds(model, data, 10, None, 7, 1, 2, 64, progress=Progress("evaluating valid", enabled=True))
    assert capsys.readouterr().err == ""
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["evaluating valid"] * 2


# ----- commands that work as printed, help into a closed pipe ---------------------------------------
def test_printed_commands_follow_how_sbn_train_was_started(monkeypatch, tmp_path):
    monkeypatch.delenv("MAKELEVEL", raising=False)
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "venv" / "bin" / "sbn-train")])   # not on PATH
    assert command_line(["estimator=nvil", "train.resume=true"]) == \
        f"{tmp_path / 'venv' / 'bin' / 'sbn-train'} estimator=nvil train.resume=true"
    (tmp_path / "Makefile").write_text("run:\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MAKELEVEL", "1")                         # started by make run
    assert command_line(["optim.lr=1e-3", "train.resume=true"]) == "make run ARGS='optim.lr=1e-3 train.resume=true'"
    monkeypatch.setattr(sys, "argv", ["/x/sbn_train/cli.py"])    # python -m sbn_train.cli
    assert command_line(["seed=1"]) == f"{sys.executable} -m sbn_train.cli seed=1"


def test_tool_is_the_path_next_to_python_unless_on_path(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    here = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    assert tool("tensorboard") == (here if os.path.exists(here) else "tensorboard")
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable))
    assert tool("tensorboard") == "tensorboard"


def test_help_into_a_closed_pipe_exits_quietly():
    """``sbn-train --help | head``: the reader is gone before the help is written."""
    p = subprocess.Popen([sys.executable, "-m", "sbn_train.cli", "--help"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env={**os.environ, **ONE_THREAD})
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 0 and err == "", err


def test_quick_experiment_is_every_phase_made_small():
    """experiment=quick composes, passes the value checks, and runs each phase of the default job, small."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sbn_train.config import register_configs, validate
    from sbn_train.paths import config_dir
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        default = OmegaConf.to_object(compose("config"))
        quick = OmegaConf.to_object(compose("config", overrides=["experiment=quick"]))
    validate(quick)
    assert (quick.model, quick.optim, quick.train.batch_size) == (default.model, default.optim,
                                                                  default.train.batch_size)
    assert quick.train.max_steps < default.train.max_steps and quick.test.enabled and quick.variance.every
    # TensorBoard (Time Series) draws one point as a lone dot, and by default scales a chart of 3 to 21
    # points to its 5th-95th percentile, leaving out the first and the last: two points are a whole line
    for every in (quick.variance.every, quick.train.eval_every):
        assert quick.train.max_steps // every == 2, every
    assert quick.test.limit * (quick.test.elbo_samples + quick.test.iwae_k) < \
        10_000 * (default.test.elbo_samples + default.test.iwae_k) / 50   # the final test shrunk too
