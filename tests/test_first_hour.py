"""What a new user meets first: progress of long phases, the evaluation's arithmetic, the phase benchmark,
one-line errors that leave nothing behind, readable run names, the sweep summary, the help text, the
dashboard layout and the install layout."""
import ctypes
import logging
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import sbn_train.models as models
from sbn_train.evaluation import logged_views, parameter_groups, split_bounds, summarize, with_log10
from sbn_train.jobs import TRAIN_ELBO
from sbn_train.metrics import (METRICS, bounds_prefix, current_scalars, custom_scalars_layout, hparam_tags,
                               in_tensorboard, log10_tag, lookup)
from sbn_train.progress import Progress

from conftest import random_sbn
from test_cli import ONE_THREAD, SMALL, compare_tags, sbn_train, time_series_groups

ROOT = Path(__file__).resolve().parent.parent
TINY = [*SMALL, "train.max_steps=2", "train.eval_every=2", "variance.every=0"]


# ----- progress of long phases ---------------------------------------------------------------------
def test_split_bounds_progress_lines_bar_and_same_numbers(caplog, capsys, monkeypatch):
    monkeypatch.setattr("sbn_train.progress.terminal", lambda: True)      # bars are for terminals only
    model = random_sbn(x_dim=6, latent_sizes=(3, 2), seed=4)
    data = torch.rand(70, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    args = (model, data, 20, 50, 7, 3, 4, 64)
    plain = split_bounds(*args)
    with caplog.at_level(logging.INFO, logger="sbn_train"):
        shown = split_bounds(*args, progress=Progress("evaluating valid", enabled=True))
    err = capsys.readouterr().err
    quiet_progress = Progress("evaluating train", enabled=False)
    with caplog.at_level(logging.INFO, logger="sbn_train"):
        quiet = split_bounds(*args, progress=quiet_progress)
    assert capsys.readouterr().err == ""                          # disabled: no bar
    for got in (shown, quiet):                                    # progress changes no number
        assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])
    assert "evaluating valid" in err and "rows" in err            # the bar (tqdm on stderr)
    lines = [r.getMessage() for r in caplog.records]
    for name in ("evaluating valid", "evaluating train"):
        assert f"{name}: 50 rows ..." in lines, lines              # limit=50 of the 70 rows
        done = [line for line in lines if line.startswith(f"{name}: done in ")]
        assert len(done) == 1 and re.search(r"done in \d+\.\d s \([\d,]+ rows/s\)$", done[0]), done
    assert quiet_progress.rows == 50 and quiet_progress.seconds > 0


def test_progress_phase_that_fails_logs_no_end_line(caplog):
    progress = Progress("evaluating test", enabled=False)
    with caplog.at_level(logging.INFO, logger="sbn_train"), pytest.raises(RuntimeError):
        with progress.track(10) as done:
            done(4)
            raise RuntimeError("boom")
    assert [r.getMessage() for r in caplog.records] == ["evaluating test: 10 rows ..."]


# ----- the evaluation's arithmetic -----------------------------------------------------------------
@pytest.mark.parametrize("n_hidden,dtype", [(0, torch.float64), (0, torch.float32), (1, torch.float32)])
def test_log_weights_match_the_definition_to_rounding(monkeypatch, n_hidden, dtype):
    """log_weights arranges the work differently (first layer once per data row, logits kept, blocks of
    sample rows) but computes the numbers of log_joint - log_q on the repeated rows with the same uniforms.
    Only the first layer's matrix product has fewer rows, and BLAS may round a row differently when the row
    count changes; that product's rounding error (at most n eps sum |w||v| per logit, n = inputs + 1) moves
    each log-probability term by at most as much (their slopes in a logit lie in [-1, 1]), hence the bound."""
    model = random_sbn(x_dim=9, latent_sizes=(5, 4, 3), n_hidden=n_hidden, seed=6).to(dtype)
    x = (torch.rand(7, 9, generator=torch.Generator().manual_seed(1)) < 0.5).to(dtype)
    samples = 11
    monkeypatch.setattr(models, "EVAL_BLOCK_ROWS", 20)          # blocks of 2 samples, and a partial last block
    got = model.log_weights(x, samples, torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    try:                                                        # and with 2 threads
        torch.set_num_threads(2)
        unblocked = model.log_weights(x, samples, torch.Generator().manual_seed(3))
    finally:
        torch.set_num_threads(threads)
    xr = x.repeat(samples, 1)
    with torch.no_grad():
        zs = model.sample_q(xr, model.draw_uniforms(xr.shape[0], torch.Generator().manual_seed(3), dtype=dtype))
        want = (model.log_joint(xr, zs) - model.log_q(xr, zs)).view(samples, 7)
        first = model.q_nets[0].first
        u = model.q_input(1, x).abs()
        n = x.shape[1] + 1
        # per logit of the first product, then through the tanh tail (slope <= 1, each layer at most as
        # wide as its input): the sum over units of the bound, times 2 (log q and the next layer's input)
        per_row = n * torch.finfo(dtype).eps * (u @ first.weight.abs().T + first.bias.abs()).sum(-1)
        for lin in [m for m in model.q_nets[0].rest if isinstance(m, torch.nn.Linear)]:
            per_row = per_row * lin.weight.abs().sum(0).max()
        bound = 2 * per_row
    for result in (got, unblocked):
        assert torch.all((result - want).abs() <= bound), ((result - want).abs().max(), bound.min())
    assert torch.equal(model.elbo(x, torch.Generator().manual_seed(3)),
                       model.log_weights(x, 1, torch.Generator().manual_seed(3))[0])


def test_bench_phases_prints_projection_and_floor_ratio():
    script = ROOT / "scripts" / "bench_phases.py"
    r = subprocess.run([sys.executable, str(script), "--data", "random", "--steps", "2", "--test-rows", "20",
                        "--threads", "1", "model.latent_sizes=[8,8]", "eval.limit=60", "eval.train_limit=60",
                        "eval.iwae_k=5", "variance.samples=3", "test.elbo_samples=5", "test.iwae_k=20",
                        "estimator=nvil"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, **ONE_THREAD})
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    for phase, count in (("training steps", "10,000"), ("evaluations", "10"), ("variance probes", "5"),
                         ("final test (from 20 of 10,000 rows)", "1")):
        row = next(line for line in out.splitlines() if line.startswith(phase))
        assert row.split()[-4] == count and row.endswith("%"), row
    assert re.search(r"total .* [\d.]+ m$", out, re.M)
    assert re.search(r"evaluation: 120 data rows \(720 sample rows", out), out
    ratio = float(re.search(r"evaluation / matrix-product floor = ([\d.]+)", out).group(1))
    assert ratio > 0


# ----- one-line errors that leave nothing behind ---------------------------------------------------
@pytest.mark.parametrize("args,message", [
    (["+train.max_step=10"], "train.max_step is not a config key; did you mean train.max_steps?"),
    (["+foo=1"], "foo is not a config key"),
    (["train.batchsize=3"], "train.batchsize is not a config key; did you mean train.batch_size?"),
    (["+dataset.foo=1"], "dataset.foo is not an option of dataset synthetic"),
    (["+estimator.foo=1"], "estimator.foo is not an option of Marginal"),
    (["optim.lr=nan"], "optim.lr must be positive and finite, got nan"),
    (["optim.lr=inf"], "optim.lr must be positive and finite, got inf"),
    (["train.divergence_nats=nan"], "train.divergence_nats must be >= 0 and finite, got nan"),
    (["optim.beta2=1.5"], "optim.beta2 must be in [0, 1), got 1.5"),
    (["estimator=nope"], "Could not find 'estimator/nope' (options: arm, disarm"),
    (["estimator=margnal"], "Could not find 'estimator/margnal'; did you mean marginal? (options: arm, disarm"),
    (["model=sbn_2layers"], "Could not find 'model/sbn_2layers'; did you mean sbn_2layer? (options: categorical_1layer, categorical_2layer, categorical_vae, sbn_1layer"),
])
def test_config_errors_one_line_exit_2_no_folder(tmp_path, args, message):
    r = sbn_train(*TINY, *args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith("sbn-train: error: ") and message in lines[0], r.stderr
    assert list(tmp_path.iterdir()) == [], "a config error must leave no run folder"


def test_folder_of_a_previous_run_is_left_untouched(tmp_path):
    run = tmp_path / "run"
    assert sbn_train(*TINY, f"hydra.run.dir={run}").returncode == 0
    before = {p: p.read_bytes() for p in (run / ".hydra").iterdir()}
    r = sbn_train(*TINY, "optim.lr=0.01", f"hydra.run.dir={run}")       # another config, same folder
    assert r.returncode == 2 and "already holds a run" in r.stderr and "Traceback" not in r.stderr
    assert {p: p.read_bytes() for p in (run / ".hydra").iterdir()} == before


def _without_dac_override():
    """In the child: drop the capabilities that let root ignore file permissions (from the bounding set,
    which bounds what root gets at exec), so a read-only folder is read-only for root too."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):                                  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:          # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_unwritable_data_dir_one_line(tmp_path):
    data = tmp_path / "readonly"
    data.mkdir()
    data.chmod(0o555)
    args = [sys.executable, "-m", "sbn_train.cli", "dataset=fashion_mnist", f"dataset.data_dir={data}",
            "train.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, env={**os.environ, **ONE_THREAD},
                       preexec_fn=_without_dac_override if os.geteuid() == 0 else None)
    data.chmod(0o755)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0] == (f"sbn-train: error: cannot use the data folder (dataset.data_dir={data}): "
                        f"{data / 'fashion_mnist'}: Permission denied"), lines[0]


# ----- run names -----------------------------------------------------------------------------------
def _run_dir(overrides):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    import sbn_train.cli  # noqa: F401  (registers the run_name resolver)
    from sbn_train.paths import config_dir
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    OmegaConf.update(cfg, "hydra.mode", "RUN")
    return Path(str(cfg.hydra.run.dir)).name


def test_single_run_names_always_hold_estimator_and_model():
    assert _run_dir([]) == "estimator=marginal,model=sbn_2layer"
    assert _run_dir(["train.max_steps=5"]) == "estimator=marginal,model=sbn_2layer,train.max_steps=5"
    assert _run_dir(["optim.lr=0.001", "model=sbn_1layer", "estimator=nvil", "dataset=synthetic"]) == \
        "estimator=nvil,model=sbn_1layer,dataset=synthetic,optim.lr=0.001"
    # places and switches that change nothing computed are never in a name
    assert _run_dir(["dataset.data_dir=/tmp/x/y", "train.resume=true", "device=cpu", "train.progress=false"]) == \
        "estimator=marginal,model=sbn_2layer"


def test_long_override_list_gets_a_short_stable_name(tmp_path):
    extra = ["optim.alpha=0.95", "eval.seed=3", "test.seed=4", "eval.batch_size=50", "test.batch_size=50",
             "train.log_every=2", "eval.images=4", "optim.eps=1e-7", f"dataset.data_dir={tmp_path / 'data'}"]
    overrides = [*TINY, *extra]
    assert len(overrides) >= 17
    name = _run_dir(overrides)
    assert len(name) <= 120 and name.startswith("estimator=marginal,model=sbn_2layer,dataset=synthetic,"), name
    assert re.search(r",\+\d+_more-[0-9a-f]{8}$", name) and "data_dir" not in name, name
    assert _run_dir(list(reversed(overrides))) == name                       # stable
    assert _run_dir([*overrides, "seed=1"]) != name                          # distinct
    r = sbn_train(*overrides, cwd=tmp_path)                                  # and the real command works
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "outputs" / "runs" / name / "results.json").exists()


# ----- the summary of a multirun -------------------------------------------------------------------
def test_multirun_with_failing_jobs_prints_summary_and_fails(tmp_path):
    sweep = tmp_path / "sweep"
    r = sbn_train("-m", *TINY, "optim.lr=0.001,nan,-1", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr
    tail = r.stderr.strip().splitlines()
    start = next(i for i, line in enumerate(tail) if line.startswith("sbn-train: 1 finished, 2 failed"))
    assert sorted(tail[start + 1:]) == [
        "  failed: optim.lr=-1: ConfigError: optim.lr must be positive and finite, got -1.0",
        "  failed: optim.lr=nan: ConfigError: optim.lr must be positive and finite, got nan"], tail[start:]
    assert (sweep / "optim.lr=0.001" / "results.json").exists()


# ----- help ------------------------------------------------------------------------------------------
def test_help_is_about_sbn_train():
    r = sbn_train("--help")
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith("sbn-train: ") and "Hydra" not in first, first
    for hidden in ("base_model", "base_optim", "schema", "powered by Hydra"):
        assert hidden not in r.stdout, hidden
    groups = dict(re.findall(r"^  (\w+)=\s+(.*)$", r.stdout, re.M))
    assert "marginal" in groups["estimator"] and groups["optim"] == "adam, rmsprop", groups
    models = re.split(r"^  \w+=", r.stdout.split("  model=", 1)[1], maxsplit=1, flags=re.M)[0]   # may wrap
    assert " ".join(models.split()) == ("categorical_1layer, categorical_2layer, categorical_vae, sbn_1layer, "
                                        "sbn_2layer, sbn_4layer, sbn_nonlinear"), models


# ----- dashboards ------------------------------------------------------------------------------------
def test_probe_values_come_with_their_log10():
    out = with_log10({"grad_var/inference": 1e-3, "grad_var/layer2": 0.0, "grad_bias/generative": 100.0})
    assert out["grad_var_log10/inference"] == pytest.approx(-3.0)
    assert out["grad_bias_log10/generative"] == pytest.approx(2.0)
    assert "grad_var_log10/layer2" not in out                       # no log of a zero variance
    for tag in out:
        assert lookup(tag) is not None and lookup(tag).source == "variance", tag
    assert log10_tag("grad_var_latent/layer3") == "grad_var_log10_latent/layer3"
    assert log10_tag("grad_mse/generative") == "grad_mse_log10/generative"


def test_tensorboard_tag_order_is_its_frontends():
    """compare_tags is TensorBoard's order: '/' and digits before letters, numbers by value."""
    assert compare_tags("grad_var/inference", "grad_var_log10/inference") < 0
    assert compare_tags("bounds/valid/iwae5", "bounds/valid/iwae50") < 0 < compare_tags("iwae100", "iwae50")
    assert compare_tags("bounds/x", "estimator/x") < 0 < compare_tags("test/elbo", "images/data")
    assert compare_tags("a", "a") == 0 and compare_tags("a", "ab") < 0
    assert [g for g, _ in time_series_groups(["valid/elbo", "grad_var/inference", "images/data"])] == \
        ["grad_var", "images", "valid"]          # the order a run's cards had before the bounds moved


def _run_tags(n_layers: int = 2, k: int = 50, test_k: int = 1000) -> list[str]:
    """The TensorBoard tags a run writes, made by the functions that name them: every probe view, the
    bounds during training, the final test, perf, an estimator's own metric, the images."""
    model = random_sbn(x_dim=4, latent_sizes=(2,) * n_layers)
    probe = {tag: 1e-3 for family in ("grad_var", "grad_var_latent", "grad_bias", "grad_mse")
             for tag in parameter_groups(model, family)}
    x = torch.zeros(3)
    values = {**with_log10(probe), TRAIN_ELBO: -90.0, "perf/step_time_ms": 5.0, "perf/steps_per_s": 200.0,
              "estimator/baseline": 1.0, **summarize(bounds_prefix("valid"), x, x, k),
              f"{TRAIN_ELBO}_eval": -90.0, **summarize(bounds_prefix("train"), x, x, k),
              **summarize("test", x, x, test_k, with_se=True)}
    assert all(lookup(t) is not None for t in values), [t for t in values if lookup(t) is None]
    return [t for t in values if in_tensorboard(t)] + ["images/data", "images/samples", "images/reconstructions"]


def test_time_series_shows_the_bounds_first_and_variances_as_log10():
    """The first screen of TensorBoard (Time Series tab): the bounds during training come first; every
    gradient-variance card is log10 (a linear one spans a sliver of its axis); HParams metrics are scalars."""
    tags = _run_tags()
    groups = time_series_groups(tags)
    assert groups[0] == ("bounds", ["bounds/train/elbo", "bounds/train/elbo_eval", "bounds/train/iwae50",
                                    "bounds/valid/elbo", "bounds/valid/iwae50"]), groups
    assert not any(t.startswith("grad_") and "_log10" not in t.split("/")[0] for t in tags), tags
    assert {"grad_var_log10/inference", "grad_var_log10_latent/layer2", "grad_bias_log10/generative"} <= set(tags)
    # the two groups TensorBoard opens at first: the bounds and the paper's protocol (without the exact view)
    plain = [t for t in tags if not t.startswith(("grad_bias", "grad_mse", "estimator/"))]
    assert [g for g, _ in time_series_groups(plain)][:3] == ["bounds", "grad_var_log10", "grad_var_log10_latent"]
    assert set(hparam_tags(tags)) == set(hparam_tags({*tags, "grad_var/inference", "test/elbo_se"}))
    for m in METRICS:
        assert m.scalar or not (m.hparam or m.chart), m      # a metric TensorBoard shows is a scalar
    for n_layers in (1, 4):
        assert time_series_groups(_run_tags(n_layers, k=5, test_k=5))[0][0] == "bounds"


def test_older_runs_read_under_todays_tags():
    """scripts/report.py reads runs written before the bounds moved under bounds/ and before the log10
    tags: their tags renamed, series merged by step (a run resumed across the change), log10 derived."""
    old = {"valid/elbo": [(2, -95.0), (4, -91.0)], "bounds/valid/elbo": [(6, -89.0)],
           "valid/iwae50": [(2, -90.0)], "train/elbo": [(1, -99.0)], "test/elbo": [(6, -88.0)],
           "grad_var/inference": [(2, 1e-2), (4, 0.0)], "grad_var_log10/layer1": [(2, -3.0)],
           "grad_var_latent_log10/inference": [(2, -4.0)], "grad_var_latent/layer2": [(2, 1e-5)]}
    new = current_scalars(old)
    assert new["bounds/valid/elbo"] == [(2, -95.0), (4, -91.0), (6, -89.0)]
    assert new["bounds/valid/iwae50"] == [(2, -90.0)] and new["bounds/train/elbo"] == [(1, -99.0)]
    assert new["test/elbo"] == [(6, -88.0)] and "valid/elbo" not in new and "train/elbo" not in new
    assert new["grad_var_log10/inference"] == [(2, pytest.approx(-2.0))]       # none for a zero variance
    assert new["grad_var_log10/layer1"] == [(2, -3.0)] and new["grad_var_log10_latent/inference"] == [(2, -4.0)]
    assert new["grad_var_log10_latent/layer2"] == [(2, pytest.approx(-5.0))]
    assert "grad_var_latent_log10/inference" not in new
    assert current_scalars(new) == new


def _charted(layout):
    return {tag for charts in layout.values() for _, (_, tags) in charts.items() for tag in tags}


def test_layout_holds_only_charts_the_run_fills():
    big = random_sbn(x_dim=4, latent_sizes=(7, 7))          # 14 latent units: above exact_max_latents=12
    small = random_sbn(x_dim=4, latent_sizes=(3, 3))
    from sbn_train.config import VarianceConfig
    assert logged_views(big, VarianceConfig()) == ["minibatch", "latent"]
    assert logged_views(small, VarianceConfig()) == ["minibatch", "latent", "exact"]
    assert logged_views(small, VarianceConfig(every=0)) == []
    assert logged_views(small, VarianceConfig(every=2000), max_steps=300) == []      # the probe never comes
    assert logged_views(small, VarianceConfig(every=300), max_steps=300) == ["minibatch", "latent", "exact"]
    full = _charted(custom_scalars_layout(n_layers=2, views=logged_views(small, VarianceConfig())))
    assert {"^grad_var_log10/inference$", "^grad_bias_log10/inference$", "^grad_var_log10/layer1$",
            "^grad_var_log10/layer2$", "^grad_var_log10_latent/inference$", r"^bounds/valid/iwae\d+$"} <= full
    assert not any(t.startswith("^grad_") and "_log10" not in t.split("/")[0] for t in full)    # no linear variance chart
    large = _charted(custom_scalars_layout(n_layers=2, views=logged_views(big, VarianceConfig())))
    assert not any("bias" in t for t in large) and "^grad_var_log10_latent/layer2$" in large
    assert not any("grad_" in t for t in _charted(custom_scalars_layout(n_layers=2, views=[], iwae=False)))
    assert r"^bounds/valid/iwae\d+$" not in _charted(custom_scalars_layout(n_layers=2, views=[], iwae=False))
    one = _charted(custom_scalars_layout(n_layers=1))
    assert not any("layer" in t for t in one)                 # layer 1 of a one-layer model is the inference net
    views = ["minibatch", "latent", "exact"]
    for m in METRICS:      # a charted family that needs something is charted exactly when the run has it
        if m.chart and m.requires:
            tag = m.layer_regex(1)
            has = views if m.requires != "iwae" else []
            assert tag in _charted(custom_scalars_layout(n_layers=2, views=has, iwae=True)), m
            lacking = [v for v in views if v != m.requires]
            assert tag not in _charted(custom_scalars_layout(n_layers=2, views=lacking,
                                                             iwae=m.requires != "iwae")), m


# ----- install layout ----------------------------------------------------------------------------------
def test_every_config_folder_ships_in_the_package():
    """Every folder of configs/ holding yaml files is a package of its own (no setuptools 'would be ignored'
    warning, and a wheel holds them all), and the dependency list has ranges, not pins."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = set(project["tool"]["setuptools"]["packages"])
    for folder in {p.parent for p in (ROOT / "configs").rglob("*.yaml")}:
        rel = folder.relative_to(ROOT / "configs")
        package = ".".join(["sbn_train", "configs", *rel.parts])
        assert package in packages, package
        assert list(folder.glob("*.yaml")), folder
    for dep in project["project"]["dependencies"]:
        assert "==" not in dep, dep
    assert "<" not in project["project"]["requires-python"]
