"""Every estimator config trains 20 steps through the real CLI (one Hydra multirun per model) on synthetic data."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sbn_train.config import register_configs
from sbn_train.estimators import available_estimators, estimator_from_config
from sbn_train.models import SBN
from sbn_train.paths import config_dir

register_configs()

SMALL = ["dataset=synthetic", "dataset.n_train=200", "dataset.n_valid=100", "dataset.n_test=100",
         "train.batch_size=20", "train.max_steps=20", "train.eval_every=20", "train.log_every=10",
         "variance.every=0", "eval.limit=100", "eval.iwae_k=5", "eval.train_split=false", "eval.images=0",
         "test.enabled=false", "train.progress=false", "device=cpu"]
TRAINABLE = [n for n in available_estimators() if n != "exact"]     # exact needs <= 20 latent units


def multirun(tmp_path: Path, *overrides: str) -> dict[tuple[str, str], Path]:
    """Run one sweep; returns {(estimator, model): run folder} for every job that wrote results.json.

    One intra-op thread: these steps are small, and on a busy 2-core machine two spinning OpenMP threads
    per process slow them down many times over."""
    sweep = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "-m", "sbn_train.cli", "-m", *SMALL, *overrides,
                        f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}"],
                       capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    runs = {}
    for folder in sweep.iterdir():
        if (folder / "results.json").exists():
            hp = json.loads((folder / "results.json").read_text())["hparams"]
            runs[(hp["estimator"], hp["model"])] = folder
    return runs


def scalar_tags(folder: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def assert_trained(folder: Path, what) -> None:
    results = json.loads((folder / "results.json").read_text())
    assert results["step"] == 20, what
    for key in ("bounds/train/elbo", "bounds/valid/elbo", "bounds/valid/iwae5"):
        assert math.isfinite(results["metrics"][key]), (what, key, results["metrics"])


@pytest.mark.parametrize("model", ["sbn_2layer", "sbn_nonlinear"])
def test_every_estimator_trains_20_steps(model, tmp_path):
    runs = multirun(tmp_path, f"model={model}", "estimator=" + ",".join(TRAINABLE))
    missing = sorted(set(TRAINABLE) - {e for e, _ in runs})
    assert not missing, f"no results for {missing}"
    for (est, _), folder in runs.items():
        assert_trained(folder, est)
    # VIMCO reports its K-sample bound beside the ELBO; REBAR/RELAX log their learned temperature and eta
    assert {"bounds/train/elbo", "estimator/iwae5"} <= scalar_tags(runs[("vimco", model)])
    assert {"estimator/temperature1", "estimator/eta2"} <= scalar_tags(runs[("relax", model)])


def test_exact_trains_20_steps_on_a_small_model(tmp_path):
    runs = multirun(tmp_path, "estimator=exact", "model=sbn_2layer,sbn_nonlinear", "model.latent_sizes=[3,3]")
    assert set(runs) == {("exact", "sbn_2layer"), ("exact", "sbn_nonlinear")}
    for key, folder in runs.items():
        assert_trained(folder, key)


def test_marginal_n_samples_from_the_command_line():
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = compose("config", overrides=["estimator=marginal", "estimator.n_samples=3"])
    est = estimator_from_config(OmegaConf.to_container(cfg.estimator, resolve=True), SBN(5, [3, 3]))
    assert est.n_samples == 3
