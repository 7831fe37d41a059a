"""BIASED estimators that backpropagate through a continuous stand-in for the binary sample.

Both differentiate the ELBO in its analytic-entropy form, F(z) = log p(x, z) + sum_l H(q(. | z_{l-1}))
(:meth:`SBN.objective`), evaluated on a differentiable version of z; neither gradient has the ELBO gradient
as its mean (``unbiased = False``; the test suite asserts that both fail the unbiasedness test).

- ``Gumbel``: the binary Concrete / Gumbel-softmax relaxation (Maddison, Mnih & Teh, "The Concrete
  distribution", ICLR 2017, the binary Concrete; Jang, Gu & Poole, "Categorical reparameterization with
  Gumbel-softmax", ICLR 2017): every layer is replaced by sigma((a_l - logit(u_l)) / lambda) and
  the next layer's logits are computed from that relaxed value. F is evaluated on the relaxed chain, so
  the generative gradient is biased too.
- ``StraightThrough``: the sample is the binary z, but the backward pass treats d z / d a as
  d sigmoid(a) / d a (Bengio, Leonard & Courville, "Estimating or propagating gradients through
  stochastic neurons for conditional computation", 2013: the straight-through estimator, sigmoid
  variant). Values equal the sample; generative gradients are the pathwise ones (unbiased), the
  inference gradients are biased.

``elbo`` is always the single-sample ELBO of the binary sample drawn from the same uniforms.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..models import SBN, logit_of_uniform, threshold
from .base import Estimate, Estimator, elbo_of


class Gumbel(Estimator):
    """Binary Concrete relaxation of every layer at a fixed ``temperature`` (biased)."""

    unbiased = False

    def __init__(self, model: SBN | None = None, temperature: float = 0.5):
        super().__init__(model)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, model: SBN, x: Tensor, generator: torch.Generator | None = None) -> Estimate:
        uniforms = model.draw_uniforms(x.shape[0], generator, x.device, x.dtype)
        relaxed, parent = [], x
        for l, u in enumerate(uniforms, start=1):
            parent = torch.sigmoid((model.q_logits(l, parent) - logit_of_uniform(u)) / self.temperature)
            relaxed.append(parent)                                       # [B, H_l] in (0, 1)
        surrogate = -model.objective(x, relaxed).mean()
        return Estimate(surrogate=surrogate, elbo=elbo_of(model, x, model.sample_q(x, uniforms)))


class StraightThrough(Estimator):
    """Binary sample forward, sigmoid derivative backward, through every layer (biased)."""

    unbiased = False

    def forward(self, model: SBN, x: Tensor, generator: torch.Generator | None = None) -> Estimate:
        uniforms = model.draw_uniforms(x.shape[0], generator, x.device, x.dtype)
        zs, parent = [], x
        for l, u in enumerate(uniforms, start=1):
            a = model.q_logits(l, parent)
            mu = torch.sigmoid(a)
            parent = threshold(logit_of_uniform(u), a.detach()) + (mu - mu.detach())   # value: the sample
            zs.append(parent)
        surrogate = -model.objective(x, zs).mean()
        return Estimate(surrogate=surrogate, elbo=elbo_of(model, x, [z.detach() for z in zs]))
