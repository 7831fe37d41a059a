"""A replica group against standalone runs: every replica is the run it stands for.

For every estimator config, R = 3 runs with different seeds, learning rates and weight decays are stepped
once as a group and once one by one (float64); parameters, estimator state and optimizer statistics agree to
1e-10 relative. The streams (minibatches, uniforms) of replica r are the standalone run's, exactly."""
from __future__ import annotations

import copy

import pytest
import torch

from sbn_train.config import OptimConfig
from sbn_train.estimators import available_estimators, build_estimator
from sbn_train.models import SBN
from sbn_train.replicas import GroupError, ReplicaGroup
from sbn_train.state import TrainState
from sbn_train.train import TrainStep

D, SIZES, B = 10, [5, 4], 6
RUNS = [(0, 3e-3, 0.0), (1, 1e-2, 1e-3), (2, 1e-3, 0.0)]      # (seed, lr, weight decay)


def _data() -> torch.Tensor:
    return torch.rand(40, D, generator=torch.Generator().manual_seed(123), dtype=torch.float64)


def _state(name: str, seed: int, lr: float, wd: float, optim: str = "rmsprop", n_hidden: int = 0) -> TrainState:
    torch.manual_seed(seed)
    data = _data()
    model = SBN(D, SIZES, n_hidden, x_mean=data.mean(0)).double()
    est = build_estimator(name, model).double()
    return TrainState.create(model, est, data, B, OptimConfig(name=optim, lr=lr, weight_decay=wd), seed)


def _tensors(s: TrainState) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in s.model.state_dict().items()}
    out.update({f"est.{k}": v for k, v in s.estimator.state_dict().items()})
    for tag, opt in (("model_opt", s.model_opt), ("est_opt", s.est_opt)):
        if opt is not None:
            for i, p in enumerate(opt.param_groups[0]["params"]):
                for k, v in opt.state.get(p, {}).items():
                    out[f"{tag}.{i}.{k}"] = v
    return out


def _assert_close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        x, y = a[k].double(), b[k].double()
        scale = max(1.0, float(y.abs().max())) if y.numel() else 1.0
        err = float((x - y).abs().max()) if x.numel() else 0.0
        assert err <= 1e-10 * scale, f"{what}: {k} differs by {err:.3g}"


def _group_vs_standalone(name: str, steps: int, optim: str = "rmsprop", n_hidden: int = 0,
                         vectorize: bool | None = None, make_state=None):
    """``make_state(seed, lr, wd)``: the runs' states (default: :func:`_state` with ``optim``, ``n_hidden``)."""
    make = make_state or (lambda *run: _state(name, *run, optim=optim, n_hidden=n_hidden))
    alone = [make(*run) for run in RUNS]
    grouped = [make(*run) for run in RUNS]
    group = ReplicaGroup(grouped, vectorize=vectorize)
    assert vectorize is None or group.vectorize == vectorize
    for _ in range(steps):
        group.step()
        for s in alone:
            s.estimator.train()
            TrainStep(s)()
    for r, (a, g) in enumerate(zip(alone, grouped)):
        _assert_close(_tensors(g), _tensors(a), f"{name} replica {r}")
        assert float(g.elbo_sum) == pytest.approx(float(a.elbo_sum), rel=1e-10, abs=1e-10)
        assert g.generator.get_state().equal(a.generator.get_state())     # the same draws, in the same order
        assert g.sampler.pos == a.sampler.pos and g.sampler.perm.equal(a.sampler.perm)


@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "looped"])
@pytest.mark.parametrize("name", available_estimators())
def test_replica_step_equals_standalone_step(name, vectorize):
    """Two steps (the second sees the first's optimizer statistics and moving averages), with the replicas
    vectorized (vmap: what a GPU runs) and taking turns (what a CPU runs for marginal and leg)."""
    torch.set_default_dtype(torch.float64)
    try:
        _group_vs_standalone(name, steps=2, vectorize=vectorize)
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "looped"])
@pytest.mark.parametrize("name", ["nvil", "marginal"])
def test_replica_step_adam_and_nonlinear(name, vectorize):
    torch.set_default_dtype(torch.float64)
    try:
        _group_vs_standalone(name, steps=2, optim="adam", n_hidden=1, vectorize=vectorize)
    finally:
        torch.set_default_dtype(torch.float32)


def test_replica_views_follow_the_stacks():
    """A replica's module parameters are views of its row: the group's update is what the replica holds."""
    states = [_state("nvil", *run) for run in RUNS]
    group = ReplicaGroup(states)
    group.step()
    for r, s in enumerate(states):
        w = s.model.q_nets[0].first.weight
        assert w.data_ptr() == group.params["model.q_nets.0.first.weight"][r].data_ptr()
        assert torch.equal(w, group.params["model.q_nets.0.first.weight"][r])


def test_group_refuses_runs_that_cannot_share_it():
    a = _state("nvil", 0, 1e-3, 0.0)
    b = _state("nvil", 1, 1e-3, 0.0, optim="adam")
    with pytest.raises(GroupError, match="optimizer"):
        ReplicaGroup([a, b])


# ----- the group loop: R ordinary runs, each in its own folder ---------------------------------------------
from sbn_train.config import EvalConfig, TestConfig, TrainConfig, VarianceConfig  # noqa: E402
from sbn_train.data import load_dataset  # noqa: E402
from sbn_train.train import RunSettings, RunSpec, run, run_group  # noqa: E402


def _spec(tmp_path, name: str, seed: int, lr: float, max_steps: int = 20, divergence: float = 1.0) -> RunSpec:
    splits = load_dataset("synthetic", "", x_dim=12, latent_sizes=[3, 3], n_train=120, n_valid=40, n_test=40)
    for split in ("train", "valid", "test"):
        setattr(splits, split, getattr(splits, split).double())
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(seed)
        model = SBN(12, [3, 3], x_mean=splits.train.mean(0))
        est = build_estimator(name, model)
    finally:
        torch.set_default_dtype(torch.float32)
    settings = RunSettings(
        train=TrainConfig(batch_size=10, max_steps=max_steps, eval_every=10, log_every=5, progress=False,
                          divergence_nats=divergence),
        optim=OptimConfig(lr=lr), eval=EvalConfig(batch_size=40, iwae_k=5, images=0),
        variance=VarianceConfig(every=10, samples=3), test=TestConfig(elbo_samples=3, iwae_k=10), seed=seed)
    return RunSpec(model, est, splits, settings, tmp_path / f"{name}-seed{seed}-lr{lr}",
                   hparams={"lr": lr, "seed": seed})


def _results(path) -> dict:
    import json
    return json.loads((path / "results.json").read_text())


@pytest.mark.parametrize("name", ["nvil", "marginal"])
def test_group_runs_equal_standalone_runs(tmp_path, name):
    """Three runs as one group and the same three one at a time: every results.json metric (evaluations,
    variance probe, final test) agrees to 1e-8 relative, and each run has its own folder and events."""
    runs = [(0, 3e-3), (1, 1e-2), (2, 1e-3)]
    grouped = run_group([_spec(tmp_path / "group", name, s, lr) for s, lr in runs])
    assert all(not isinstance(r, BaseException) for r in grouped)
    for s, lr in runs:
        alone = run(*[getattr(_spec(tmp_path / "alone", name, s, lr), f) for f in
                      ("model", "estimator", "splits", "settings", "out_dir", "hparams")])
        g = _results(tmp_path / "group" / f"{name}-seed{s}-lr{lr}")
        a = _results(tmp_path / "alone" / f"{name}-seed{s}-lr{lr}")
        assert a["step"] == g["step"] == 20 and a["hparams"] == g["hparams"]
        keys = [k for k in a["metrics"] if not k.startswith("perf/")]
        assert keys == [k for k in g["metrics"] if not k.startswith("perf/")]
        for k in keys:
            assert g["metrics"][k] == pytest.approx(a["metrics"][k], rel=1e-8, abs=1e-10), k
        assert list((tmp_path / "group" / f"{name}-seed{s}-lr{lr}").glob("events.out.tfevents.*"))
        assert alone.step == 20


def test_a_diverging_replica_stops_alone(tmp_path):
    """lr = 50 diverges (non-finite or far below the start); it gets failed.json, the others finish."""
    specs = [_spec(tmp_path, "reinforce", 0, 3e-3), _spec(tmp_path, "reinforce", 1, 50.0),
             _spec(tmp_path, "reinforce", 2, 1e-3)]
    out = run_group(specs)
    assert isinstance(out[1], Exception) and "diverged" in str(out[1])
    assert (specs[1].out_dir / "failed.json").exists() and not (specs[1].out_dir / "results.json").exists()
    for i in (0, 2):
        assert not isinstance(out[i], BaseException)
        assert _results(specs[i].out_dir)["step"] == 20


def test_group_checkpoint_is_a_standalone_checkpoint(tmp_path):
    """A replica's checkpoint holds its own tensors only (not its group's stacks) and loads as a run's."""
    specs = [_spec(tmp_path, "nvil", s, 3e-3, max_steps=10) for s in (0, 1, 2)]
    run_group(specs)
    ck = torch.load(specs[1].out_dir / "checkpoint.pt", weights_only=True)
    w = ck["model"]["q_nets.0.first.weight"]
    assert w.untyped_storage().nbytes() == w.numel() * w.element_size()
    alone = _spec(tmp_path / "alone", "nvil", 1, 3e-3, max_steps=10)
    run(alone.model, alone.estimator, alone.splits, alone.settings, alone.out_dir)
    ref = torch.load(alone.out_dir / "checkpoint.pt", weights_only=True)
    for k in ref["model"]:
        assert torch.allclose(ck["model"][k], ref["model"][k], rtol=1e-10, atol=1e-12), k


# ----- unbiasedness, replica by replica ----------------------------------------------------------------------
from conftest import random_binary, random_sbn  # noqa: E402
from stats import bonferroni_z, randomize_estimator, unbiasedness_z  # noqa: E402

from sbn_train.diagnostics import exact_gradient  # noqa: E402

ALPHA = 1e-3          # false-alarm rate of each test (all coordinates of all models together)
N_MODELS, COPIES, CALLS = 3, 30, 100      # 3 weight sets x 30 replicas each x 100 group calls = 3,000 estimates


@pytest.mark.parametrize("name,vectorize", [("marginal", True), ("marginal", False), ("nvil", True),
                                            ("rloo", True), ("disarm", True), ("straight_through", True)])
def test_each_replica_is_unbiased_for_its_own_model(name, vectorize):
    """A group of 90 replicas: three different random models (different weights, randomized baselines),
    each in 30 replicas with their own generators; per model, the 3,000 gradient estimates are tested
    against that model's exact gradient (Bonferroni over every coordinate of the three models, ALPHA).
    The biased straight-through estimator must fail the same test: the test sees bias."""
    x = random_binary(4, 5)
    states = []
    for i in range(N_MODELS * COPIES):
        model = random_sbn(seed=i // COPIES)
        est = randomize_estimator(build_estimator(name, model).double(), seed=7 + i // COPIES)
        states.append(TrainState.create(model, est, torch.rand(8, 5, dtype=torch.float64), 4, OptimConfig(), i))
    group = ReplicaGroup(states, vectorize=vectorize)
    xs = x.expand(len(states), -1, -1)
    samples = []
    for _ in range(CALLS):
        g_model = group.gradients(xs, group.draw_uniforms(), train=False)[0]
        samples.append(torch.cat([g_model[n].reshape(len(states), -1) for n in group.model_names], 1))
    samples = torch.stack(samples)                                   # [CALLS, R, P]
    zs, lives = [], []
    for m in range(N_MODELS):
        exact = torch.cat([g.reshape(-1) for g in exact_gradient(random_sbn(seed=m), x)])
        per_model = samples[:, m * COPIES:(m + 1) * COPIES].reshape(-1, exact.numel())
        z, live = unbiasedness_z(per_model, exact)
        zs.append(z[live])
        lives.append(live)
    threshold = bonferroni_z(ALPHA, sum(int(live.sum()) for live in lives))
    worst = float(torch.cat(zs).max())
    if build_estimator(name, random_sbn()).unbiased:
        assert worst < threshold, f"{name}: max z {worst:.2f} >= {threshold:.2f}"
    else:
        assert worst > threshold, f"{name}: max z {worst:.2f} <= {threshold:.2f}: bias not seen"


def test_group_memory_estimate_scales_with_replicas():
    from sbn_train.replicas import group_bytes
    assert group_bytes(100, 20, 1) == 150 and group_bytes(100, 20, 64) == 64 * 150


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run by scripts/gpu_check.sh)")


@cuda
@pytest.mark.parametrize("name", ["reinforce", "nvil", "marginal"])
def test_graphed_group_equals_eager_group(name):
    """The group step captured as a CUDA graph and the eager group step: identical parameters, generators
    and running ELBO after 12 steps (3 eager, then replays across an epoch boundary)."""
    from sbn_train.replicas import GraphedGroup
    out = []
    for graphed in (False, True):
        states = []
        for seed, lr, wd in RUNS:
            torch.manual_seed(seed)
            data = _data().float().cuda()
            model = SBN(D, SIZES, x_mean=data.mean(0)).cuda()
            est = build_estimator(name, model).cuda()
            states.append(TrainState.create(model, est, data, B, OptimConfig(lr=lr, weight_decay=wd), seed))
        group = ReplicaGroup(states)
        step = GraphedGroup(group) if graphed else group.step
        for _ in range(12):
            step()
        assert not graphed or (step.graph is not None and not step.failed)
        out.append(({k: v.clone() for k, v in group.params.items()}, [s.generator.get_state() for s in states],
                    group.elbo_sum.clone()))
    (p0, g0, e0), (p1, g1, e1) = out
    assert all(torch.equal(p0[k], p1[k]) for k in p0)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1)) and torch.equal(e0, e1)


# ----- evaluation and the final test, batched over the replicas ------------------------------------------------
import sbn_train.jobs as jobs_module  # noqa: E402
import sbn_train.train as train_module  # noqa: E402
from dataclasses import replace  # noqa: E402

from sbn_train.evaluation import ReplicaModels, replica_split_bounds, split_bounds  # noqa: E402


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1.0)).max())


@pytest.mark.parametrize("max_rows", [12, 40, 1000])
@pytest.mark.parametrize("n_hidden", [0, 1])
def test_replica_bounds_equal_standalone_bounds(n_hidden, max_rows):
    """Three models' ELBO (averaged over 3 samples) and 7-sample bound as one vmapped computation, and one model
    at a time (split_bounds, as a standalone run evaluates): equal to 1e-10 in float64, row by row, with the
    same streams. max_rows = 12: chunks of 2 samples, and 1 sample per vmapped call; 40: chunks of 8 samples,
    2 per call; 1000: one chunk, one call. A partial last batch and a row limit; the models are not changed."""
    models = [random_sbn(x_dim=6, latent_sizes=(4, 3), n_hidden=n_hidden, seed=s) for s in (0, 1, 2)]
    before = [copy.deepcopy(m.state_dict()) for m in models]
    data = torch.rand(23, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    args = (data, 5, 21, 77, 3, 7, max_rows)      # batches of 5 of the first 21 rows, seed 77, 3 samples, K = 7
    batched = ReplicaModels(models[1], [m.state_dict() for m in models])
    elbo, iwae = replica_split_bounds(batched, *args)
    assert elbo.shape == iwae.shape == (3, 21) and elbo.dtype == iwae.dtype == torch.float64
    for r, m in enumerate(models):
        e, i = split_bounds(m, *args)
        assert _max_rel(elbo[r], e) <= 1e-10 and _max_rel(iwae[r], i) <= 1e-10, r
        assert all(torch.equal(v, before[r][k]) for k, v in m.state_dict().items())
    # the models differ, and so do their bounds: a mix-up of replicas would be seen
    assert _max_rel(elbo[0], elbo[1]) > 1e-3 and _max_rel(iwae[1], iwae[2]) > 1e-3


def test_replica_bounds_in_float32():
    """float32 (what runs train in): every replica within float rounding (1e-5) of its standalone bounds."""
    models = [random_sbn(x_dim=8, latent_sizes=(5, 4), seed=s).float() for s in (3, 4, 5, 6)]
    data = torch.rand(30, 8, generator=torch.Generator().manual_seed(2))
    args = (data, 10, None, 5, 2, 9, 40)
    elbo, iwae = replica_split_bounds(ReplicaModels(models[0], [m.state_dict() for m in models]), *args)
    for r, m in enumerate(models):
        e, i = split_bounds(m, *args)
        assert _max_rel(elbo[r], e) <= 1e-5 and _max_rel(iwae[r], i.double()) <= 1e-5, r


def _with(spec: RunSpec, **changes) -> RunSpec:
    """``spec`` with changed settings (``train``, ``eval``, ``test``: dicts of fields)."""
    s = spec.settings
    settings = replace(s, **{k: replace(getattr(s, k), **v) for k, v in changes.items()})
    return replace(spec, settings=settings)


def _alone(tmp_path, spec: RunSpec) -> dict:
    run(spec.model, spec.estimator, spec.splits, spec.settings, spec.out_dir, spec.hparams)
    return _results(spec.out_dir)


def _spy(monkeypatch, module, name: str, calls: list) -> None:
    real = getattr(module, name)

    def spy(models, *args, **kwargs):
        calls.append(models.size)
        return real(models, *args, **kwargs)
    monkeypatch.setattr(module, name, spy)


def _refuse(monkeypatch, module, name: str) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError(f"{name}: a run of the group was evaluated on its own")
    monkeypatch.setattr(module, name, refuse)


def _assert_measurements_equal(g: dict, a: dict, what: str) -> None:
    keys = [k for k in a["metrics"] if k.split("/")[0] in ("bounds", "test", "best") and k != "bounds/train/elbo"]
    assert any(k.startswith("test/") for k in keys) and "bounds/valid/iwae5" in keys
    assert "bounds/train/iwae5" in keys
    for k in keys:
        x, y = g["metrics"][k], a["metrics"][k]
        assert abs(x - y) <= 1e-10 * max(1.0, abs(y)), f"{what}: {k} {x!r} != {y!r}"


@pytest.mark.parametrize("name", ["nvil", "marginal"])
def test_group_evaluations_and_tests_are_batched(tmp_path, monkeypatch, name):
    """Three runs as a group: every periodic evaluation (validation and training splits) and the final test
    of their best models run as one batched computation of the three (the one-run paths refuse to run), and
    every valid/, train/ (evaluation), test/ and best/ metric equals the standalone run's to 1e-10."""
    runs = [(0, 3e-3), (1, 1e-2), (2, 1e-3)]
    evals, tests = [], []
    _spy(monkeypatch, jobs_module, "evaluate_replicas", evals)
    _spy(monkeypatch, train_module, "evaluate_test_replicas", tests)
    _refuse(monkeypatch, jobs_module, "evaluate")
    _refuse(monkeypatch, train_module, "evaluate_test")
    out = run_group([_spec(tmp_path / "group", name, s, lr) for s, lr in runs])
    assert all(not isinstance(r, BaseException) for r in out), out
    assert evals == [3] * 4 and tests == [3]          # steps 10 and 20, valid and train; one final test
    monkeypatch.undo()
    for s, lr in runs:
        a = _alone(tmp_path, _spec(tmp_path / "alone", name, s, lr))
        g = _results(tmp_path / "group" / f"{name}-seed{s}-lr{lr}")
        _assert_measurements_equal(g, a, f"{name} seed {s}")


def test_group_evaluations_batch_the_runs_that_share_them(tmp_path, monkeypatch):
    """Runs of a group whose measurements differ: run 2 has its own evaluation settings and stops at step 10
    (evaluated and tested alone, as a standalone run), runs 0 and 1 are evaluated together at steps 10 and 20
    and tested together at step 20; run 3 has its own test settings (tested alone). Every measurement equals
    the standalone run's to 1e-10."""
    def specs(folder):
        return [_spec(folder, "nvil", 0, 3e-3), _spec(folder, "nvil", 1, 1e-2),
                _with(_spec(folder, "nvil", 2, 1e-3), train={"max_steps": 10}, eval={"seed": 99}),
                _with(_spec(folder, "nvil", 3, 1e-3), test={"iwae_k": 12})]
    evals, tests, alone = [], [], []
    _spy(monkeypatch, jobs_module, "evaluate_replicas", evals)
    _spy(monkeypatch, train_module, "evaluate_test_replicas", tests)
    real = jobs_module.evaluate
    monkeypatch.setattr(jobs_module, "evaluate", lambda *a, **k: alone.append(a[3]) or real(*a, **k))
    out = run_group(specs(tmp_path / "group"))
    assert all(not isinstance(r, BaseException) for r in out), out
    assert evals == [3, 3, 3, 3] and tests == [2] and alone == ["valid", "train"]
    monkeypatch.undo()
    for i, spec in enumerate(specs(tmp_path / "alone")):
        a = _alone(tmp_path, spec)
        _assert_measurements_equal(_results(tmp_path / "group" / spec.out_dir.name), a, f"run {i}")


def _assert_probes_equal(g: dict, a: dict, what: str, views: list[str]) -> None:
    keys = [k for k in a["metrics"] if k.startswith("grad_")]
    assert keys == [k for k in g["metrics"] if k.startswith("grad_")], what
    assert "grad_var/inference" in keys and "grad_var_latent/generative" in keys
    assert ("grad_bias/inference" in keys) == ("exact" in views)
    for k in keys:
        x, y = g["metrics"][k], a["metrics"][k]
        assert abs(x - y) <= 1e-10 * max(1.0, abs(y)), f"{what}: {k} {x!r} != {y!r}"


@pytest.mark.parametrize("views", [["minibatch", "latent"], ["minibatch", "latent", "exact"]])
def test_group_variance_probes_are_batched(tmp_path, monkeypatch, views):
    """Three runs as a group (nvil, vectorized): every variance probe runs as one batched computation of the
    three (the one-run probe refuses to run; the exact view runs per run, with the latent view it shares
    estimates with), and every grad_* value equals the standalone run's to 1e-10."""
    runs = [(0, 3e-3), (1, 1e-2), (2, 1e-3)]

    def spec(folder, s, lr):
        return _with(_spec(folder, "nvil", s, lr), variance={"views": list(views)})
    probes = []
    real = jobs_module.measure_variance_replicas
    monkeypatch.setattr(jobs_module, "measure_variance_replicas",
                        lambda group, rows, *a, **k: probes.append(len(rows)) or real(group, rows, *a, **k))
    _refuse(monkeypatch, jobs_module, "measure_variance")
    out = run_group([spec(tmp_path / "group", s, lr) for s, lr in runs])
    assert all(not isinstance(r, BaseException) for r in out), out
    assert probes == [3, 3]                            # steps 10 and 20
    monkeypatch.undo()
    for s, lr in runs:
        a = _alone(tmp_path, spec(tmp_path / "alone", s, lr))
        _assert_probes_equal(_results(tmp_path / "group" / f"nvil-seed{s}-lr{lr}"), a, f"seed {s}", views)


def test_group_variance_probes_batch_the_runs_that_share_them(tmp_path, monkeypatch):
    """Runs 0 and 2 of a group probe together (replicas 0 and 2 of the group's vmapped gradient), run 1 has
    its own probe settings and probes alone, as a standalone run; a group of marginal runs on a CPU (not
    vectorized) probes run by run. Every grad_* value equals the standalone run's to 1e-10."""
    views = ["minibatch", "latent"]

    def specs(folder):
        return [_with(_spec(folder, "nvil", 0, 3e-3), variance={"views": views}),
                _with(_spec(folder, "nvil", 1, 1e-2), variance={"views": views, "samples": 4}),
                _with(_spec(folder, "nvil", 2, 1e-3), variance={"views": views}),
                _with(_spec(folder / "marginal", "marginal", 3, 1e-3), variance={"views": views})]
    probes, alone = [], []
    real, real_alone = jobs_module.measure_variance_replicas, jobs_module.measure_variance
    monkeypatch.setattr(jobs_module, "measure_variance_replicas",
                        lambda group, rows, *a, **k: probes.append(list(rows)) or real(group, rows, *a, **k))
    monkeypatch.setattr(jobs_module, "measure_variance",
                        lambda *a, **k: alone.append(a[4]) or real_alone(*a, **k))
    out = run_group(specs(tmp_path / "group")[:3])
    assert all(not isinstance(r, BaseException) for r in out), out
    assert probes == [[0, 2], [0, 2]] and alone == [4, 4]
    other = _with(_spec(tmp_path / "group" / "marginal", "marginal", 4, 1e-2), variance={"views": views})
    out = run_group([specs(tmp_path / "group")[3], other])
    assert all(not isinstance(r, BaseException) for r in out), out
    assert probes == [[0, 2], [0, 2]] and alone == [4, 4] + [3] * 4
    monkeypatch.undo()
    for i, spec in enumerate(specs(tmp_path / "alone")):
        a = _alone(tmp_path, spec)
        _assert_probes_equal(_results(tmp_path / "group" / spec.out_dir.relative_to(tmp_path / "alone")), a,
                             f"run {i}", views)


@pytest.mark.parametrize("name", available_estimators())
def test_replica_probe_equals_standalone_probe(name):
    """Every estimator: the batched probe of replicas 2 and 0 of a vectorized group (after a step, so that
    moving averages and optimizer statistics are not at their start) equals each run's own probe to 1e-10,
    and leaves the group's tensors, the replicas' generators and their estimators' modes as they were."""
    from sbn_train.evaluation import measure_variance, measure_variance_replicas
    torch.set_default_dtype(torch.float64)
    try:
        states = [_state(name, *run) for run in RUNS]
        group = ReplicaGroup(states, vectorize=True)
        group.step()
        before = {n: t.clone() for n, t in {**group.params, **group.buffers}.items()}
        gens = [s.generator.get_state() for s in states]
        views, data = ["minibatch", "latent"], states[0].sampler.data
        batched = measure_variance_replicas(group, [2, 0], data, B, 4, [11, 12], views, fixed_seeds=[5, 6])
        for r, seed, fixed, got in zip([2, 0], [11, 12], [5, 6], batched):
            alone = measure_variance(states[r].model, states[r].estimator, data, B, 4, seed, views,
                                     fixed_seed=fixed)
            assert list(got) == list(alone) and "grad_var_latent/inference" in got
            for k in alone:
                assert abs(got[k] - alone[k]) <= 1e-10 * max(1.0, abs(alone[k])), (r, k, got[k], alone[k])
        assert all(t.equal(before[n]) for n, t in {**group.params, **group.buffers}.items())
        assert all(s.generator.get_state().equal(g) for s, g in zip(states, gens))
        assert all(s.estimator.training for s in states) and group.template.training
    finally:
        torch.set_default_dtype(torch.float32)
