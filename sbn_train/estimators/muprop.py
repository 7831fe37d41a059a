"""MuProp (Gu, Levine, Sutskever & Mnih, "MuProp: unbiased backpropagation for stochastic neural
networks", ICLR 2016), with the moving-average and input-dependent baselines of NVIL on top (the
configuration Tokui & Sato call MuProp+C+IDB).

A deterministic mean-field pass of q gives the expansion point m_1 = sigmoid(f_1(x)),
m_l = sigmoid(f_l(m_{l-1})). For layer l the control variate is the first-order Taylor expansion of the
layer's learning signal in z_l around m_l,

    h_l(z_l) = s_l(m) + g_l . (z_l - m_l),      g_l = d s_l(m) / d m_l (through the mean-field layers above),

and the inference gradient is

    sum_l (s_l - h_l(z_l) - c_l - b_l(z_{l-1})) d log q(z_l | z_{l-1}) + g_l . d mu_l(z_{l-1}),

where mu_l(z_{l-1}) = E[z_l | z_{l-1}] is taken at the SAMPLED parent: h_l is linear in z_l with
coefficients that do not depend on the sample, so E[h_l d log q] = g_l . d mu_l exactly and the
estimator is unbiased for any expansion point. The multi-layer form (one mean-field pass from x, each
layer's own signal and Taylor term) is the one of Tokui & Sato's MuProp implementation. c_l and b_l are
NVIL's baselines (see ``score_function``) fitted to the residual s_l - h_l. One sample of z plus one
mean-field forward and backward pass.
Generative parameters get the pathwise gradient of log p(x, z) at the sample.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..models import SBN, bernoulli_log_prob
from .branches import Sample, downstream_signals
from .score_function import ScoreFunction


def mean_field_expansion(model: SBN, x: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """(m_l, s_l(m), d s_l(m) / d m_l) for l = 1..L, each detached; ``[B, H_l]``, ``[B]``, ``[B, H_l]``."""
    with torch.enable_grad():
        ms, parent = [], x
        for l in range(1, model.n_layers + 1):
            parent = torch.sigmoid(model.q_logits(l, parent))       # [B, H_l]
            ms.append(parent)
        log_p = model.log_p_layers(x, ms)
        log_q = [bernoulli_log_prob(m, model.q_logits(l, p)) for l, (m, p) in enumerate(zip(ms, [x] + ms[:-1]), 1)]
        total = torch.stack(log_p).sum(0) - torch.stack(log_q).sum(0)          # [B]
        # upstream terms of the total do not depend on m_l, so d total / d m_l = d s_l / d m_l
        grads = torch.autograd.grad(total.sum(), ms)
    return [m.detach() for m in ms], downstream_signals(log_p, log_q), [g.detach() for g in grads]


class MuProp(ScoreFunction):
    """MuProp with optional NVIL baselines on its residual (``muprop`` = MuProp+C+IDB)."""

    families = ("bernoulli",)      # its mean-field expansion is written for bits

    # the baseline f(mu) + f'(mu)(z - mu) depends on the unit itself: outside the marginal estimator's theorem
    rao_blackwellized_by_marginal = False

    def __init__(self, model: SBN | None = None, moving_average: bool = True, input_dependent: bool = True,
                 ma_rate: float = 0.2, baseline_hidden: int = 100):
        super().__init__(model, moving_average=moving_average, input_dependent=input_dependent,
                         ma_rate=ma_rate, baseline_hidden=baseline_hidden, normalize_variance=False)

    def layer_terms(self, model: SBN, x: Tensor, s: Sample) -> tuple[list[Tensor], Tensor | None]:
        """t_l = (centred residual) log q(z_l | z_{l-1}) + g_l . mu_l (the Taylor term's mean)."""
        signals = downstream_signals(s.log_p, s.log_q)
        ms, s_mf, gs = mean_field_expansion(model, x)
        residuals = [sig - sm - (g * (z - m)).sum(-1) for sig, sm, g, z, m in zip(signals, s_mf, gs, s.zs, ms)]
        centred, aux = self.centre(model, residuals, s.parents)
        terms = [c.detach() * lq + (g * torch.sigmoid(a)).sum(-1)
                 for c, lq, g, a in zip(centred, s.log_q, gs, s.q_logits)]
        return terms, aux if self.input_dependent else None
