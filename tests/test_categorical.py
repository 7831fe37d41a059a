"""Categorical latents: the family, the model, the marginal estimator's differences, and every estimator
config on a small deep categorical model (float64, 5 visible units, 2 layers of 2 variables with 3
classes: 81 joint configurations) against the exact gradient by enumeration.

The lists are derived from the estimators, as in test_estimator_zoo.py: a config either refuses the
categorical model (binary only) or is classified by its attributes; unbiased ones must pass the
unbiasedness test and biased ones must fail it. Thresholds come from ALPHA (Bonferroni-corrected) and the
samples' standard errors; seeds are fixed.
"""
import math

import pytest
import torch
from scipy import stats as sps

from sbn_train.diagnostics import (all_configurations, check_exact_size, exact_elbo, exact_gradient,
                                   exact_log_likelihood, TooLargeForExact)
from sbn_train.estimators import available_estimators, build_estimator
from sbn_train.estimators.branches import sample_layers
from sbn_train.estimators.marginal_categorical import categorical_deltas, categorical_deltas_reference
from sbn_train.models import SBN, Categorical, latent_family

from conftest import random_binary, random_sbn
from stats import bonferroni_z, flat_grad, randomize_estimator as randomized, sample_gradients, unbiasedness_z
from test_estimator_zoo import (assert_biased, assert_unbiased, assert_variance_not_larger, inference_mask,
                                marginal_samples_at)

ALPHA = 1e-3
N_SAMPLES = 3000
N_VARIANCE = 2000
CAT = dict(family="categorical", classes=3)

#: what a binary-only estimator raises on a categorical model
BINARY_ONLY = {"arm", "disarm", "rebar", "relax", "leg", "leg_paper_code", "muprop", "marginal_paper_code"}


def cat_model(latent_sizes=(2, 2), **kw):
    return random_sbn(latent_sizes=latent_sizes, **{**CAT, **kw})


def _classify():
    lists = {"unbiased": [], "biased": [], "iwae": [], "exact": [], "single_sample": [], "refused": []}
    for name in available_estimators():
        try:
            est = build_estimator(name, SBN(x_dim=5, latent_sizes=[2, 2], **CAT))
        except ValueError as e:
            assert "latents only" in str(e), (name, e)
            lists["refused"].append(name)
            continue
        if not est.monte_carlo:
            lists["exact"].append(name)
        elif est.objective == "iwae":
            lists["iwae"].append(name)
        else:
            lists["unbiased" if est.unbiased else "biased"].append(name)
            if est.unbiased and est.q_samples == 1 and est.rao_blackwellized_by_marginal:
                lists["single_sample"].append(name)
    return lists


LISTS = _classify()


def flat_exact(model, x):
    return torch.cat([g.reshape(-1) for g in exact_gradient(model, x)])


# ----- the family ---------------------------------------------------------------------------------------

def test_inverse_cdf_sampling_follows_the_softmax():
    """Class frequencies of 200,000 draws against softmax probabilities: a chi-square test per variable
    at false-alarm rate ALPHA (Bonferroni over the variables)."""
    fam = Categorical(4)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3 * 4, generator=g, dtype=torch.float64) * 1.5           # 3 variables
    n = 200_000
    u = torch.rand(n, 3, generator=g, dtype=torch.float64)
    z = fam.sample(fam.prepare(u), logits.expand(n, -1))                          # [n, 12]
    assert set(z.unique().tolist()) == {0.0, 1.0} and torch.equal(fam.blocks(z).sum(-1), torch.ones(n, 3).double())
    counts = fam.blocks(z).sum(0)                                                 # [3, 4]
    probs = torch.softmax(fam.blocks(logits), -1)
    chi2 = ((counts - n * probs) ** 2 / (n * probs)).sum(-1)
    assert float(chi2.max()) < sps.chi2.isf(ALPHA / 3, df=3), chi2


def test_log_prob_and_entropy_by_enumeration():
    """exp(log q) over every value of a layer sums to 1, and -E[log q] is the entropy."""
    fam = Categorical(3)
    logits = torch.randn(2, 4 * 3, dtype=torch.float64)                           # 2 rows, 4 variables
    values = fam.configurations(4, dtype=torch.float64)                           # [81, 12]
    lp = fam.log_prob(values[:, None, :], logits[None])                           # [81, 2]
    torch.testing.assert_close(lp.exp().sum(0), torch.ones(2, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(-(lp.exp() * lp).sum(0), fam.entropy(logits), rtol=1e-12, atol=1e-12)


def test_family_errors():
    with pytest.raises(ValueError, match="at least 2 classes"):
        latent_family("categorical", 1)
    with pytest.raises(ValueError, match="unknown latent family"):
        latent_family("gaussian")


def test_model_shapes_and_uniform_prior():
    m = SBN(784, [20], family="categorical", classes=10, hidden=[512, 256], activation="leaky_relu",
            learn_prior=False)
    assert m.widths == [200] and m.sizes == [784, 200]
    assert [l.out_features for l in m.q_nets[0].modules() if isinstance(l, torch.nn.Linear)] == [512, 256, 200]
    assert [l.out_features for l in m.p_nets[0].modules() if isinstance(l, torch.nn.Linear)] == [256, 512, 784]
    assert isinstance(m.q_nets[0].rest[0], torch.nn.LeakyReLU)
    assert "prior_logits" not in dict(m.named_parameters()) and "prior_logits" in dict(m.named_buffers())
    assert all(p is not m.prior_logits for p in m.generative_parameters())
    x = (torch.rand(3, 784) < 0.5).float()
    zs = m.sample_q(x, m.draw_uniforms(3))
    assert zs[0].shape == (3, 200) and torch.equal(zs[0].view(3, 20, 10).sum(-1), torch.ones(3, 20))
    mean, zp = m.sample_p(4)
    assert mean.shape == (4, 784) and torch.equal(zp[0].view(4, 20, 10).sum(-1), torch.ones(4, 20))


# ----- bounds -------------------------------------------------------------------------------------------

def test_elbo_and_iwae_match_enumeration():
    """The Monte Carlo ELBO's mean equals the exact ELBO, and the K = 50 bound lies between the ELBO and
    log p(x): z-tests over 4,000 draws at ALPHA, Bonferroni over the rows and the three comparisons."""
    model, x = cat_model(), random_binary(4, 5)
    n = 4000
    g = torch.Generator().manual_seed(3)
    w = model.log_weights(x, n, g)                                                 # [n, B]
    elbo, ll = exact_elbo(model, x).detach(), exact_log_likelihood(model, x)
    z_thr = bonferroni_z(ALPHA, 3 * x.shape[0])
    z = (w.mean(0) - elbo) / (w.std(0) / n ** 0.5)
    assert float(z.abs().max()) < z_thr, z
    iw = torch.stack([model.iwae_bound(x, 50, g) for _ in range(400)])             # [400, B]
    se = iw.std(0) / 20
    assert float(((elbo - iw.mean(0)) / se).max()) < z_thr                          # ELBO <= E[IWAE_50]
    assert float(((iw.mean(0) - ll) / se).max()) < z_thr                            # E[IWAE_50] <= log p(x)
    assert bool((elbo < ll).all())


def test_exact_size_check_counts_classes():
    check_exact_size(SBN(5, [2, 2], **CAT))
    with pytest.raises(TooLargeForExact, match="model.classes=10"):
        check_exact_size(SBN(5, [20], family="categorical", classes=10))
    configs = all_configurations([2, 1], dtype=torch.float64, family=Categorical(3))
    assert [c.shape for c in configs] == [(27, 6), (27, 3)]
    assert len({tuple(r) for r in torch.cat(configs, 1).tolist()}) == 27


# ----- the marginal estimator's differences ---------------------------------------------------------------

@pytest.mark.parametrize("sizes,kw", [((2, 2), {}), ((3, 2, 2), {}), ((2, 3), {"hidden": [4, 3]}),
                                      ((4,), {"learn_prior": False, "hidden": [6], "activation": "leaky_relu"}),
                                      ((3, 2), {"n_hidden": 1, "classes": 4})])
@pytest.mark.parametrize("route", ["cpu", "device"])
def test_categorical_deltas_equal_reference(sizes, kw, route):
    """The rank-2 pass equals the brute-force definition (float64, 1e-10), in chunks of one variable and whole,
    on the CPU route (x's log-likelihood in exp space) and the device route (softplus per entry)."""
    model, x = cat_model(sizes, **kw), random_binary(6, 5)
    s = sample_layers(model, x, torch.Generator().manual_seed(4))
    ref = categorical_deltas_reference(model, x, s.zs, s.uniforms)
    for max_elements in (1, 1 << 20):
        fast = categorical_deltas(model, x, s.zs, s.uniforms, max_elements, route)
        for a, b, z in zip(fast, ref, s.zs):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
            assert bool((a[model.family.blocks(z).bool()] == 0).all())               # 0 at the sampled class


def _count_paths(monkeypatch):
    """Counts the CPU linear route's calls: layers it took, layers it handed back (range), alternatives whose
    re-drawn top layer moved in one variable (the top layer's differences), in several (sums of columns), and
    scored densely."""
    import sbn_train.estimators.marginal_categorical as mc
    calls = {"linear": 0, "handed_back": 0, "one_move": 0, "columns": 0, "dense": 0}
    layer, one, top, dense = mc._layer_deltas_linear, mc._one_top_move, mc._TopChanges.__call__, mc._changed_dense

    def counted_layer(*a, **k):
        out = layer(*a, **k)
        calls["linear" if out is not None else "handed_back"] += 1
        return out

    def counted_one(weight, K, top_delta, classes, moves, *a):
        calls["one_move"] += int(moves.sum())
        return one(weight, K, top_delta, classes, moves, *a)

    def counted_top(self, classes, *a):
        out = top(self, classes, *a)
        calls["columns"] += 0 if out is None else classes.shape[0]
        return out

    def counted_dense(model, l, zs, noise, classes, *a):
        calls["dense"] += classes.shape[0]
        return dense(model, l, zs, noise, classes, *a)

    monkeypatch.setattr(mc, "_layer_deltas_linear", counted_layer)
    monkeypatch.setattr(mc, "_one_top_move", counted_one)
    monkeypatch.setattr(mc._TopChanges, "__call__", counted_top)
    monkeypatch.setattr(mc, "_changed_dense", counted_dense)
    return calls


@pytest.mark.parametrize("sizes,kw,scale_top,expect", [
    ((4, 3), {"classes": 4}, None, {"linear": 2, "one_move": True, "columns": True, "dense": False}),
    ((3,), {}, None, {"linear": 1}),
    ((3, 2, 2), {}, None, {"linear": 3, "dense": True}),
    # the top's generative net far outside exp range: layer 2 hands back (its differences still serve the
    # one-move rows), and layer 1's rows that moved in several variables go dense
    ((3, 3), {}, 400.0, {"linear": 1, "handed_back": 1, "one_move": True, "columns": False, "dense": True}),
    # every net outside the float64 exp range: both layers take the rank-2 route
    ((3, 2), {"scale": 300.0}, None, {"linear": 0, "handed_back": 2}),
])
def test_cpu_linear_route_paths_equal_reference(monkeypatch, sizes, kw, scale_top, expect):
    """The CPU route for linear nets (:class:`_LinearReader`: every class of a variable from products with
    exp tables; re-drawn layers' moved rows by the top layer's differences, by sums of columns, or densely;
    range checks handing a layer back to the rank-2 route) equals the definition at 1e-10 in float64, and
    each path named in ``expect`` was taken (True: some rows) or not (False, 0)."""
    model, x = cat_model(sizes, **kw), random_binary(8, 5)
    if scale_top is not None:
        with torch.no_grad():
            model.p_nets[-1].first.weight.mul_(scale_top)
    s = sample_layers(model, x, torch.Generator().manual_seed(7))
    ref = categorical_deltas_reference(model, x, s.zs, s.uniforms)
    calls = _count_paths(monkeypatch)
    for max_elements in (1, 1 << 20):
        fast = categorical_deltas(model, x, s.zs, s.uniforms, max_elements, "cpu")
        for a, b, z in zip(fast, ref, s.zs):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
            assert bool((a[model.family.blocks(z).bool()] == 0).all())
    for key, want in expect.items():
        got = calls[key] // 2 if key in ("linear", "handed_back") else calls[key]
        assert (bool(got) == want) if isinstance(want, bool) else got == want, (key, calls)


def test_distinct_rows_groups_equal_rows_only():
    """The grouping that lets alternatives share the top layer's terms: every row equals its representative,
    distinct rows get distinct groups, and past the hash's range each row stands for itself."""
    from sbn_train.estimators.marginal_categorical import _distinct_rows
    g = torch.Generator().manual_seed(3)
    rows = torch.randint(0, 3, (400, 4), generator=g)
    inverse, first = _distinct_rows(rows)
    assert torch.equal(rows[first[inverse]], rows)
    assert first.shape[0] == torch.unique(rows, dim=0).shape[0]
    wide = rows.clone()
    wide[0, 0] = 1 << 22                                                     # w * max >= 2^23: no hashing
    inverse, first = _distinct_rows(wide)
    assert torch.equal(inverse, torch.arange(400)) and torch.equal(first, torch.arange(400))


def test_distinct_rows_survive_a_hash_collision(monkeypatch):
    """A hash that puts every row in one group (a collision) is caught by the row-by-row check."""
    from sbn_train.estimators.marginal_categorical import _distinct_rows
    rows = torch.randint(0, 3, (50, 4), generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(torch, "unique", lambda keys, return_inverse: (keys[:1], torch.zeros_like(keys)))
    inverse, first = _distinct_rows(rows)
    assert torch.equal(rows[first[inverse]], rows) and first.shape[0] == 50


def test_exp_route_is_taken_and_float32_close():
    """The CPU route's exp-space softplus sums are used on a linear model, and in float32 stay within float32
    rounding of the float64 reference (relative 1e-4 of the differences' scale)."""
    from sbn_train.estimators.marginal_categorical import _ExpChange, _change_table
    model, x = cat_model((6, 4), classes=5), random_binary(8, 5)
    with torch.no_grad():
        assert _ExpChange(_change_table(model.p_nets[0].first.weight, 6, 5), model.p_nets[0].first(
            model.sample_q(x, model.draw_uniforms(8))[0]), "cpu").usable
    s = sample_layers(model, x, torch.Generator().manual_seed(4))
    ref = categorical_deltas_reference(model, x, s.zs, s.uniforms)
    m32 = cat_model((6, 4), classes=5).float()
    fast = categorical_deltas(m32, x.float(), [z.float() for z in s.zs], [u.float() for u in s.uniforms], None, "cpu")
    for a, b in zip(fast, ref):
        scale = float(b.abs().max())
        assert float((a.double() - b).abs().max()) <= 1e-4 * scale


def test_one_variable_is_exact():
    """With a single latent variable the marginal estimator's inference gradient is the exact one, whatever
    the noise (generative parameters get the pathwise gradient at the sample)."""
    model, x = cat_model((1,), classes=4), random_binary(3, 5)
    est = build_estimator("marginal", model).double()
    mask = inference_mask(model)
    exact = flat_exact(model, x)[mask]
    for seed in range(5):
        model.zero_grad()
        est(model, x, torch.Generator().manual_seed(seed)).surrogate.backward()
        torch.testing.assert_close(flat_grad(model)[mask], exact, rtol=1e-10, atol=1e-10)


# ----- every estimator config against the oracle -------------------------------------------------------

def test_every_config_is_classified():
    groups = [set(LISTS[k]) for k in ("unbiased", "biased", "iwae", "exact", "refused")]
    assert set().union(*groups) == set(available_estimators())
    assert sum(len(g) for g in groups) == len(available_estimators())
    assert set(LISTS["refused"]) == BINARY_ONLY
    assert {"marginal", "reinforce", "reinforce_ma", "nvil", "rloo"} <= set(LISTS["unbiased"])
    assert {"gumbel", "straight_through"} == set(LISTS["biased"])
    assert LISTS["iwae"] == ["vimco"] and LISTS["exact"] == ["exact"]
    assert set(LISTS["single_sample"]) == {"reinforce", "reinforce_ma", "nvil"}


@pytest.mark.parametrize("name", LISTS["unbiased"])
def test_unbiased_on_a_deep_categorical_model(name):
    model, x = cat_model(), random_binary(4, 5)
    est = randomized(build_estimator(name, model).double())
    assert_unbiased(sample_gradients(est, model, x, N_SAMPLES, seed=11), flat_exact(model, x), name)


@pytest.mark.parametrize("name", LISTS["biased"])
def test_biased_estimators_fail_on_a_categorical_model(name):
    model, x = cat_model(), random_binary(4, 5)
    est = randomized(build_estimator(name, model).double())
    assert_biased(sample_gradients(est, model, x, N_SAMPLES, seed=11), flat_exact(model, x), name)


def test_exact_estimator_is_the_oracle():
    model, x = cat_model(), random_binary(4, 5)
    model.zero_grad()
    build_estimator("exact", model)(model, x).surrogate.backward()
    torch.testing.assert_close(flat_grad(model), flat_exact(model, x), rtol=1e-12, atol=1e-12)


def exact_pair_bound_gradient(model, x):
    """Gradient of the batch-mean NEGATIVE 2-sample bound, by enumerating all pairs of configurations."""
    configs = all_configurations(model.latent_sizes, dtype=x.dtype, family=model.family)
    B, C = x.shape[0], configs[0].shape[0]
    xr = x[:, None].expand(B, C, x.shape[1]).reshape(B * C, -1)
    zr = [z[None].expand(B, C, z.shape[1]).reshape(B * C, -1) for z in configs]
    log_q = model.log_q(xr, zr).view(B, C)
    log_w = model.log_joint(xr, zr).view(B, C) - log_q
    pair_bound = torch.logaddexp(log_w[:, :, None], log_w[:, None, :]) - math.log(2)
    bound = ((log_q[:, :, None] + log_q[:, None, :]).exp() * pair_bound).sum((1, 2))
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(-bound.mean(), list(model.parameters()))])


def test_vimco_is_unbiased_for_the_two_sample_bound():
    model, x = cat_model(), random_binary(4, 5)
    samples = sample_gradients(build_estimator("vimco", model, n_samples=2).double(), model, x, N_SAMPLES, seed=11)
    assert_unbiased(samples, exact_pair_bound_gradient(model, x), "vimco vs the 2-sample bound")
    assert_biased(samples, flat_exact(model, x), "vimco vs the ELBO")


@pytest.fixture(scope="module")
def marginal_at_point():
    return marginal_samples_at(cat_model(), random_binary(4, 5), N_VARIANCE)


@pytest.mark.parametrize("other", LISTS["single_sample"])
def test_marginal_variance_not_larger(other, marginal_at_point):
    """The marginal estimator is the conditional expectation of these given the other noise: per inference
    coordinate no larger variance (one-sided, Bonferroni at ALPHA)."""
    model, x, mask, marginal = marginal_at_point
    samples = sample_gradients(build_estimator(other, model).double().eval(), model, x, N_VARIANCE, seed=102)
    assert_variance_not_larger(marginal, samples[:, mask], f"marginal vs {other}")


@pytest.mark.parametrize("name", sorted(BINARY_ONLY))
def test_binary_only_estimators_refuse(name):
    with pytest.raises(ValueError, match="binary latents only|bernoulli latents only"):
        build_estimator(name, cat_model())


# ----- replicas ---------------------------------------------------------------------------------------------

def _cat_state(name, seed, lr, wd):
    from sbn_train.config import OptimConfig
    from sbn_train.state import TrainState
    torch.manual_seed(seed)
    data = torch.rand(40, 10, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    model = SBN(10, [3, 2], x_mean=data.mean(0), **CAT).double()
    est = build_estimator(name, model).double()
    return TrainState.create(model, est, data, 6, OptimConfig(name="rmsprop", lr=lr, weight_decay=wd), seed)


@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "looped"])
@pytest.mark.parametrize("name", [n for n in available_estimators() if n not in BINARY_ONLY])
def test_categorical_replica_step_equals_standalone_step(name, vectorize):
    """Two steps of a group of three runs (own seeds, learning rates, weight decay) equal the standalone
    runs' steps (float64, 1e-10), with the replicas vectorized and taking turns."""
    from test_replicas import _group_vs_standalone
    torch.set_default_dtype(torch.float64)
    try:
        _group_vs_standalone(name, steps=2, vectorize=vectorize, make_state=lambda *run: _cat_state(name, *run))
    finally:
        torch.set_default_dtype(torch.float32)


# ----- the command line -------------------------------------------------------------------------------------

CLI_SMALL = ["dataset=synthetic", "dataset.n_train=200", "dataset.n_valid=100", "dataset.n_test=100",
             "train.batch_size=20", "train.eval_every=10", "train.log_every=5", "eval.limit=100", "eval.iwae_k=5",
             "eval.images=4", "test.elbo_samples=5", "test.iwae_k=20", "train.progress=false", "device=cpu"]


@pytest.mark.parametrize("args,message", [
    (["model=categorical_2layer", "estimator=arm"], "estimator ARM is defined for binary latents only"),
    (["model=categorical_1layer", "estimator=marginal_paper_code"], "binary latents only"),
    (["model=categorical_2layer", "model.classes=1"], "model.classes must be >= 2"),
    (["model=categorical_2layer", "model.latent_sizes=[20,0]"], "model.latent_sizes must be a non-empty list"),
    (["model=categorical_1layer", "estimator=exact"], "model.classes=10"),
    (["model.family=gaussian"], "model.family must be one of bernoulli, categorical"),
    (["model=categorical_vae", "model.activation=relu6"], "model.activation must be one of"),
])
def test_categorical_bad_input(tmp_path, args, message):
    from test_cli import sbn_train
    r = sbn_train(*CLI_SMALL, "train.max_steps=2", *args, f"hydra.run.dir={tmp_path / 'run'}")
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len([l for l in r.stderr.splitlines() if "error" in l]) == 1, r.stderr[-2000:]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.parametrize("model,estimator", [("categorical_2layer", "marginal"), ("categorical_vae", "gumbel"),
                                             ("categorical_1layer", "vimco")])
def test_categorical_runs_end_to_end(tmp_path, model, estimator):
    """Training, evaluation (ELBO and IWAE), the variance probe, images, the test and results.json."""
    from test_cli import sbn_train
    run = tmp_path / "run"
    extra = ["model.hidden=[16,8]"] if model == "categorical_vae" else ["model.latent_sizes=[4,3]"] * (model != "categorical_1layer")
    r = sbn_train(*CLI_SMALL, f"model={model}", f"estimator={estimator}", "model.classes=5", *extra,
                  "train.max_steps=20", "variance.every=20", "variance.samples=3", f"hydra.run.dir={run}")
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    results = json.loads((run / "results.json").read_text())
    m = results["metrics"]
    assert results["status"] == "finished" and math.isfinite(m["test/elbo"]) and math.isfinite(m["test/iwae20"])
    assert m["test/iwae20"] >= m["test/elbo"] - 5
    assert any(k.startswith("grad_var/") for k in m), sorted(m)
    from test_cli import tensorboard_extras
    extras = tensorboard_extras(run)
    assert extras["images"] == ["images/data", "images/reconstructions", "images/samples"]
    assert extras["hparams"]["family"] == "categorical" and extras["hparams"]["classes"] == "5"


def test_runs_recorded_before_the_family_keys_resume():
    """A binary run's record from before ``model.family`` (and the other keys added with it) is the same
    config as one with their defaults; a categorical config is not."""
    from sbn_train.state import ADDED_KEYS, config_changes
    old = {"model.latent_sizes": [200, 200], "model.n_hidden": 0, "estimator._target_": "x.StraightThrough"}
    assert config_changes(old, {**old, **ADDED_KEYS}) == []
    assert config_changes(old, {**old, **ADDED_KEYS, "model.family": "categorical"}) == [
        "model.family: bernoulli -> categorical"]


def test_report_labels_categorical_models_and_one_seed_errors():
    """scripts/report.py names a categorical model by its family, and with one seed gives the test rows'
    standard error (results.json's ``<metric>_se``)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import report
    assert report.model_label([200, 200], 0) == "linear 200-200"
    assert report.model_label([200, 200], 2) == "nonlinear 200-200"
    assert report.model_label([20, 20], 0, "categorical", 10, []) == "categorical linear 20x10-20x10"
    assert report.model_label([20], 0, "categorical", 10, [512, 256]) == "categorical MLP 512-256, 20x10"

    class R:
        def __init__(self, v, se):
            self.metrics = {"test/elbo": v, "test/elbo_se": se}
    assert report.test_mean_se([R(-100.0, 1.5)], "test/elbo") == (-100.0, 1.5)
    m, se = report.test_mean_se([R(-100.0, 1.5), R(-102.0, 1.5)], "test/elbo")
    assert m == -101.0 and se == pytest.approx(1.0)                  # over seeds: std 1.414 / sqrt(2)


@pytest.mark.parametrize("name", [n for n in available_estimators() if n not in BINARY_ONLY])
def test_categorical_step_reads_nothing_back(name):
    """What a CUDA graph captures (the device route): forward and backward of each categorical estimator read
    nothing back to the host."""
    from sbn_train.estimators.flip_common import set_route
    from sbn_train.sync_guard import no_host_sync
    torch.manual_seed(0)
    model = SBN(20, [4, 3], x_mean=torch.full((20,), 0.4), family="categorical", classes=5)
    x = (torch.rand(16, 20, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    est = build_estimator(name, model)
    set_route(est, "device")
    with no_host_sync():
        out = est(model, x, torch.Generator().manual_seed(2))
        out.surrogate.backward()
        if out.aux_loss is not None:
            out.aux_loss.backward()
    assert all(p.grad is not None for p in model.inference_parameters())
