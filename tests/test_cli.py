"""End-to-end: the real CLI in a subprocess, its TensorBoard events read back, bad input rejected."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sbn_train.config import check_keys, register_configs, validate
from sbn_train.paths import config_dir

register_configs()

SMALL = ["dataset=synthetic", "dataset.n_train=300", "dataset.n_valid=100", "dataset.n_test=100",
         "model.latent_sizes=[8,8]", "train.batch_size=20", "eval.iwae_k=5", "train.progress=false",
         "test.elbo_samples=20", "test.iwae_k=100"]
#: tiny models gain nothing from intra-op threads, and lose much when the cores are shared
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def sbn_train(*args, cwd=None, env=None, timeout=600, **kw):
    return subprocess.run([sys.executable, "-m", "sbn_train.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **ONE_THREAD, **(env or {})}, timeout=timeout, **kw)


def scalars(folder: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _number_end(tag: str, i: int) -> int:
    """Where the number that starts before ``i`` ends (digits, a decimal point, an exponent)."""
    state = "natural"
    while i < len(tag):
        c = tag[i]
        if state in ("natural", "real"):
            if c == "." and state == "natural":
                state = "real"
            elif c in "eE":
                state = "sign"
            elif not c.isascii() or not c.isdigit():
                break
        elif state == "sign":
            if not (c.isascii() and c.isdigit()) and c not in "+-":
                break
            state = "exponent"
        elif not (c.isascii() and c.isdigit()):
            break
        i += 1
    return i


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


def compare_tags(a: str, b: str) -> int:
    """TensorBoard's order of tag names (``compareTagNames`` of its frontend, 2.21): numbers by value,
    '/' and digits before any other character, other characters by code."""
    def sep(c):
        return c == "/" or (c.isascii() and c.isdigit())
    i = j = 0
    while True:
        if i == len(a):
            return 0 if j == len(b) else -1
        if j == len(b):
            return 1
        if a[i].isascii() and a[i].isdigit() and b[j].isascii() and b[j].isdigit():
            i0, j0 = i, j
            i, j = _number_end(a, i + 1), _number_end(b, j + 1)
            x, y = _number(a[i0:i]), _number(b[j0:j])
            if x < y:
                return -1
            if x > y:
                return 1
        else:
            if sep(a[i]):
                if not sep(b[j]):
                    return -1
            elif sep(b[j]):
                return 1
            elif a[i] != b[j]:
                return -1 if a[i] < b[j] else 1
            i, j = i + 1, j + 1


def time_series_groups(tags) -> list[tuple[str, list[str]]]:
    """The card groups of TensorBoard's Time Series tab, top to bottom, as its frontend (2.21) makes them:
    the tags in :func:`compare_tags` order, grouped by the part before the first '/' in order of first
    appearance (``groupCardIdWithMetdata``)."""
    from functools import cmp_to_key
    groups: dict[str, list[str]] = {}
    for tag in sorted(tags, key=cmp_to_key(compare_tags)):
        groups.setdefault(tag.split("/", 1)[0], []).append(tag)
    return list(groups.items())


def tensorboard_extras(folder: Path) -> dict:
    """Image tags, the hparams plugin's hyperparameters and metric names, and the custom-scalars layout."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.plugins.hparams import plugin_data_pb2
    acc = EventAccumulator(str(folder), size_guidance={"images": 1, "tensors": 0})
    acc.Reload()
    hp = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(hp["_hparams_/session_start_info"]).session_start_info
    exp = plugin_data_pb2.HParamsPluginData.FromString(hp["_hparams_/experiment"]).experiment
    layout = layout_pb2.Layout.FromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    return {"images": sorted(acc.Tags()["images"]),
            "hparams": {k: v.string_value or v.number_value for k, v in start.hparams.items()},
            "metrics": [m.name.tag for m in exp.metric_infos],
            "layout": [t for c in layout.category for ch in c.chart for t in ch.multiline.tag]}


def test_every_group_option_composes():
    groups = {g: sorted(p.stem for p in (config_dir() / g).glob("*.yaml"))
              for g in ("dataset", "model", "estimator", "optim")}
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        for group, names in groups.items():
            assert names, group
            for name in names:
                cfg = compose("config", overrides=[f"{group}={name}"])
                check_keys(OmegaConf.to_container(cfg))
                validate(OmegaConf.to_object(cfg))


def test_every_experiment_composes():
    """Every experiment= file with every model and estimator its sweep names (the paper's grid; a single-run
    experiment such as quick: the default model and estimator)."""
    names = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))
    assert {"paper", "paper_cpu"} <= set(names), names
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        for name in names:
            cfg = compose("config", overrides=[f"experiment={name}"], return_hydra_config=True)
            grid = {k: str(v).split(",") for k, v in (cfg.hydra.sweeper.params or {}).items()}
            for model in grid.get("model", [cfg.hydra.runtime.choices.model]):
                for estimator in grid.get("estimator", [cfg.hydra.runtime.choices.estimator]):
                    job = compose("config", overrides=[f"experiment={name}", f"model={model}",
                                                       f"estimator={estimator}"])
                    check_keys(OmegaConf.to_container(job))
                    validate(OmegaConf.to_object(job))
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        paper = compose("config", overrides=["experiment=paper"], return_hydra_config=True)
        assert sorted(str(paper.hydra.sweeper.params.estimator).split(",")) == sorted(
            ["reinforce", "reinforce_ma", "nvil", "muprop", "leg", "marginal"])
        assert paper.optim.name == "rmsprop" and paper.optim.weight_decay == 1e-3
        assert paper.test.iwae_k == 50000 and paper.test.elbo_samples == 50000 and paper.variance.samples == 1000
        for model, batch, steps in [("sbn_2layer", 100, 2_000_000), ("sbn_4layer", 100, 2_000_000),
                                    ("sbn_nonlinear", 20, 5_000_000)]:
            job = compose("config", overrides=["experiment=paper", f"model={model}"])
            assert (job.train.batch_size, job.train.max_steps) == (batch, steps), model
        assert compose("config").train.max_steps == 10000    # no experiment: no paper schedule


@pytest.mark.parametrize("override,key,value", [
    ("hydra/launcher=local", "hydra.launcher._target_", "JoblibLauncher"),
    ("hydra/launcher=joblib", "hydra.launcher._target_", "JoblibLauncher"),
    ("hydra/launcher=slurm", "hydra.launcher._target_", "SlurmLauncher"),
    ("hydra/sweeper=lr_search", "hydra.sweeper._target_", "OptunaSweeper"),
])
def test_launcher_and_sweeper_configs_compose(override, key, value):
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = compose("config", overrides=[override], return_hydra_config=True)
        assert value in OmegaConf.select(cfg, key)
        if "lr_search" in override:
            assert cfg.hydra.sweeper.direction == "maximize" and "optim.lr" in cfg.hydra.sweeper.params


def test_typo_fails_at_compose_time():
    from hydra.errors import ConfigCompositionException
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        with pytest.raises(ConfigCompositionException):
            compose("config", overrides=["train.batchsize=3"])
        with pytest.raises(Exception, match="lr"):
            compose("config", overrides=["optim.lr=fast"])


def test_multirun_three_estimators(tmp_path):
    sweep = tmp_path / "sweep"
    r = sbn_train("-m", "estimator=marginal,nvil,reinforce", *SMALL, "train.max_steps=40", "train.eval_every=20",
                  "train.log_every=10", "variance.every=20", "variance.samples=5", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr[-3000:]
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "results.json").exists())
    names = [p.name for p in runs]
    assert len(runs) == 3 and all(n.startswith("estimator=") for n in names), names
    for run in runs:
        s = scalars(run)
        probe = [f"{family}/{group}" for family in ("grad_var_log10", "grad_var_log10_latent")
                 for group in ("inference", "layer1", "layer2", "generative")]
        for tag in ("bounds/train/elbo", "bounds/valid/elbo", "bounds/valid/iwae5", "bounds/train/elbo_eval",
                    "bounds/train/iwae5", *probe, "test/elbo", "test/iwae100", "perf/step_time_ms"):
            assert tag in s, (run.name, tag, sorted(s))
            assert all(v == v and abs(v) < 1e30 for _, v in s[tag]), (run.name, tag)
        assert not any(t.startswith("grad_bias") for t in s)      # 16 latent units: above exact_max_latents
        assert [st for st, _ in s["bounds/valid/elbo"]] == [20, 40]
        assert [st for st, _ in s["bounds/train/elbo"]] == [10, 20, 30, 40]
        assert [st for st, _ in s["test/elbo"]] == [40]
        results = json.loads((run / "results.json").read_text())
        m = results["metrics"]
        assert results["step"] == 40 and results["status"] == "finished"
        assert m["bounds/valid/iwae5"] >= m["bounds/valid/elbo"] - 5 and m["test/iwae100"] >= m["test/elbo"] - 5
        assert m["test/elbo_se"] > 0 and m["best/step"] in (20, 40)
        # the probe's values: log10 in TensorBoard, linear (and log10) in results.json
        assert m["grad_var_log10/inference"] == pytest.approx(math.log10(m["grad_var/inference"]), rel=1e-9)
        assert not any(t.startswith("grad_") and "_log10" not in t.split("/")[0] for t in s), sorted(s)
        extras = tensorboard_extras(run)
        assert extras["images"] == ["images/data", "images/reconstructions", "images/samples"]
        assert extras["hparams"]["estimator"] == run.name.split("=", 1)[1]
        assert extras["hparams"]["seed"] == "0" and extras["hparams"]["lr"] == pytest.approx(3e-4)
        assert {"test/elbo", "test/iwae100", "bounds/valid/elbo",
                "grad_var_log10/inference"} <= set(extras["metrics"])
        assert set(extras["metrics"]) <= set(s)                  # every HParams metric is a scalar of the run
        assert "^grad_var_log10/inference$" in extras["layout"] and "^bounds/valid/elbo$" in extras["layout"]
        # the Time Series tab, top to bottom: the bounds during training first, the final test further down
        groups = time_series_groups([*s, *extras["images"]])
        assert groups[0] == ("bounds", ["bounds/train/elbo", "bounds/train/elbo_eval", "bounds/train/iwae5",
                                        "bounds/valid/elbo", "bounds/valid/iwae5"]), groups
        assert groups[1][0] == "grad_var_log10" and groups[-1][0] == "test", groups    # TensorBoard opens two


@pytest.mark.parametrize("args,message", [
    (["estimator=nope"], "Could not find 'estimator/nope'"),
    (["model=nope"], "Could not find 'model/nope'"),
    (["optim.lr=0"], "optim.lr must be positive"),
    (["optim.lr=-1e-3"], "optim.lr must be positive"),
    (["train.batch_size=0"], "train.batch_size must be positive"),
    (["model.latent_sizes=[]"], "model.latent_sizes must be a non-empty list"),
    (["model.latent_sizes=[4,0]"], "model.latent_sizes must be a non-empty list"),
    (["model.latent_sizes=[200,200]", "estimator=exact"], "at most 20 latent units"),
    (["train.batch_size=100000"], "exceeds the 300 training examples"),
    (["train.batchsize=3"], "batchsize"),
    (["optim.lr=fast"], "optim.lr"),
])
def test_bad_input_short_error(tmp_path, args, message):
    r = sbn_train(*SMALL, "train.max_steps=2", *args, f"hydra.run.dir={tmp_path / 'run'}")
    assert r.returncode != 0
    assert message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_missing_and_corrupt_data(tmp_path):
    data = tmp_path / "data"
    r = sbn_train(*SMALL[4:], "dataset=omniglot", "dataset.download_timeout=2", f"dataset.data_dir={data}",
                  f"hydra.run.dir={tmp_path / 'a'}")
    assert r.returncode == 2 and "chardata.mat" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    raw = data / "omniglot" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "chardata.mat").write_bytes(b"not a matlab file" * 10)
    r = sbn_train(*SMALL[4:], "dataset=omniglot", f"dataset.data_dir={data}", f"hydra.run.dir={tmp_path / 'b'}")
    assert r.returncode == 2 and "sbn-train: error:" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_refuses_to_overwrite_a_run(tmp_path):
    args = [*SMALL, "train.max_steps=4", "train.eval_every=2", "variance.every=0", f"hydra.run.dir={tmp_path}"]
    assert sbn_train(*args).returncode == 0
    before = (tmp_path / "results.json").read_text()
    r = sbn_train(*args)
    assert r.returncode == 2 and "train.resume=true" in r.stderr
    assert (tmp_path / "results.json").read_text() == before
    assert sbn_train(*args, "train.overwrite=true").returncode == 0


def test_kill_and_resume_matches_uninterrupted(tmp_path):
    common = [*SMALL, "train.max_steps=600", "train.eval_every=50", "train.log_every=10", "variance.every=100",
              "variance.samples=3", "estimator=nvil"]
    full = tmp_path / "full"
    assert sbn_train(*common, f"hydra.run.dir={full}").returncode == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "sbn_train.cli", *common, f"hydra.run.dir={killed}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **ONE_THREAD})
    deadline = time.time() + 120
    while not (killed / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "results.json").exists(), "the run finished before it could be killed"
    r = sbn_train(*common, f"hydra.run.dir={killed}", "train.resume=true")
    assert r.returncode == 0, r.stderr[-2000:]
    a = json.loads((full / "results.json").read_text())["metrics"]
    b = json.loads((killed / "results.json").read_text())["metrics"]
    assert a == b
    assert scalars(full)["bounds/valid/elbo"] == scalars(killed)["bounds/valid/elbo"]
