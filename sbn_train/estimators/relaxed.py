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

On a categorical model (K classes) both use the Gumbel-max form: K uniforms per variable (K draws of
the model's uniforms) give Gumbel noise g = -log(-log u); the discrete sample is the one-hot argmax of
log q + g (a sample of q), and the relaxed one softmax((log q + g) / lambda) (Jang et al.'s categorical VAE).
``StraightThrough`` there is straight-through Gumbel-softmax: the value is the discrete sample, the backward
pass that of the relaxed one at ``temperature`` (1 by default).

``elbo`` is always the single-sample ELBO of the discrete sample drawn from the same uniforms.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..models import SBN, Categorical, logit_of_uniform, threshold
from .base import Estimate, Estimator, elbo_of


def gumbel_noise(model: SBN, batch: int, generator, device, dtype) -> list[Tensor]:
    """Gumbel noise ``[B, H_l, K]`` per layer of a categorical model, from K draws of the model's uniforms."""
    K = model.family.classes
    draws = [model.draw_uniforms(batch, generator, device, dtype) for _ in range(K)]
    return [-torch.log(-torch.log(torch.stack([d[l] for d in draws], -1))) for l in range(model.n_layers)]


def categorical_chain(model: SBN, x: Tensor, gumbels: list[Tensor], temperature: float,
                      straight_through: bool) -> tuple[list[Tensor], list[Tensor]]:
    """(the layers the objective is evaluated on, the discrete sample) of a categorical model: layer by
    layer the relaxed softmax((log q + g) / temperature) (``straight_through``: the one-hot argmax with the
    relaxed value's gradient), each computed from the previous layer's; the discrete chain separately."""
    fam: Categorical = model.family
    chain, parent = [], x
    for l, g in enumerate(gumbels, start=1):
        scores = torch.log_softmax(fam.blocks(model.q_logits(l, parent)), -1) + g       # [B, H, K]
        soft = torch.softmax(scores / temperature, -1).flatten(-2)
        if straight_through:
            hard = fam.one_hot(scores.detach().argmax(-1), x.dtype)
            parent = hard + (soft - soft.detach())
        else:
            parent = soft
        chain.append(parent)
    with torch.no_grad():
        zs, parent = [], x
        for l, g in enumerate(gumbels, start=1):
            parent = fam.one_hot((fam.blocks(model.q_logits(l, parent)) + g).argmax(-1), x.dtype)
            zs.append(parent)
    return chain, zs


class _Relaxed(Estimator):
    """An estimator through a relaxation at a fixed, positive ``temperature`` (biased), for either family."""

    unbiased = False
    families = ("bernoulli", "categorical")

    def __init__(self, model: SBN | None = None, temperature: float = 1.0):
        super().__init__(model)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)


class Gumbel(_Relaxed):
    """Binary Concrete relaxation of every layer at a fixed ``temperature`` (biased)."""

    def __init__(self, model: SBN | None = None, temperature: float = 0.5):
        super().__init__(model, temperature)

    def forward(self, model: SBN, x: Tensor, generator: torch.Generator | None = None) -> Estimate:
        if isinstance(model.family, Categorical):
            g = gumbel_noise(model, x.shape[0], generator, x.device, x.dtype)
            relaxed, zs = categorical_chain(model, x, g, self.temperature, straight_through=False)
            return Estimate(surrogate=-model.objective(x, relaxed).mean(), elbo=elbo_of(model, x, zs))
        uniforms = model.draw_uniforms(x.shape[0], generator, x.device, x.dtype)
        relaxed, parent = [], x
        for l, u in enumerate(uniforms, start=1):
            parent = torch.sigmoid((model.q_logits(l, parent) - logit_of_uniform(u)) / self.temperature)
            relaxed.append(parent)                                       # [B, H_l] in (0, 1)
        surrogate = -model.objective(x, relaxed).mean()
        return Estimate(surrogate=surrogate, elbo=elbo_of(model, x, model.sample_q(x, uniforms)))


class StraightThrough(_Relaxed):
    """Binary sample forward, sigmoid derivative backward, through every layer (biased). On a categorical
    model: straight-through Gumbel-softmax at ``temperature`` (which a binary model does not use)."""

    def forward(self, model: SBN, x: Tensor, generator: torch.Generator | None = None) -> Estimate:
        if isinstance(model.family, Categorical):
            g = gumbel_noise(model, x.shape[0], generator, x.device, x.dtype)
            chain, zs = categorical_chain(model, x, g, self.temperature, straight_through=True)
            return Estimate(surrogate=-model.objective(x, chain).mean(), elbo=elbo_of(model, x, zs))
        uniforms = model.draw_uniforms(x.shape[0], generator, x.device, x.dtype)
        zs, parent = [], x
        for l, u in enumerate(uniforms, start=1):
            a = model.q_logits(l, parent)
            mu = torch.sigmoid(a)
            parent = threshold(logit_of_uniform(u), a.detach()) + (mu - mu.detach())   # value: the sample
            zs.append(parent)
        surrogate = -model.objective(x, zs).mean()
        return Estimate(surrogate=surrogate, elbo=elbo_of(model, x, [z.detach() for z in zs]))
