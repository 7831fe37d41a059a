import pytest
import torch

from sbn_train.models import SBN

# The tests use tiny models: one thread avoids OpenMP spin-waits that, on a busy 2-core machine,
# make a small matrix product 50x slower with two threads than with one.
torch.set_num_threads(1)


def random_sbn(x_dim=5, latent_sizes=(3, 3), n_hidden=0, seed=0, scale=1.0, **family) -> SBN:
    """A float64 SBN with random (not initial) parameters, so no symmetry hides a bug. ``family``: the
    model's other keywords (``family="categorical", classes=3``, ``hidden``, ...)."""
    torch.manual_seed(seed)
    model = SBN(x_dim=x_dim, latent_sizes=list(latent_sizes), n_hidden=n_hidden, **family).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, scale)
        model.x_mean.uniform_(0.2, 0.8)
    return model


def random_binary(n, d, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, d, generator=g, dtype=torch.float64) < 0.5).double()


@pytest.fixture
def tiny():
    return random_sbn(), random_binary(4, 5)
