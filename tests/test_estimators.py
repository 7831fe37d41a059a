"""The marginal estimator against the exact gradient on a tiny float64 SBN (5 visible, 2 layers x 3 units), and the
estimator contract. Every config's unbiasedness test is in test_estimator_zoo.py."""
import pytest
import torch

from sbn_train.diagnostics import TooLargeForExact, exact_gradient
from sbn_train.estimators import available_estimators, build_estimator
from sbn_train.estimators.marginal import flip_deltas, flip_deltas_reference
from sbn_train.models import SBN

from conftest import random_binary, random_sbn
from stats import bonferroni_z, flat_grad, sample_gradients, unbiasedness_z

ALPHA = 1e-3          # false-alarm rate of each unbiasedness test (whole gradient, Bonferroni-corrected)
N_SAMPLES = 3000


def test_unbiasedness_test_sees_a_bias():
    """Power check of the unbiasedness test (test_estimator_zoo.py): a 2% scaled gradient is a biased estimator
    and must fail it."""
    model, x = random_sbn(), random_binary(4, 5)
    exact = torch.cat([g.reshape(-1) for g in exact_gradient(model, x)])
    samples = 1.02 * sample_gradients(build_estimator("marginal", model).double(), model, x, N_SAMPLES, seed=11)
    z, live = unbiasedness_z(samples, exact)
    assert float(z.max()) > bonferroni_z(ALPHA, int(live.sum()))


def test_exact_refuses_large_models():
    with pytest.raises(TooLargeForExact, match="at most 20 latent units"):
        build_estimator("exact", SBN(x_dim=5, latent_sizes=[20, 1]))


@pytest.mark.parametrize("n_hidden,sizes", [(0, (3, 3)), (0, (4, 3, 2, 3)), (2, (3, 4))])
def test_fast_marginal_equals_reference(n_hidden, sizes):
    """Same uniforms -> the fast (rank-1, chunked) and brute-force implementations agree to 1e-10."""
    model, x = random_sbn(latent_sizes=sizes, n_hidden=n_hidden), random_binary(6, 5)
    grads = {}
    for impl in ("fast", "reference"):
        est = build_estimator("marginal", model, implementation=impl, max_elements=7)
        model.zero_grad()
        est(model, x, torch.Generator().manual_seed(2)).surrogate.backward()
        grads[impl] = flat_grad(model)
    rel = (grads["fast"] - grads["reference"]).norm() / grads["reference"].norm()
    assert rel < 1e-10
    g = torch.Generator().manual_seed(4)
    us = model.draw_uniforms(6, g, dtype=torch.float64)
    zs = model.sample_q(x, us)
    for a, b in zip(flip_deltas(model, x, zs, us, max_elements=5), flip_deltas_reference(model, x, zs, us)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_one_latent_unit_is_exact():
    """With one latent unit the marginal estimator's inference gradient has zero variance and equals the
    exact gradient. (Generative parameters get the pathwise gradient at the sampled z, as in the paper,
    so they vary; their unbiasedness is tested above.)"""
    model, x = random_sbn(latent_sizes=(1,)), random_binary(4, 5)
    exact = exact_gradient(model, x)
    est = build_estimator("marginal", model)
    names = [n for n, _ in model.named_parameters()]
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        model.zero_grad()
        est(model, x, g).surrogate.backward()
        for n, p, e in zip(names, model.parameters(), exact):
            if n.startswith("q_nets"):
                torch.testing.assert_close(p.grad, e, rtol=1e-12, atol=1e-12)


def test_build_estimator_errors():
    model = SBN(x_dim=5, latent_sizes=[3, 3])
    with pytest.raises(ValueError, match="unknown estimator 'nope'"):
        build_estimator("nope", model)
    with pytest.raises(ValueError, match="unknown option"):
        build_estimator("marginal", model, not_an_option=1)
    assert {"marginal", "reinforce", "reinforce_ma", "nvil", "exact"} <= set(available_estimators())


def test_estimate_contract():
    model = SBN(x_dim=5, latent_sizes=[3, 3])
    x = random_binary(8, 5).float()
    for name in available_estimators():
        est = build_estimator(name, model)
        out = est(model, x, torch.Generator().manual_seed(0))
        assert out.surrogate.dim() == 0 and out.elbo.shape == (8,) and not out.elbo.requires_grad
        model.zero_grad()
        loss = out.surrogate if out.aux_loss is None else out.surrogate + out.aux_loss
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters()), name
        # metrics stay on the device: detached 0-dim tensors, read by the training loop when it logs
        for key, v in out.metrics.items():
            assert isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad, (name, key)
    metrics = build_estimator("relax", model)(model, x, torch.Generator().manual_seed(0)).metrics
    assert {"temperature1", "eta2"} <= set(metrics)
    assert set(build_estimator("vimco", model)(model, x, torch.Generator().manual_seed(0)).metrics) == {"iwae5"}
