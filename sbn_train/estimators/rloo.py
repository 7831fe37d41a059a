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

from torch import Tensor

from ..models import SBN
from .branches import Sample, downstream_signals
from .layerwise import SignalEstimator


class RLOO(SignalEstimator):
    """Leave-one-out baseline per layer over ``n_samples`` (K >= 2) samples per example."""

    families = ("bernoulli", "categorical")

    def __init__(self, model: SBN | None = None, n_samples: int = 2):
        super().__init__(model)
        if n_samples < 2:
            raise ValueError(f"n_samples must be >= 2 for a leave-one-out baseline, got {n_samples}")
        self.n_samples = int(n_samples)
        self.q_samples = self.n_samples

    def learning_signals(self, model: SBN, x: Tensor, s: Sample) -> tuple[list[Tensor], None]:
        K = self.n_samples
        out = []
        for sig in downstream_signals(s.log_p, s.log_q):
            sig = sig.view(K, -1)                                         # [K, B]
            baseline = (sig.sum(0, keepdim=True) - sig) / (K - 1)        # mean of the other samples' signals
            out.append((sig - baseline).reshape(-1))
        return out, None
