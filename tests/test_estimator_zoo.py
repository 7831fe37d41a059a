"""Every estimator config against the exact gradient on the tiny float64 SBN (5 visible, 2 layers x 3 units).

The lists are derived, not written by hand: each file of ``configs/estimator/`` (and each option variant
below) is classified by the attributes of the estimator it builds (``monte_carlo``, ``unbiased``,
``objective``, ``q_samples``). Unbiased ones must pass the unbiasedness test, biased ones must FAIL the
same test, "iwae" ones are tested against the exact gradient of the K-sample bound, and the exact one must
equal the exact gradient. A new config is picked up without touching this file.

Every threshold comes from a stated false-alarm rate (ALPHA, Bonferroni-corrected over coordinates) and
the standard errors of the samples; seeds are fixed, so every test is deterministic.
"""
import math

import pytest
import torch
from scipy import stats as sps

from sbn_train.diagnostics import all_configurations, exact_gradient
from sbn_train.estimators import available_estimators, build_estimator
from sbn_train.models import SBN
from sbn_train.train import apply_grads, compute_grads

from conftest import random_binary, random_sbn
from stats import bonferroni_z, flat_grad, randomize_estimator as randomized, sample_gradients, unbiasedness_z

ALPHA = 1e-3          # false-alarm rate of each test (whole gradient or all coordinates together)
N_SAMPLES = 3000      # estimates per unbiasedness test
N_VARIANCE = 2000     # estimates per variance estimate

# option variants tested besides the config files, classified like them
OPTION_VARIANTS = [("rloo", {"n_samples": 4}), ("marginal", {"n_samples": 3})]


def _classify() -> dict[str, list]:
    """Builds every config (and variant) once for the tiny model's shape and sorts it by its attributes."""
    lists = {"unbiased": [], "biased": [], "iwae": [], "exact": [], "single_sample": []}
    for name, overrides in [(n, {}) for n in available_estimators()] + OPTION_VARIANTS:
        est = build_estimator(name, SBN(x_dim=5, latent_sizes=[3, 3]), **overrides)
        if not est.monte_carlo:
            lists["exact"].append(name)
        elif est.objective == "iwae":
            lists["iwae"].append(name)
        elif est.objective != "elbo":
            raise AssertionError(f"{name}: no test for objective {est.objective!r}")
        else:
            lists["unbiased" if est.unbiased else "biased"].append((name, overrides))
            # the variance comparison: the estimators the theorem covers (the marginal estimator is their
            # conditional expectation given the other noise), one sample of z per example
            if est.unbiased and est.q_samples == 1 and not overrides and est.rao_blackwellized_by_marginal:
                lists["single_sample"].append(name)
    return lists


LISTS = _classify()
UNBIASED, BIASED, IWAE, EXACT, SINGLE_SAMPLE = (LISTS[k] for k in ("unbiased", "biased", "iwae", "exact",
                                                                    "single_sample"))


def _ids(cases):
    return [f"{n}{o or ''}" for n, o in cases]


def flat_exact(model, x):
    return torch.cat([g.reshape(-1) for g in exact_gradient(model, x)])


def inference_mask(model):
    return torch.cat([torch.full((p.numel(),), n.startswith("q_nets")) for n, p in model.named_parameters()])


def assert_unbiased(samples, exact, what):
    z, live = unbiasedness_z(samples, exact)
    threshold = bonferroni_z(ALPHA, int(live.sum()))
    assert live.sum() > 0.9 * exact.numel(), what
    assert float(z.max()) < threshold, f"{what}: max z {float(z.max()):.2f} >= {threshold:.2f}"
    torch.testing.assert_close(samples.mean(0)[~live], exact[~live], rtol=1e-9, atol=1e-9)


def assert_biased(samples, exact, what):
    z, live = unbiasedness_z(samples, exact)
    threshold = bonferroni_z(ALPHA, int(live.sum()))
    assert float(z.max()) > threshold, f"{what}: max z {float(z.max()):.2f} <= {threshold:.2f}: bias not seen"


def test_every_config_is_tested():
    """Each config file lands in exactly one of the tested groups."""
    configs = set(available_estimators())
    groups = [{n for n, o in UNBIASED if not o}, {n for n, o in BIASED if not o}, set(IWAE), set(EXACT)]
    assert set().union(*groups) == configs
    assert sum(len(g) for g in groups) == len(configs)
    assert {"gumbel", "straight_through"} <= groups[1] and {"marginal", "reinforce"} <= groups[0]
    # the variance ordering covers the likelihood-ratio estimators with unit-free baselines, and only them
    assert set(SINGLE_SAMPLE) == {"reinforce", "reinforce_ma", "nvil"}


@pytest.mark.parametrize("name,overrides", UNBIASED, ids=_ids(UNBIASED))
def test_unbiased_against_exact(name, overrides):
    """Random (untrained) baselines, control variates and moving averages: unbiasedness must not depend on them."""
    model, x = random_sbn(), random_binary(4, 5)
    est = randomized(build_estimator(name, model, **overrides).double())
    assert est.unbiased
    samples = sample_gradients(est, model, x, N_SAMPLES, seed=11)
    assert_unbiased(samples, flat_exact(model, x), name)


@pytest.mark.parametrize("name,overrides", BIASED, ids=_ids(BIASED))
def test_biased_estimators_fail_the_unbiasedness_test(name, overrides):
    """The same test, same size and threshold, must reject every estimator that declares itself biased
    (the relaxations, the published code's marginal estimator): it sees bias."""
    model, x = random_sbn(), random_binary(4, 5)
    est = randomized(build_estimator(name, model, **overrides).double())
    assert not est.unbiased
    assert_biased(sample_gradients(est, model, x, N_SAMPLES, seed=11), flat_exact(model, x), name)


@pytest.mark.parametrize("name", EXACT)
def test_exact_estimator_is_the_oracle(name):
    model, x = random_sbn(), random_binary(4, 5)
    est = build_estimator(name, model)
    model.zero_grad()
    est(model, x).surrogate.backward()
    torch.testing.assert_close(flat_grad(model), flat_exact(model, x), rtol=1e-12, atol=1e-12)


def exact_bound_gradient(model, x):
    """Gradient of the batch-mean NEGATIVE 2-sample bound E[log (w_1 + w_2) / 2], by enumerating all pairs."""
    configs = all_configurations(model.latent_sizes, dtype=x.dtype)              # [C, H_l] each
    B, C = x.shape[0], configs[0].shape[0]
    xr = x[:, None].expand(B, C, x.shape[1]).reshape(B * C, -1)
    zr = [z[None].expand(B, C, z.shape[1]).reshape(B * C, -1) for z in configs]
    log_q = model.log_q(xr, zr).view(B, C)
    log_w = model.log_joint(xr, zr).view(B, C) - log_q
    pair_bound = torch.logaddexp(log_w[:, :, None], log_w[:, None, :]) - math.log(2)     # [B, C, C]
    pair_prob = (log_q[:, :, None] + log_q[:, None, :]).exp()
    bound = (pair_prob * pair_bound).sum((1, 2))                                   # [B]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(-bound.mean(), list(model.parameters()))])


@pytest.mark.parametrize("name", IWAE)
def test_unbiased_for_the_k_sample_bound(name):
    """K = 2 against the exact gradient of the 2-sample bound (64^2 pairs of configurations); the ELBO
    gradient is a different target, and the same test tells them apart."""
    model, x = random_sbn(), random_binary(4, 5)
    est = randomized(build_estimator(name, model, n_samples=2).double())
    assert not est.unbiased and est.objective == "iwae"
    samples = sample_gradients(est, model, x, N_SAMPLES, seed=11)
    assert_unbiased(samples, exact_bound_gradient(model, x), f"{name} vs the 2-sample bound")
    assert_biased(samples, flat_exact(model, x), f"{name} vs the ELBO")


def variance_excess_z(a, b):
    """Per coordinate (Var(a) - Var(b)) / standard error, for independent samples ``[n, P]``.

    The standard error of a sample variance is sqrt((m4 - s^4 (n-3)/(n-1)) / n), m4 the fourth central moment."""
    def var_and_se2(s):
        n = s.shape[0]
        v = s.var(0)
        m4 = ((s - s.mean(0)) ** 4).mean(0)
        return v, (m4 - v ** 2 * (n - 3) / (n - 1)).clamp_min(0) / n
    va, sa = var_and_se2(a)
    vb, sb = var_and_se2(b)
    return (va - vb) / (sa + sb).clamp_min(1e-300).sqrt()


def assert_variance_not_larger(low, high, what):
    """No coordinate of ``low`` has a significantly larger variance than ``high`` (one-sided, Bonferroni),
    and the mean over coordinates is smaller."""
    z = variance_excess_z(low, high)
    threshold = float(sps.norm.isf(ALPHA / z.numel()))
    assert float(z.max()) < threshold, f"{what}: a coordinate's variance is larger, z {float(z.max()):.2f}"
    assert float(low.var(0).mean()) < float(high.var(0).mean()), what


def marginal_samples_at(model, x, n=None):
    """(model, x, inference mask, the marginal estimator's inference gradients [n, live]) in eval mode, the
    reference of the variance-ordering tests."""
    mask = inference_mask(model)
    samples = sample_gradients(build_estimator("marginal", model).double().eval(), model, x, n or N_VARIANCE,
                               seed=101)
    return model, x, mask, samples[:, mask]


@pytest.fixture(scope="module")
def marginal_at_point():
    return marginal_samples_at(random_sbn(), random_binary(4, 5))


@pytest.mark.parametrize("other", SINGLE_SAMPLE)
def test_marginal_variance_not_larger_than_single_sample_estimators(other, marginal_at_point):
    """Var(marginal) <= Var(other) per inference coordinate, every estimator as configured (initial
    baselines, temperature, eta), at the same model point and batch, independent noise."""
    model, x, mask, marginal = marginal_at_point
    est = build_estimator(other, model).double().eval()
    assert est.unbiased
    samples = sample_gradients(est, model, x, N_VARIANCE, seed=102)[:, mask]
    assert_variance_not_larger(marginal, samples, f"marginal vs {other}")


def test_disarm_variance_not_larger_than_arm():
    """DisARM is ARM's conditional expectation given the antithetic pair: per coordinate no larger variance."""
    model, x = random_sbn(), random_binary(4, 5)
    mask = inference_mask(model)
    disarm = sample_gradients(build_estimator("disarm", model).double(), model, x, N_SAMPLES, seed=201)
    arm = sample_gradients(build_estimator("arm", model).double(), model, x, N_SAMPLES, seed=202)
    assert_variance_not_larger(disarm[:, mask], arm[:, mask], "disarm vs arm")


def grouped_inference_variance(est, model, x, n, groups, seed):
    """Mean over inference coordinates of the sample variance, in ``groups`` independent groups ``[groups]``."""
    samples = sample_gradients(est.eval(), model, x, n, seed)[:, inference_mask(model)]
    return torch.stack([g.var(0).mean() for g in samples.chunk(groups)])


def test_variance_minimizing_steps_lower_relax_variance():
    """From random (untrained) eta, temperatures and control-variate nets, 200 steps of the training loop's
    own update (``compute_grads`` and ``apply_grads``; the model's learning rate is 0, so only the estimator moves) lower RELAX's
    inference-gradient variance. Welch t over 20 + 20 independent groups, one-sided at ALPHA."""
    model, x = random_sbn(), random_binary(4, 5)
    est = randomized(build_estimator("relax", model).double())
    groups = 20
    before = grouped_inference_variance(est, model, x, 1000, groups, seed=21)
    params = [p for p in est.parameters() if p.requires_grad]
    model_opt = torch.optim.SGD(model.parameters(), lr=0.0)
    est_opt = torch.optim.Adam(params, lr=1e-2)
    frozen = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(7)
    est.train()
    for _ in range(200):
        out = est(model, x, gen)
        assert out.aux_loss is not None and out.aux_loss.requires_grad
        compute_grads(out, model_opt, est_opt, params)
        apply_grads(out, model_opt, est_opt)
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.parameters()))
    after = grouped_inference_variance(est, model, x, 1000, groups, seed=22)
    t = float((after.mean() - before.mean()) / ((after.var() + before.var()) / groups).sqrt())
    assert t < -sps.t.isf(ALPHA, df=groups - 1), f"variance before {float(before.mean()):.4g}, after " \
                                                  f"{float(after.mean()):.4g}, t {t:.2f}"


def test_estimator_parameters_get_gradients_from_aux_loss_only():
    """REBAR/RELAX: the surrogate's gradient reaches model parameters only; aux_loss reaches the estimator's."""
    model, x = random_sbn(), random_binary(4, 5)
    for name in ("rebar", "relax"):
        est = build_estimator(name, model).double().train()
        out = est(model, x, torch.Generator().manual_seed(0))
        est_params = list(est.parameters())
        assert all(g is None for g in torch.autograd.grad(out.surrogate, est_params, retain_graph=True,
                                                          allow_unused=True)), name
        grads = torch.autograd.grad(out.aux_loss, est_params, allow_unused=True)
        assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads), name
        assert est.eval()(model, x, torch.Generator().manual_seed(0)).aux_loss is None


def test_estimators_do_not_change_state_in_eval_mode():
    model, x = random_sbn(), random_binary(4, 5)
    est = build_estimator("muprop", model).double().eval()
    before = {k: v.clone() for k, v in est.state_dict().items()}
    est(model, x, torch.Generator().manual_seed(0))
    assert all(torch.equal(before[k], v) for k, v in est.state_dict().items())
    est.train()(model, x, torch.Generator().manual_seed(0))
    assert not torch.equal(before["ma_mean"], est.ma_mean)
