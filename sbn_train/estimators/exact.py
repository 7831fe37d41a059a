"""The exact gradient, by enumerating every latent configuration (models with at most 20 latent units).

Not a Monte Carlo estimator: the ground truth for tests and diagnostics.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..diagnostics import check_exact_size, exact_elbo
from ..models import SBN
from .base import Estimate, Estimator


class Exact(Estimator):
    monte_carlo = False
    q_samples = 0
    #: enumerates every latent configuration: the command line checks the model's size when composing
    enumerates = True
    families = ("bernoulli", "categorical")

    def __init__(self, model: SBN | None = None, max_rows: int = 1 << 18):
        super().__init__(model)
        if model is not None:
            check_exact_size(model)
        self.max_rows = int(max_rows)

    def forward(self, model: SBN, x: Tensor, generator: torch.Generator | None = None) -> Estimate:
        elbo = exact_elbo(model, x, self.max_rows)
        return Estimate(surrogate=-elbo.mean(), elbo=elbo.detach())
