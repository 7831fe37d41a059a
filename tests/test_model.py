import itertools

import pytest
import torch

from sbn_train.diagnostics import all_configurations, exact_elbo, exact_log_likelihood
from sbn_train.models import SBN

from conftest import random_binary, random_sbn


def test_public_constructor_and_shapes():
    model = SBN(x_dim=5, latent_sizes=[3, 3])
    model = model.double()
    x = random_binary(6, 5)
    zs = model.sample_q(x, model.draw_uniforms(6))
    assert [z.shape for z in zs] == [(6, 3), (6, 3)]
    assert all(z.dtype == torch.float64 for z in zs)
    assert model.log_q(x, zs).shape == (6,)
    assert model.log_joint(x, zs).shape == (6,)
    lj = model.log_joint(x, zs).sum()
    lj.backward()
    assert all(p.grad is not None for p in model.generative_parameters())


@pytest.mark.parametrize("bad", [[], [0], [3, -1]])
def test_bad_layer_sizes(bad):
    with pytest.raises(ValueError, match="latent_sizes"):
        SBN(x_dim=5, latent_sizes=bad)


@pytest.mark.parametrize("n_hidden", [0, 2])
def test_q_normalized(n_hidden):
    model = random_sbn(n_hidden=n_hidden)
    x = random_binary(3, 5)
    total = torch.logsumexp(_per_config_log_q(model, x), 1)
    torch.testing.assert_close(total, torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-12)


def _per_config_log_q(model, x):
    zc = all_configurations(model.latent_sizes, dtype=torch.float64)
    C = zc[0].shape[0]
    rows = []
    for b in range(x.shape[0]):
        rows.append(model.log_q(x[b:b + 1].expand(C, -1), zc))
    return torch.stack(rows)


@pytest.mark.parametrize("n_hidden", [0, 2])
def test_p_normalized(n_hidden):
    model = random_sbn(x_dim=4, latent_sizes=(2, 3), n_hidden=n_hidden)
    xs = torch.tensor(list(itertools.product([0.0, 1.0], repeat=4)), dtype=torch.float64)
    log_px = exact_log_likelihood(model, xs)
    torch.testing.assert_close(torch.logsumexp(log_px, 0), torch.tensor(0.0, dtype=torch.float64), rtol=0, atol=1e-12)


def test_sampling_follows_q():
    """Frequencies of z ~ q from explicit uniforms match q(z|x) (chi-square test, false-alarm rate 1e-4)."""
    from scipy import stats
    model = random_sbn(latent_sizes=(2, 2))
    x = random_binary(1, 5)
    n = 20000
    g = torch.Generator().manual_seed(3)
    xr = x.expand(n, -1)
    zs = model.sample_q(xr, model.draw_uniforms(n, g, dtype=torch.float64))
    code = (torch.cat(zs, 1) * torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=torch.float64)).sum(1).long()
    counts = torch.bincount(code, minlength=16).double()
    probs = _per_config_log_q(model, x)[0].exp().detach()
    chi2 = float(((counts - n * probs) ** 2 / (n * probs)).sum())
    assert chi2 < stats.chi2.isf(1e-4, df=15)


def test_elbo_below_log_likelihood_and_iwae_between():
    model = random_sbn()
    x = random_binary(4, 5)
    ll = exact_log_likelihood(model, x)
    assert torch.all(exact_elbo(model, x) <= ll + 1e-12)
