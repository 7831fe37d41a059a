"""REINFORCE with the leave-one-out baseline over K samples (Kool, van Hoof & Welling, "Buy 4 REINFORCE
samples, get a baseline for free!", ICLR 2019 workshop; also Salimans & Knowles 2014).

K independent samples z^1..z^K per example; for sample k and layer l the baseline is the mean of the
other samples' downstream learning signals (``score_function``),

    sum_l (s_l^k - 1/(K-1) sum_{j != k} s_l^j) d log q(z_l^k | z_{l-1}^k),

averaged over k. The baseline of sample k depends only on the other, independent samples, so each
term is unbiased. The paper states it with the whole-sample signal; here it is applied layer by layer
with each layer's downstream signal. Generative parameters get the average over k of the pathwise
gradient of log p(x, z^k). Uses K samples; the reported ELBO is the mean over the K samples.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..models import SBN
from .base import Estimate, Estimator, elbo_of
from .branches import sample_layers
from .score_function import downstream_signals


class RLOO(Estimator):
    """Leave-one-out baseline per layer over ``n_samples`` (K >= 2) samples per example."""

    def __init__(self, model: SBN | None = None, n_samples: int = 2):
        super().__init__(model)
        if n_samples < 2:
            raise ValueError(f"n_samples must be >= 2 for a leave-one-out baseline, got {n_samples}")
        self.n_samples = int(n_samples)

    def forward(self, model: SBN, x: Tensor, generator: torch.Generator | None = None) -> Estimate:
        K, B = self.n_samples, x.shape[0]
        xr = x.repeat(K, 1)                                              # [K*B, D], sample-major
        s = sample_layers(model, xr, generator)
        score = xr.new_zeros(K * B)
        for sig, lq in zip(downstream_signals(s.log_p, s.log_q), s.log_q):
            sig = sig.view(K, B)
            baseline = (sig.sum(0, keepdim=True) - sig) / (K - 1)       # [K, B]
            score = score + (sig - baseline).reshape(-1) * lq
        surrogate = -(torch.stack(s.log_p).sum(0) + score).mean()        # mean over K*B = mean over k of batch means
        elbo = elbo_of(model, xr, s.zs, s.log_p, s.log_q).view(K, B).mean(0)
        return Estimate(surrogate=surrogate, elbo=elbo)
