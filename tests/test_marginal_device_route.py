"""The device route of the marginal flip pass (sbn_train/estimators/marginal_device.py), forced on the CPU,
against the definition (``flip_deltas_reference``): same uniforms, float64, agreement to 1e-10, on linear,
deep, nonlinear, degenerate and large-weight models (weights far beyond the exp range of the CPU route's
tables). That it reads nothing back to the host is tests/test_host_sync.py's job."""
import pytest
import torch

import sbn_train.estimators.marginal_fast as marginal
from sbn_train.estimators.branches import flipped_log_prob
from sbn_train.estimators import build_estimator
from sbn_train.estimators.flip_common import set_route
from sbn_train.estimators.marginal import flip_deltas_reference
from sbn_train.models import Conditional, bernoulli_log_prob
from conftest import random_binary, random_sbn

# (x_dim, latent sizes, n_hidden, parameter scale)
MODELS = {
    "linear 2-layer": (10, (24, 32), 0, 0.2),
    "linear 2-layer, large weights": (10, (24, 32), 0, 3.0),
    "deep 4-layer": (10, (16, 20, 16, 20), 0, 0.2),
    "deep 4-layer, large weights": (10, (16, 20, 16, 20), 0, 3.0),
    "weights beyond float64 exp range": (10, (16, 20, 16), 0, 800.0),
    "nonlinear 2-layer": (10, (12, 16), 2, 0.2),
    "nonlinear 3-layer": (10, (12, 16, 12), 1, 0.3),
    "width 1": (7, (1,), 0, 0.5),
    "width 1, 3 layers": (7, (1, 1, 1), 0, 0.5),
    "prime widths": (7, (13, 17, 19), 0, 0.5),
}


def compare(model, x, seed, max_elements=None):
    us = model.draw_uniforms(x.shape[0], torch.Generator().manual_seed(seed), dtype=torch.float64)
    zs = model.sample_q(x, us)
    got = marginal.flip_deltas(model, x, zs, us, max_elements, marginal.Workspace(), route="device")
    ref = flip_deltas_reference(model, x, zs, us)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert a.shape == b.shape
        assert float((a - b).abs().max()) <= 1e-10 * (1 + float(b.abs().max()))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("batch", [8, 1])
def test_device_route_equals_reference(name, batch):
    x_dim, sizes, n_hidden, scale = MODELS[name]
    model = random_sbn(x_dim=x_dim, latent_sizes=sizes, n_hidden=n_hidden, seed=3, scale=scale)
    x = random_binary(batch, x_dim, seed=4)
    for max_elements in (None, 300, 1):       # the device bound, several chunks, one unit per chunk
        compare(model, x, seed=0, max_elements=max_elements)


def test_device_route_empty_batch():
    model = random_sbn(x_dim=10, latent_sizes=(24, 32), seed=0, scale=0.2)
    x = random_binary(0, 10)
    us = model.draw_uniforms(0, dtype=torch.float64)
    zs = model.sample_q(x, us)
    out = marginal.flip_deltas(model, x, zs, us, route="device")
    assert [tuple(d.shape) for d in out] == [(0, 24), (0, 32)]


def test_route_selection():
    """The device route is the default for tensors off the CPU; a route argument (an estimator's ``route``)
    forces either; a wrong name is refused."""
    cpu, meta = torch.zeros(1), torch.zeros(1, device="meta")
    assert not marginal.on_device_route(cpu) and marginal.on_device_route(meta)
    assert marginal.on_device_route(cpu, "device") and not marginal.on_device_route(meta, "cpu")
    assert not marginal._FlipTable(torch.ones(3, 2), torch.zeros(4, 2), "device").usable  # no range check read back
    est = build_estimator("leg", random_sbn())
    set_route(est, "device")
    assert est.route == "device"
    with pytest.raises(ValueError, match="route"):
        set_route(est, "gpu")
    with pytest.raises(ValueError, match="route"):
        marginal.on_device_route(cpu, "gpu")
    model = random_sbn(x_dim=10, latent_sizes=(6,), seed=0)
    us = model.draw_uniforms(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="route"):
        marginal.flip_deltas(model, random_binary(2, 10), model.sample_q(random_binary(2, 10), us), us, route="x")


@pytest.mark.parametrize("n_hidden,scale", [(0, 0.3), (0, 800.0), (2, 0.3)])
def test_flipped_log_prob_on_the_device_route(n_hidden, scale):
    """The local-expectation estimator's flip pass on the device route (no exp table) against flipping
    each input unit in turn."""
    torch.manual_seed(0)
    net = Conditional(24, 30, n_hidden).double()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, scale)
    inp, target = random_binary(8, 24, seed=1), random_binary(8, 30, seed=2)
    with torch.no_grad():
        flips = [torch.cat([inp[:, :i], 1 - inp[:, i:i + 1], inp[:, i + 1:]], 1) for i in range(24)]
        brute = torch.stack([bernoulli_log_prob(target, net(f)) for f in flips], 1)
    for max_elements in (1 << 21, 100):
        got = flipped_log_prob(net, inp, target, max_elements, route="device")
        assert float((got - brute).abs().max()) <= 1e-10 * (1 + float(brute.abs().max()))
