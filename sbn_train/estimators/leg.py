"""Local expectation gradients (Titsias & Lazaro-Gredilla, "Local expectation gradients for black box
variational inference", NIPS 2015), extended to deep SBNs.

For the unit j = (l, i), the score-function term E_q[s_l(z) d log q(z_j | z_{l-1})] is a conditional
expectation over z_j given every other latent variable, whose conditional under q is its Markov
blanket in q (the paper's factorized q has no children, so there it is q(z_j | x)):

    q(z_j = v | z_-j)  ∝  q(z_j = v | z_{l-1}) q(z_{l+1} | z_l with z_j = v)          (no second factor for l = L)

    estimate_j = sum_{v in {0, 1}} q(z_j = v | z_-j) s_l(z_-j, z_j = v) (v - mu_j) d a_j,

with every other variable kept at its sampled value (no re-simulation, unlike the marginal estimator).
s_l is the layer's downstream learning signal (``score_function``); the terms upstream of layer l are
non-descendants of z_j in q, so dropping them leaves the expectation unchanged. Since z_-j is drawn
from its marginal under q, the estimator is unbiased. Only the terms that touch z_j change between the
two values: log p(z_{l-1} | z_l), unit i of log q(z_l | z_{l-1}), log q(z_{l+1} | z_l), and unit i of
log p(z_l | z_{l+1}) (of the prior when l = L). Uses one sample of z and 2 evaluations per unit of these
local terms. Generative parameters get the pathwise gradient of log p(x, z) at the sample.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..models import SBN
from .base import Estimate, Estimator, elbo_of
from .branches import Sample, flipped_log_prob, sample_layers
from .score_function import downstream_signals


class LEG(Estimator):
    """Local expectation gradients for every unit of every layer.

    Args:
        max_elements: bound on the temporaries of the flipped-unit passes (entries per chunk).
    """

    def __init__(self, model: SBN | None = None, max_elements: int = 1 << 21):
        super().__init__(model)
        if max_elements <= 0:
            raise ValueError(f"max_elements must be positive, got {max_elements}")
        self.max_elements = int(max_elements)

    @torch.no_grad()
    def flip_terms(self, model: SBN, s: Sample, l: int) -> tuple[Tensor, Tensor]:
        """(change of s_l, change of log q(z_l, z_{l+1} | z_{l-1})) when unit i of layer l flips, each ``[B, H_l]``."""
        z, a = s.zs[l - 1], s.q_logits[l - 1]
        d = 1 - 2 * z                                                   # [B, H]: v_flipped - v_sampled
        below = s.parents[l - 1]
        d_p = flipped_log_prob(model.p_nets[l - 1], z, below, self.max_elements) - s.log_p[l - 1][:, None]
        d_q = d * a                                                     # unit i of log q(z_l | z_{l-1})
        if l < model.n_layers:
            d_p = d_p + d * model.p_nets[l](s.zs[l])                    # unit i of log p(z_l | z_{l+1})
            d_q = d_q + flipped_log_prob(model.q_nets[l], z, s.zs[l], self.max_elements) - s.log_q[l][:, None]
        else:
            d_p = d_p + d * model.prior_logits
        return d_p - d_q, d_q

    def forward(self, model: SBN, x: Tensor, generator: torch.Generator | None = None) -> Estimate:
        s = sample_layers(model, x, generator)
        signals = downstream_signals(s.log_p, s.log_q)
        score = x.new_zeros(x.shape[0])
        for l, (a, z, sig) in enumerate(zip(s.q_logits, s.zs, signals), start=1):
            with torch.no_grad():
                d_signal, d_logq = self.flip_terms(model, s, l)         # [B, H]
                w_keep = torch.sigmoid(-d_logq)                          # q(z_j = sampled | Markov blanket)
                mu = torch.sigmoid(a)
                kept = w_keep * sig[:, None] * (z - mu)
                flipped = (1 - w_keep) * (sig[:, None] + d_signal) * (1 - z - mu)
                coef = kept + flipped                                    # d(estimate)/d a, [B, H]
            score = score + (coef * a).sum(-1)
        surrogate = -(torch.stack(s.log_p).sum(0) + score).mean()
        return Estimate(surrogate=surrogate, elbo=elbo_of(model, x, s.zs, s.log_p, s.log_q))
