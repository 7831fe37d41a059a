"""Nothing in an estimator's step reads a tensor value back to the host (a stall, and no CUDA-graph capture,
on a GPU): the guard (sbn_train/sync_guard.py) itself, then every estimator's forward and backward under it,
with the marginal flip pass on the route a GPU takes (forced on the CPU)."""
import pytest
import torch

import sbn_train.estimators.marginal_fast as marginal_fast
from sbn_train.estimators.flip_common import set_route
from sbn_train.estimators import available_estimators, build_estimator
from sbn_train.estimators.branches import flipped_log_prob
from sbn_train.models import SBN, Conditional
from sbn_train.sync_guard import HostSyncError, no_host_sync

X = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]])

READS = {
    "item": lambda x: x.sum().item(),
    "float": lambda x: float(x.max()),
    "int": lambda x: int(x.argmax()),
    "bool in an if": lambda x: 1 if bool((x > 0).all()) else 0,
    "tensor as a condition": lambda x: 1 if (x > 0).any() else 0,
    "format": lambda x: f"{x.sum():.3f}",
    "tolist": lambda x: x.tolist(),
    "numpy": lambda x: x.numpy(),
    "cpu": lambda x: x.cpu(),
    "torch.tensor of tensors": lambda x: torch.tensor([x[0, 0], x[1, 1]]),
    "boolean mask": lambda x: x[x > 0],
    "boolean mask assignment": lambda x: x.clone().__setitem__(x > 0, 0.0),
    "nonzero": lambda x: torch.nonzero(x),
    "where with one argument": lambda x: torch.where(x > 0),
    "masked_select": lambda x: torch.masked_select(x, x > 0),
    "unique": lambda x: torch.unique(x),
    "equal": lambda x: torch.equal(x, x),
    "allclose": lambda x: torch.allclose(x, x),
    "repeat_interleave with tensor repeats": lambda x: torch.repeat_interleave(x[0], torch.tensor([1, 2, 3])),
}

PURE = {
    "matmul": lambda x: x @ x.T,
    "where": lambda x: torch.where(x > 0, x, -x),
    "integer-tensor index": lambda x: x[torch.tensor([1, 0])],
    "gather, topk, sort": lambda x: (x.gather(1, x.argsort(1)), torch.topk(x, 2), torch.sort(x)),
    "reductions kept as tensors": lambda x: (x.max(), (x > 0).all(), x.sum(0)),
    "torch.tensor of numbers": lambda x: torch.tensor([1.0, 2.0]) + x[0, :2],
    "backward": lambda x: (x.clone().requires_grad_() * 2).sum().backward(),
}


@pytest.mark.parametrize("name", READS)
def test_guard_raises_on_host_reads(name):
    with pytest.raises(HostSyncError, match=r"test_host_sync\.py:\d+"):     # the caller outside torch
        with no_host_sync():
            READS[name](X)


@pytest.mark.parametrize("name", PURE)
def test_guard_passes_pure_tensor_code(name):
    with no_host_sync():
        PURE[name](X)


def test_guard_restores_what_it_patched():
    with pytest.raises(HostSyncError):
        with no_host_sync():
            X.tolist()
    assert X.tolist()[0][1] == -2.0 and X.sum().item() == -3.0 and torch.tensor([X[0, 0]]).item() == 1.0


def small_sbn() -> tuple[SBN, torch.Tensor]:
    torch.manual_seed(0)
    model = SBN(20, [8, 8], x_mean=torch.full((20,), 0.4))
    x = (torch.rand(16, 20, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    return model, x


def estimator_step(name: str, route: str = "device") -> None:
    """Forward and backward of one estimator (and of its own loss) on a float32 SBN, under the guard; the
    flip passes take ``route`` (the device route is what a GPU runs)."""
    model, x = small_sbn()
    est = build_estimator(name, model)
    set_route(est, route)
    generator = torch.Generator().manual_seed(2)
    with no_host_sync():
        out = est(model, x, generator)
        out.surrogate.backward()
        if out.aux_loss is not None:
            out.aux_loss.backward()
    assert all(p.grad is not None for p in model.inference_parameters())


# every estimator configuration; test_every_estimator_is_checked keeps the list complete
SYNC_FREE = ["arm", "disarm", "exact", "gumbel", "leg", "leg_paper_code", "marginal", "marginal_paper_code",
             "muprop", "nvil", "rebar", "reinforce", "reinforce_ma", "relax", "rloo", "straight_through", "vimco"]


def test_every_estimator_is_checked():
    assert sorted(SYNC_FREE) == available_estimators()


@pytest.mark.parametrize("name", SYNC_FREE)
def test_estimator_step_reads_nothing_back(name):
    estimator_step(name)


@pytest.mark.parametrize("name", SYNC_FREE)
def test_two_training_steps_read_nothing_back(name):
    """What a CUDA graph captures: the loop's own step (minibatch from the training split, estimator,
    backward, both optimizers, running ELBO), twice (the optimizers' state is created on the first)."""
    from sbn_train.config import OptimConfig
    from sbn_train.state import TrainState
    from sbn_train.train import TrainStep
    model, _ = small_sbn()
    data = torch.rand(64, 20, generator=torch.Generator().manual_seed(4))
    est = build_estimator(name, model)
    set_route(est, "device")
    state = TrainState.create(model, est, data, 16, OptimConfig(), seed=5)
    step = TrainStep(state)
    assert getattr(est, "capturable", True), f"{name} declares itself not capturable but reads nothing back"
    with no_host_sync():
        step()
        step()
    assert state.elbo_n == 2 and all(torch.is_tensor(v) for v in step.last_metrics.values())


@pytest.mark.parametrize("name", ["marginal", "leg"])
def test_cpu_route_reads_back_and_the_guard_sees_it(name):
    """The CPU route decides from the data (range checks, the binary-input check): the guard must see that."""
    with pytest.raises(HostSyncError, match=r"(marginal_fast|branches)\.py:\d+"):
        estimator_step(name, route="cpu")


def test_device_route_flip_passes_read_nothing_back():
    """The flip passes themselves, float32, with weights beyond the exp range of the CPU route's tables."""
    model, x = small_sbn()
    with torch.no_grad():
        model.p_nets[0].first.weight.mul_(1e3)
    net = Conditional(8, 20)
    us = model.draw_uniforms(16, torch.Generator().manual_seed(3))
    zs = model.sample_q(x, us)
    with no_host_sync():
        deltas = marginal_fast.flip_deltas(model, x, zs, us, route="device")
        flipped = flipped_log_prob(net, zs[0], x, route="device")
    assert all(torch.isfinite(d).all() for d in deltas) and torch.isfinite(flipped).all()
