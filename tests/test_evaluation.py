"""Bounds and the gradient-variance probe against exact answers.

Every statistical threshold is a normal quantile for a stated false-alarm rate (Bonferroni-corrected over
the assertions of the test); seeds are fixed, so each test is deterministic.
"""
import math

import pytest
import torch

from sbn_train.config import EvalConfig, OptimConfig, TestConfig, TrainConfig, VarianceConfig
from sbn_train.data import load_dataset
from sbn_train.diagnostics import exact_elbo, exact_log_likelihood
from sbn_train.estimators import build_estimator
from sbn_train.estimators.base import Estimate, Estimator
from sbn_train.evaluation import elbo_average, measure_variance
from sbn_train.models import SBN
from sbn_train.train import CHECKPOINT, RunSettings, run

from conftest import random_binary, random_sbn
from stats import bonferroni_z

ALPHA = 1e-3      # false-alarm rate of each test as a whole


def iwae_replicates(model, x, k, n, seed, max_rows=65536):
    """``[n, B]``: n independent K-sample bounds of every row of ``x``."""
    g = torch.Generator().manual_seed(seed)
    return model.iwae_bound(x.repeat(n, 1), k, g, max_rows=max_rows).view(n, x.shape[0])


def mean_and_se(values):
    """Mean over rows of the per-row mean of ``[n, B]`` replicates, and its standard error."""
    n, b = values.shape
    return float(values.mean()), float(values.var(0).sum().sqrt() / n ** 0.5 / b)


def test_iwae_bound_between_elbo_and_log_likelihood_and_increasing_in_k():
    model, x = random_sbn(seed=3), random_binary(4, 5, seed=4)
    elbo = float(exact_elbo(model, x).detach().mean())
    log_px = float(exact_log_likelihood(model, x).mean())
    ks = [1, 2, 5, 20, 100]
    est = {k: mean_and_se(iwae_replicates(model, x, k, 400, seed=10 + k)) for k in ks}
    big_k = 5000
    # max_rows=8192 with 80 rows: the 5,000 samples of each row are drawn in 50 chunks
    est[big_k] = mean_and_se(iwae_replicates(model, x, big_k, 20, seed=99, max_rows=8192))
    n_checks = 1 + 2 * len(est) + (len(ks) - 1) + 2   # the assertions below
    z = bonferroni_z(ALPHA, n_checks)
    assert log_px - elbo > 0.05, "the test model must have a real gap between ELBO and log p(x)"

    m1, se1 = est[1]
    assert abs(m1 - elbo) < z * se1, (m1, elbo, se1)                  # K = 1 is the ELBO
    for k, (m, se) in est.items():
        assert m - elbo > -z * se, (k, m, elbo, se)                   # never below the ELBO
        assert m - log_px < z * se, (k, m, log_px, se)                # never above log p(x)
    for a, b in zip(ks, ks[1:]):                                      # non-decreasing in K
        (ma, sa), (mb, sb) = est[a], est[b]
        assert mb - ma > -z * math.hypot(sa, sb), (a, b, ma, mb)
    (m_lo, s_lo), (m_hi, s_hi) = est[1], est[100]
    assert m_hi - m_lo > z * math.hypot(s_lo, s_hi), (m_lo, m_hi)     # and it does increase
    # large K: log p(x) within the standard error, once the bound's O(1/K) bias is added back: by the delta
    # method E[iwae_K] ~ log p(x) - Var(w / p(x)) / (2K), and Var(w / p(x)) ~ 100 Var(iwae_100). The
    # correction is required to be small (below one standard error) so that this first-order form holds.
    m, se = est[big_k]
    bias = 100 * float(iwae_replicates(model, x, 100, 400, seed=7).var(0).mean()) / (2 * big_k)
    assert bias < se, (bias, se)
    assert abs(m + bias - log_px) < z * se, (m, bias, log_px, se)


def test_elbo_average_matches_exact_elbo():
    model, x = random_sbn(seed=5), random_binary(4, 5, seed=6)
    g = torch.Generator().manual_seed(0)
    reps = 40
    # max_rows=512 with 160 rows: the 300 samples are drawn in 100 chunks of 3
    values = elbo_average(model, x.repeat(reps, 1), 300, g, max_rows=512).view(reps, 4)   # [reps, B]
    m, se = mean_and_se(values)
    exact = float(exact_elbo(model, x).detach().mean())
    assert abs(m - exact) < bonferroni_z(ALPHA, 1) * se, (m, exact, se)


# ----- the gradient-variance probe -----------------------------------------------------------------
class ShiftedExact(Estimator):
    """Exact gradient + ``shift`` + ``noise`` * N(0, 1), independently for every parameter element:
    squared bias ``shift^2``, variance ``noise^2`` and MSE ``shift^2 + noise^2``, known in advance."""

    def __init__(self, shift: float, noise: float):
        super().__init__()
        self.shift, self.noise = shift, noise

    def forward(self, model, x, generator=None):
        extra = sum(((self.shift + self.noise * torch.randn(p.shape, generator=generator, dtype=p.dtype)) * p).sum()
                    for p in model.parameters())
        return Estimate(surrogate=-exact_elbo(model, x).mean() + extra, elbo=exact_elbo(model, x).detach())


def probe(model, estimator, samples, views=("latent", "exact")):
    data = random_binary(50, model.x_dim, seed=7)
    return measure_variance(model, estimator, data, batch_size=8, samples=samples, seed=1, views=views,
                            exact_max_latents=12)


def test_probe_deterministic_estimator():
    model = random_sbn(seed=2)
    out = probe(model, ShiftedExact(shift=0.3, noise=0.0), samples=3)
    groups = ["inference", "layer1", "layer2", "generative"]
    for g in groups:
        assert out[f"grad_var_latent/{g}"] == pytest.approx(0.0, abs=1e-20)
        assert out[f"grad_bias/{g}"] == pytest.approx(0.09, rel=1e-9)
        assert out[f"grad_mse/{g}"] == pytest.approx(0.09, rel=1e-9)
    # the exact gradient has no latent noise, but it does change from one minibatch to the next
    exact = probe(model, build_estimator("exact", model), samples=3, views=("minibatch", "latent", "exact"))
    for g in groups:
        assert exact[f"grad_bias/{g}"] == pytest.approx(0.0, abs=1e-20)
        assert exact[f"grad_mse/{g}"] == pytest.approx(0.0, abs=1e-20)
        assert exact[f"grad_var_latent/{g}"] == pytest.approx(0.0, abs=1e-20)
        assert exact[f"grad_var/{g}"] > 1e-6


def test_probe_recovers_known_bias_and_variance():
    model = random_sbn(seed=2)
    c, s, m = 0.2, 0.5, 40
    out = probe(model, ShiftedExact(shift=c, noise=s), samples=m)
    # per element, with mean-bar ~ N(c, s^2/M) independent of the sample variance ~ s^2 chi2_{M-1}/(M-1):
    var_of = {
        "grad_var_latent": (s ** 2, 2 * s ** 4 / (m - 1)),
        "grad_bias": (c ** 2, 4 * c ** 2 * s ** 2 / m + 2 * s ** 4 / m ** 2 + 2 * s ** 4 / ((m - 1) * m ** 2)),
        "grad_mse": (c ** 2 + s ** 2, 4 * c ** 2 * s ** 2 / m + 2 * s ** 4 / m ** 2 + 2 * s ** 4 * (m - 1) / m ** 2),
    }
    sizes = {"inference": sum(p.numel() for p in model.inference_parameters()),
             "layer1": sum(p.numel() for p in model.q_nets[0].parameters()),
             "layer2": sum(p.numel() for p in model.q_nets[1].parameters()),
             "generative": sum(p.numel() for p in model.generative_parameters())}
    z = bonferroni_z(ALPHA, len(var_of) * len(sizes))
    for prefix, (expected, per_element_var) in var_of.items():
        for group, n in sizes.items():
            got = out[f"{prefix}/{group}"]
            assert abs(got - expected) < z * math.sqrt(per_element_var / n), (prefix, group, got, expected)


def test_probe_skips_exact_for_large_models():
    model = random_sbn(latent_sizes=(7, 7), seed=1)
    out = probe(model, build_estimator("reinforce", model), samples=3)
    assert "grad_var_latent/inference" in out and not any(k.startswith("grad_bias") for k in out)


# ----- measuring does not disturb training -----------------------------------------------------------
def train_small(tmp_path, name, estimator_name, var_every):
    torch.manual_seed(0)
    splits = load_dataset("synthetic", "", x_dim=16, latent_sizes=[3, 3], n_train=200, n_valid=50, n_test=50)
    model = SBN(16, [3, 3], x_mean=splits.train.mean(0))
    estimator = build_estimator(estimator_name, model)
    out = tmp_path / name
    settings = RunSettings(train=TrainConfig(batch_size=10, max_steps=30, eval_every=10, log_every=5, progress=False),
                           optim=OptimConfig(lr=3e-3), eval=EvalConfig(batch_size=50, iwae_k=5, images=0),
                           variance=VarianceConfig(every=var_every, samples=4),
                           test=TestConfig(elbo_samples=5, iwae_k=20), seed=3)
    result = run(model, estimator, splits, settings, out)
    return result, torch.load(out / CHECKPOINT, weights_only=True)


@pytest.mark.parametrize("estimator_name", ["nvil", "marginal"])
def test_variance_probe_does_not_disturb_training(tmp_path, estimator_name):
    measured, a = train_small(tmp_path, "measured", estimator_name, var_every=5)
    plain, b = train_small(tmp_path, "plain", estimator_name, var_every=0)
    assert "grad_bias/inference" in measured.metrics and "grad_var/inference" not in plain.metrics
    assert torch.equal(a["generator"], b["generator"])            # the training RNG stream
    for key in ("model", "estimator"):                            # parameters and state (moving averages)
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert a["sampler"]["pos"] == b["sampler"]["pos"] and torch.equal(a["sampler"]["perm"], b["sampler"]["perm"])
    same = [k for k in plain.metrics if not k.startswith(("grad_", "perf/"))]
    assert {k: measured.metrics[k] for k in same} == {k: plain.metrics[k] for k in same}
