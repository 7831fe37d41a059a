"""The fast marginal path (``flip_deltas``) against its definition (``flip_deltas_reference``), on models large
enough that every branch of the fast path is taken: sparse and dense re-simulated changes, exp-space and
direct softplus sums, grouped and single logs. Same uniforms, float64, agreement to 1e-10."""
import pytest
import torch

import sbn_train.estimators.flip_common as flip_common
import sbn_train.estimators.marginal_fast as marginal
from sbn_train.estimators.marginal import flip_deltas_reference
from conftest import random_binary, random_sbn

# (x_dim, latent sizes, n_hidden, parameter scale): small weights re-simulate few units (sparse changes),
# large ones many (dense changes, no exp space)
MODELS = [
    (10, (24, 32), 0, 0.2),
    (10, (16, 20, 16, 20), 0, 0.2),
    (10, (12, 16), 2, 0.2),
    (10, (12, 16, 12), 1, 0.3),
    (10, (24, 32), 0, 3.0),
    (10, (16, 20, 16, 20), 0, 3.0),
]


def compare(model, x, seed, max_elements=1 << 21):
    us = model.draw_uniforms(x.shape[0], torch.Generator().manual_seed(seed), dtype=torch.float64)
    zs = model.sample_q(x, us)
    fast = marginal.flip_deltas(model, x, zs, us, max_elements=max_elements, workspace=marginal.Workspace())
    ref = flip_deltas_reference(model, x, zs, us)
    for a, b in zip(fast, ref):
        assert a.shape == b.shape
        assert float((a - b).abs().max()) <= 1e-10 * (1 + float(b.abs().max()))


@pytest.fixture
def paths(monkeypatch):
    """Records which branch each decision of the fast path took."""
    seen = set()
    first, dense, ok = marginal._first_resimulated, marginal._Changes.from_dense.__func__, marginal._exp_space_ok

    def first_(*a, **k):
        out = first(*a, **k)
        seen.add("first-resimulated sparse" if out is not None else "first-resimulated dense")
        return out

    def dense_(cls, *a, **k):
        out = dense(cls, *a, **k)
        seen.add("changes sparse" if out.idx is not None else "changes dense")
        return out

    def ok_(*a, **k):
        out = ok(*a, **k)
        seen.add("exp space" if out else "direct softplus")
        return out

    monkeypatch.setattr(marginal, "_first_resimulated", first_)
    monkeypatch.setattr(marginal._Changes, "from_dense", classmethod(dense_))
    monkeypatch.setattr(marginal, "_exp_space_ok", ok_)
    return seen


@pytest.mark.parametrize("max_elements", [1 << 21, 300])
def test_fast_equals_reference_on_every_path(paths, max_elements):
    for i, (x_dim, sizes, n_hidden, scale) in enumerate(MODELS):
        model = random_sbn(x_dim=x_dim, latent_sizes=sizes, n_hidden=n_hidden, seed=i, scale=scale)
        x = random_binary(8, x_dim, seed=i)
        for seed in range(3):
            compare(model, x, seed, max_elements)
    assert paths >= {"first-resimulated sparse", "first-resimulated dense", "changes sparse", "changes dense",
                     "exp space"}


@pytest.mark.parametrize("log_range", [1e-3, 0.5, 3.0])
def test_fast_equals_reference_with_narrow_exp_range(monkeypatch, paths, log_range):
    """A narrow representable range forces the direct softplus sums and small (down to single) log groups."""
    monkeypatch.setattr(flip_common, "_LOG_RANGE", {torch.float64: log_range})
    for i, (x_dim, sizes, n_hidden, scale) in enumerate(MODELS):
        model = random_sbn(x_dim=x_dim, latent_sizes=sizes, n_hidden=n_hidden, seed=i, scale=scale)
        compare(model, random_binary(8, x_dim, seed=i), seed=0)
    assert "direct softplus" in paths


def test_sum_log_groups_respect_the_range():
    """Grouped products never overflow: factors at the bound's edge, every group size the rule allows."""
    for dtype, limit in ((torch.float32, 80.0), (torch.float64, 700.0)):
        for bound in (0.05, 0.7, 5.0, 60.0):
            t = torch.full((3, 784), float(torch.tensor(bound).exp()), dtype=dtype)
            group = marginal._uniform_group(784, bound, dtype)
            assert group == 1 or group * bound <= limit
            got = marginal._sum_log(t.clone(), group)
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, torch.full((3,), 784 * bound, dtype=dtype), rtol=1e-5, atol=0)
            got = marginal._sum_log(t.reciprocal(), group)
            torch.testing.assert_close(got, torch.full((3,), -784 * bound, dtype=dtype), rtol=1e-5, atol=0)


@pytest.mark.parametrize("route,x_dim,scale", [("cpu", 64, 0.3), ("cpu", 784, 2.0), ("device", 64, 0.3),
                                               ("device", 784, 2.0), ("device", 64, 100.0)])
def test_float32_flip_pass_is_no_less_accurate_than_the_definition(route, x_dim, scale):
    """In float32 each route's deltas are at least as close to the float64 values as the reference
    implementation's own float32 deltas (both take differences directly instead of subtracting large sums).
    With large weights the CPU route's grouped products must shrink their groups to stay finite."""
    model64 = random_sbn(x_dim=x_dim, latent_sizes=(32, 32), seed=5, scale=scale)
    x64 = random_binary(16, x_dim, seed=5)
    us64 = model64.draw_uniforms(16, torch.Generator().manual_seed(0), dtype=torch.float64)
    zs64 = model64.sample_q(x64, us64)
    exact = flip_deltas_reference(model64, x64, zs64, us64)
    model32 = model64.float()
    x32, us32 = x64.float(), [u.float() for u in us64]
    zs32 = model32.sample_q(x32, us32)
    assert all(torch.equal(a.double(), b) for a, b in zip(zs32, zs64))   # same sample in both precisions
    fast = marginal.flip_deltas(model32, x32, zs32, us32, workspace=marginal.Workspace(), route=route)
    ref = flip_deltas_reference(model32, x32, zs32, us32)
    # 99th percentiles: a re-simulated unit within rounding of its threshold may be decided differently by
    # the two float32 computations (either one), which moves a single delta by O(1) (see marginal_fast)
    err_fast = torch.cat([(a.double() - e).abs().flatten() for a, e in zip(fast, exact)]).quantile(0.99)
    err_ref = torch.cat([(a.double() - e).abs().flatten() for a, e in zip(ref, exact)]).quantile(0.99)
    assert err_fast <= err_ref


@pytest.mark.parametrize("n_hidden,scale", [(0, 0.3), (0, 3.0), (0, 800.0), (2, 0.3)])
def test_flipped_log_prob_equals_flipping_each_input(n_hidden, scale):
    """The local-expectation estimator's flip pass (exp tables for linear nets, rank-1 pre-activations
    for nonlinear nets and for weights beyond exp range) against log-probabilities computed with each
    input unit flipped in turn; a non-binary input is refused."""
    from sbn_train.estimators.branches import flipped_log_prob
    from sbn_train.models import Conditional, bernoulli_log_prob
    torch.manual_seed(0)
    net = Conditional(24, 30, n_hidden).double()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, scale)
    inp, target = random_binary(8, 24, seed=1), random_binary(8, 30, seed=2)
    with torch.no_grad():
        brute = torch.stack([bernoulli_log_prob(target, net(torch.cat([inp[:, :i], 1 - inp[:, i:i + 1], inp[:, i + 1:]], 1)))
                             for i in range(24)], 1)
    for max_elements in (1 << 21, 100):
        got = flipped_log_prob(net, inp, target, max_elements)
        assert float((got - brute).abs().max()) <= 1e-10 * (1 + float(brute.abs().max()))
    with pytest.raises(ValueError, match="binary"):
        flipped_log_prob(net, inp - 0.3, target)


@pytest.mark.parametrize("batch,sizes,n_hidden", [(1, (1,), 0), (1, (1, 1, 1), 0), (3, (13, 17, 19), 0),
                                                   (3, (13, 17, 19), 1)])
def test_fast_equals_reference_on_degenerate_shapes(batch, sizes, n_hidden):
    """Batch 1, width-1 layers, prime widths (no log groups), one unit per chunk."""
    model = random_sbn(x_dim=7, latent_sizes=sizes, n_hidden=n_hidden, seed=2, scale=0.5)
    for max_elements in (1, 1 << 21):
        compare(model, random_binary(batch, 7, seed=3), seed=0, max_elements=max_elements)


def test_empty_batch():
    model = random_sbn(x_dim=10, latent_sizes=(24, 32), seed=0, scale=0.2)
    x = random_binary(0, 10)
    us = model.draw_uniforms(0, dtype=torch.float64)
    zs = model.sample_q(x, us)
    assert [tuple(d.shape) for d in marginal.flip_deltas(model, x, zs, us)] == [(0, 24), (0, 32)]


def test_dense_route_everywhere_equals_reference(monkeypatch):
    """The CPU route with every change set dense (no sparse first re-simulation)."""
    monkeypatch.setattr(marginal, "_first_resimulated", lambda *a, **k: None)
    monkeypatch.setattr(marginal._Changes, "from_dense", classmethod(lambda cls, dz, scratch: cls(dz=dz)))
    for i, (x_dim, sizes, n_hidden, scale) in enumerate(MODELS):
        model = random_sbn(x_dim=x_dim, latent_sizes=sizes, n_hidden=n_hidden, seed=i, scale=scale)
        compare(model, random_binary(8, x_dim, seed=i), seed=1)
