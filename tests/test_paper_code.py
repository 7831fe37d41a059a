"""The variants that reproduce the authors' published code: ``marginal_paper_code`` (log p(z_L) of the flipped
branches at q's mean of the top layer) and ``leg_paper_code`` (LEG with upstream terms in every signal).

Thresholds from a stated false-alarm rate (ALPHA, Bonferroni over coordinates) and standard errors; fixed seeds.
"""
import pytest
import torch

from sbn_train.diagnostics import all_configurations, exact_gradient
from sbn_train.estimators import build_estimator
from sbn_train.estimators.marginal import flip_deltas, flip_deltas_reference, top_prior_mean_shift

from conftest import random_binary, random_sbn
from stats import bonferroni_z, flat_grad, sample_gradients, unbiasedness_z

ALPHA = 1e-3
N_SAMPLES = 3000


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


def assert_unbiased_for(samples, target, what):
    z, live = unbiasedness_z(samples, target)
    threshold = bonferroni_z(ALPHA, int(live.sum()))
    assert live.sum() > 0.9 * target.numel(), what
    assert float(z.max()) < threshold, f"{what}: max z {float(z.max()):.2f} >= {threshold:.2f}"


def one_gradient(est, model, x, seed):
    model.zero_grad(set_to_none=True)
    est(model, x, torch.Generator().manual_seed(seed)).surrogate.backward()
    return flat_grad(model)


def zero_prior(model):
    with torch.no_grad():
        model.prior_logits.zero_()
    return model


# ----- marginal_paper_code -------------------------------------------------------------------------------
def predicted_bias(model, x):
    """The expected gradient of marginal_paper_code minus the exact one, by enumeration: for the top layer's
    logits a of each row, s (1 - s) (1 - 2 s (1 - s)) b / B (s = sigmoid(a), b the prior logits), averaged
    over q's configurations of the layers below; no other coordinate is biased."""
    configs = all_configurations(model.latent_sizes, dtype=x.dtype)
    B, C, L = x.shape[0], configs[0].shape[0], model.n_layers
    xr = x[:, None].expand(B, C, x.shape[1]).reshape(B * C, -1)
    zr = [z[None].expand(B, C, z.shape[1]).reshape(B * C, -1) for z in configs]
    with torch.no_grad():
        weight = model.log_q(xr, zr).exp()                                      # q(z | x), [B*C]
    a = model.q_logits(L, ([xr] + zr)[-2])                                       # [B*C, H_L]
    with torch.no_grad():
        s = torch.sigmoid(a)
        beta = s * (1 - s) * (1 - 2 * s * (1 - s)) * model.prior_logits           # [B*C, H_L]
    surrogate = (weight[:, None] * beta * a).sum() / B
    grads = torch.autograd.grad(surrogate, list(model.parameters()), allow_unused=True)
    return flat([torch.zeros_like(p) if g is None else g for g, p in zip(grads, model.parameters())])


def test_marginal_paper_code_matches_the_predicted_bias():
    """Non-zero prior logits: unbiased for exact + the bias formula (the same test that it fails against the
    exact gradient alone, in test_estimator_zoo.py), and the bias sits in the top inference layer only."""
    model, x = random_sbn(), random_binary(4, 5)
    est = build_estimator("marginal_paper_code", model).double()
    assert not est.unbiased
    bias = predicted_bias(model, x)
    top = torch.cat([torch.full((p.numel(),), n.startswith(f"q_nets.{model.n_layers - 1}."))
                     for n, p in model.named_parameters()])
    assert bool((bias[~top] == 0).all()) and float(bias[top].abs().min()) > 0
    samples = sample_gradients(est, model, x, N_SAMPLES, seed=11)
    assert_unbiased_for(samples, flat(exact_gradient(model, x)) + bias, "marginal_paper_code vs exact + bias")


def test_marginal_paper_code_unbiased_with_zero_prior_logits():
    model, x = zero_prior(random_sbn()), random_binary(4, 5)
    samples = sample_gradients(build_estimator("marginal_paper_code", model).double(), model, x, N_SAMPLES, seed=11)
    assert_unbiased_for(samples, flat(exact_gradient(model, x)), "marginal_paper_code, prior logits 0")


@pytest.mark.parametrize("sizes,n_hidden", [((3, 3), 0), ((4, 3, 2, 3), 0), ((3, 4), 2), ((4,), 0)])
def test_marginal_paper_code_equals_marginal_with_zero_prior_logits(sizes, n_hidden):
    """Same generator, prior logits 0: the same numbers as ``marginal``, on both implementations."""
    model, x = zero_prior(random_sbn(latent_sizes=sizes, n_hidden=n_hidden)), random_binary(6, 5)
    for impl in ("fast", "reference"):
        a = one_gradient(build_estimator("marginal", model, implementation=impl), model, x, seed=3)
        b = one_gradient(build_estimator("marginal_paper_code", model, implementation=impl), model, x, seed=3)
        assert torch.equal(a, b), impl


@pytest.mark.parametrize("sizes,n_hidden", [((3, 3), 0), ((4, 3, 2, 3), 0), ((3, 4), 2), ((4,), 0)])
def test_marginal_paper_code_fast_equals_reference(sizes, n_hidden):
    """The fast path plus :func:`top_prior_mean_shift` against the definition, same uniforms, to 1e-10; the
    shift is not zero, so the variant differs from ``marginal``."""
    model, x = random_sbn(latent_sizes=sizes, n_hidden=n_hidden), random_binary(6, 5)
    us = model.draw_uniforms(6, torch.Generator().manual_seed(4), dtype=torch.float64)
    zs = model.sample_q(x, us)
    shifts = top_prior_mean_shift(model, x, zs, us, max_elements=5)
    ref = flip_deltas_reference(model, x, zs, us, top_prior_at_mean=True)
    for delta, shift, r in zip(flip_deltas(model, x, zs, us), shifts, ref):
        torch.testing.assert_close(delta + shift, r, rtol=1e-10, atol=1e-10)
    assert all(float(s.abs().max()) > 1e-3 for s in shifts)
    grads = [one_gradient(build_estimator("marginal_paper_code", model, implementation=impl, max_elements=7),
                          model, x, seed=2) for impl in ("fast", "reference")]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-10)


# ----- leg_paper_code ------------------------------------------------------------------------------------
def test_leg_upstream_terms_unbiased_on_three_layers():
    """With three layers the middle layer's signal gains upstream terms; the estimator stays unbiased."""
    model, x = random_sbn(latent_sizes=(3, 3, 2)), random_binary(4, 5)
    est = build_estimator("leg", model, upstream_terms=True).double()
    assert est.unbiased
    samples = sample_gradients(est, model, x, N_SAMPLES, seed=11)
    assert_unbiased_for(samples, flat(exact_gradient(model, x)), "leg with upstream terms, 3 layers")
    # ... and it is not the same estimator as leg there: the middle layer's estimates differ
    plain = one_gradient(build_estimator("leg", model).double(), model, x, seed=5)
    paper = one_gradient(est, model, x, seed=5)
    assert float((plain - paper).abs().max()) > 1e-6


@pytest.mark.parametrize("n_hidden", [0, 2])
def test_leg_paper_code_equals_leg_on_two_layers(n_hidden):
    """On two layers only the top layer has upstream terms, and there they cancel: same numbers up to rounding."""
    model, x = random_sbn(latent_sizes=(4, 3), n_hidden=n_hidden), random_binary(6, 5)
    for seed in range(3):
        a = one_gradient(build_estimator("leg", model), model, x, seed)
        b = one_gradient(build_estimator("leg_paper_code", model), model, x, seed)
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
