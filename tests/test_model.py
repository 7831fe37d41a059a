import itertools

import pytest
import torch
from scipy import stats

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
    """ELBO <= E[IWAE_K] <= log p(x), with E[IWAE_1] = ELBO and E[IWAE_K] rising with K: the model's
    importance-weighted bound estimated over 4,000 draws per K, each comparison a one-sided z-test at
    false-alarm rate 1e-3 (Bonferroni over all of them), so a bound off by more than its noise fails."""
    model = random_sbn()
    x = random_binary(4, 5)
    ll = exact_log_likelihood(model, x)
    elbo = exact_elbo(model, x)
    assert torch.all(elbo <= ll + 1e-12)
    g = torch.Generator().manual_seed(8)
    n, ks = 4000, (1, 5, 50)
    draws = {k: torch.stack([model.iwae_bound(x, k, g) for _ in range(n)]) for k in ks}   # [n, 4]
    z = float(stats.norm.isf(1e-3 / (4 * (2 * len(ks) + 1))))
    for k, d in draws.items():
        mean, se = d.mean(0), d.std(0) / n ** 0.5
        assert torch.all(mean >= elbo - z * se), k                  # above the ELBO ...
        assert torch.all(mean <= ll + z * se), k                    # ... below log p(x)
    assert torch.all((draws[1].mean(0) - elbo).abs() <= z * draws[1].std(0) / n ** 0.5)   # K = 1 is the ELBO
    diff = draws[50] - draws[5]                                      # independent draws: a two-sample test
    se = (draws[50].var(0) / n + draws[5].var(0) / n).sqrt()
    assert torch.all(diff.mean(0) >= -z * se)
    assert torch.all(draws[50].mean(0) > elbo + z * draws[50].std(0) / n ** 0.5)     # and it sees the gap
