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

``upstream_terms=True`` computes what the authors' published code (github beam2d/sbn, Chainer) computes:
there every layer's signal is the whole integrand log p(x, z) - log q(z | x) at the sample and at each
flipped configuration. The upstream terms do not contain z_j, so the flip differences are the same and
each estimate gains U_l sum_v q(z_j = v | z_-j) (v - mu_j) with U_l the terms below layer l; its mean
given z_{<l} is U_l (E[z_j | z_{l-1}] - mu_j) = 0, so it stays unbiased, with more variance. In the top
layer q(z_j = v | z_-j) = q(z_j = v | z_{L-1}), so the added term vanishes for every z; a two-layer model has no
other layer with upstream terms, so there both forms agree up to rounding.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..models import SBN
from .base import DEFAULT_MAX_ELEMENTS, check_max_elements
from .branches import Sample, downstream_signals, flipped_log_prob
from .layerwise import LogitCoefficientEstimator


class LEG(LogitCoefficientEstimator):
    """Local expectation gradients for every unit of every layer.

    Args:
        max_elements: bound on the temporaries of the flipped-unit passes (entries per chunk).
        upstream_terms: every layer's learning signal is the whole integrand log p(x, z) - log q(z | x)
            instead of its downstream part (as the authors' published code computes it; see the module
            docstring). Unbiased either way; more variance below the top layer on models deeper than two.
    """

    def __init__(self, model: SBN | None = None, max_elements: int = DEFAULT_MAX_ELEMENTS,
                 upstream_terms: bool = False):
        super().__init__(model)
        self.max_elements = check_max_elements(max_elements)
        self.upstream_terms = bool(upstream_terms)
        self.route = "auto"                 # the flip passes' route: "auto", "cpu" or "device"

    def signals(self, s: Sample) -> list[Tensor]:
        signals = downstream_signals(s.log_p, s.log_q)
        return [signals[0]] * len(signals) if self.upstream_terms else signals     # s_1: the whole integrand

    @torch.no_grad()
    def flip_terms(self, model: SBN, s: Sample, l: int) -> tuple[Tensor, Tensor]:
        """(change of s_l, change of log q(z_l, z_{l+1} | z_{l-1})) when unit i of layer l flips, each ``[B, H_l]``."""
        z, a = s.zs[l - 1], s.q_logits[l - 1]
        d = 1 - 2 * z                                                   # [B, H]: v_flipped - v_sampled
        below = s.parents[l - 1]
        d_p = flipped_log_prob(model.p_nets[l - 1], z, below, self.max_elements, self.route) - s.log_p[l - 1][:, None]
        d_q = d * a                                                     # unit i of log q(z_l | z_{l-1})
        if l < model.n_layers:
            d_p = d_p + d * model.p_nets[l](s.zs[l])                    # unit i of log p(z_l | z_{l+1})
            d_q = d_q + flipped_log_prob(model.q_nets[l], z, s.zs[l], self.max_elements, self.route) - s.log_q[l][:, None]
        else:
            d_p = d_p + d * model.prior_logits
        return d_p - d_q, d_q

    def coefficient(self, model: SBN, x: Tensor, s: Sample, l: int, signals: list[Tensor]) -> Tensor:
        a, z, sig = s.q_logits[l - 1], s.zs[l - 1], signals[l - 1]
        d_signal, d_logq = self.flip_terms(model, s, l)                 # [B, H]
        w_keep = torch.sigmoid(-d_logq)                                  # q(z_j = sampled | Markov blanket)
        mu = torch.sigmoid(a)
        kept = w_keep * sig[:, None] * (z - mu)
        flipped = (1 - w_keep) * (sig[:, None] + d_signal) * (1 - z - mu)
        return kept + flipped                                            # d(estimate)/d a, [B, H]
