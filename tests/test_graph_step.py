"""The CUDA-graph step's pieces that do not need a GPU, and the graph itself where one is present."""
import pytest
import torch

from sbn_train.data import TrainSampler
from sbn_train.graph import _DeviceBatches, graph_unsupported_reason
from sbn_train.config import OptimConfig
from sbn_train.estimators import build_estimator
from sbn_train.models import SBN
from sbn_train.state import TrainState


def test_device_batches_follow_the_eager_sampler_exactly():
    """The graph reads minibatches through static buffers (permutation, position); run eagerly on the CPU
    they must give the eager sampler's batches and leave the generator in the same state, over epochs."""
    data = torch.rand(10, 6)
    eager = TrainSampler(data, 3, torch.Generator().manual_seed(5))
    graphed = TrainSampler(data, 3, torch.Generator().manual_seed(5))
    first = graphed.next()                        # a warm-up step of the eager kind, then the device path
    assert torch.equal(first, eager.next())
    batches = _DeviceBatches(graphed)
    for _ in range(12):                           # 4 epochs of 3 batches (one row left over each epoch)
        batches.before_step()
        got = batches.batch()
        batches.after_step()
        assert torch.equal(got, eager.next())
        assert torch.equal(graphed.generator.get_state(), eager.generator.get_state())
        assert graphed.pos == eager.pos and torch.equal(graphed.perm, eager.perm)
    # the checkpointed sampler state continues the eager way
    resumed = TrainSampler(data, 3, torch.Generator().manual_seed(0))
    resumed.load_state_dict(graphed.state_dict())
    resumed.generator.set_state(graphed.generator.get_state())
    assert torch.equal(resumed.next(), eager.next())


def test_graph_is_refused_off_cuda_with_a_reason():
    model = SBN(6, [3, 3])
    state = TrainState.create(model, build_estimator("nvil", model), torch.rand(20, 6), 4, OptimConfig(), 0)
    assert "not a CUDA device" in graph_unsupported_reason(state)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run by scripts/gpu_check.sh)")


@cuda
@pytest.mark.parametrize("name", ["reinforce", "nvil", "marginal"])
def test_graph_run_equals_eager_run(tmp_path, name):
    """The same run with and without the graph: identical parameters, generator and metrics."""
    from sbn_train.config import EvalConfig, TestConfig, TrainConfig, VarianceConfig
    from sbn_train.data import load_dataset
    from sbn_train.train import RunSettings, run

    out = {}
    for graph in (False, True):
        torch.manual_seed(0)
        splits = load_dataset("synthetic", "", x_dim=16, latent_sizes=[4, 4], n_train=200, n_valid=50, n_test=50)
        dev = torch.device("cuda")
        splits.train, splits.valid, splits.test = splits.train.to(dev), splits.valid.to(dev), splits.test.to(dev)
        model = SBN(16, [4, 4], x_mean=splits.train.mean(0)).to(dev)
        est = build_estimator(name, model).to(dev)
        settings = RunSettings(train=TrainConfig(batch_size=10, max_steps=60, eval_every=25, log_every=7,
                                                 progress=False, cuda_graph=graph),
                               eval=EvalConfig(batch_size=50, iwae_k=5, images=0),
                               variance=VarianceConfig(every=0), test=TestConfig(elbo_samples=5, iwae_k=20), seed=3)
        res = run(model, est, splits, settings, tmp_path / f"g{graph}")
        out[graph] = (res.metrics, torch.load(tmp_path / f"g{graph}" / "checkpoint.pt", weights_only=True))
    (m0, c0), (m1, c1) = out[False], out[True]
    assert {k: v for k, v in m0.items() if not k.startswith("perf/")} == \
        {k: v for k, v in m1.items() if not k.startswith("perf/")}
    assert torch.equal(c0["generator"], c1["generator"])
    for k in c0["model"]:
        assert torch.equal(c0["model"][k], c1["model"][k]), k
