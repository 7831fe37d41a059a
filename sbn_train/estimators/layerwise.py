"""The skeleton of the estimators that work layer by layer: sample z ~ q once (or K times per example),
give each layer l a term t_l that carries the inference-net gradient, and minimize

    surrogate = -mean over rows of ( sum_l log p(z_{l-1} | z_l) + log p(z_L) + sum_l t_l ),

so generative parameters get the pathwise gradient of log p(x, z) at the sample and inference parameters
the sum of the layers' estimates. A subclass supplies only t_l, in one of two forms:

- :class:`LogitCoefficientEstimator`: ``coefficient`` gives c_l ``[B, H_l]``, an estimate of
  d ELBO / d a_l for the layer's q logits a_l; t_l = sum_i c_{l,i} a_{l,i} with c detached (ARM, DisARM, LEG).
- :class:`SignalEstimator`: ``learning_signals`` gives a detached signal r_l ``[B]`` per layer; t_l =
  r_l log q(z_l | z_{l-1}), the likelihood-ratio form (LR, LR+C, NVIL, RLOO).

or overrides :meth:`LayerwiseEstimator.layer_terms` when t_l has another shape (the marginal estimator's
analytic entropies, MuProp's Taylor term). ``n_samples`` K > 1 repeats each example K times
(sample-major rows k*B + b); the mean over the K*B rows is the mean over the K draws of the batch mean,
and the reported ELBO is the mean over the K draws.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..models import SBN
from .base import Estimate, Estimator, elbo_of
from .branches import Sample, downstream_signals, sample_layers


class LayerwiseEstimator(Estimator):
    """Sampling, surrogate and :class:`Estimate` for estimators with one term per layer."""

    #: draws of z per example (rows per example)
    n_samples: int = 1

    def layer_terms(self, model: SBN, x: Tensor, s: Sample) -> tuple[list[Tensor], Tensor | None]:
        """(t_l for l = 1..L, each ``[R]`` with R = K*B rows and differentiable in phi; aux_loss or None)."""
        raise NotImplementedError

    def metrics(self, model: SBN, s: Sample) -> dict[str, Tensor]:
        """Detached 0-dim tensors logged as ``estimator/<key>``; no host reads."""
        return {}

    def forward(self, model: SBN, x: Tensor, generator: torch.Generator | None = None) -> Estimate:
        B, K = x.shape[0], self.n_samples
        x = x.repeat(K, 1) if K > 1 else x                                   # [K*B, D], sample-major
        s = sample_layers(model, x, generator)
        terms, aux = self.layer_terms(model, x, s)
        surrogate = -(torch.stack(s.log_p).sum(0) + sum(terms)).mean()
        elbo = elbo_of(model, x, s.zs, s.log_p, s.log_q)                     # [K*B]
        if K > 1:
            elbo = elbo.view(K, B).mean(0)
        return Estimate(surrogate=surrogate, elbo=elbo, aux_loss=aux, metrics=self.metrics(model, s))


class LogitCoefficientEstimator(LayerwiseEstimator):
    """t_l = sum_i c_{l,i} a_{l,i}: the coefficient c_l is the layer's estimate of d ELBO / d a_l."""

    def signals(self, s: Sample) -> list[Tensor]:
        """The learning signals handed to :meth:`coefficient`; each layer's downstream signal by default."""
        return downstream_signals(s.log_p, s.log_q)

    def coefficient(self, model: SBN, x: Tensor, s: Sample, l: int, signals: list[Tensor]) -> Tensor:
        """c_l ``[B, H_l]`` for layer l (1-based), computed without gradient."""
        raise NotImplementedError

    def layer_terms(self, model: SBN, x: Tensor, s: Sample) -> tuple[list[Tensor], Tensor | None]:
        signals = self.signals(s)
        terms = []
        for l, a in enumerate(s.q_logits, start=1):
            with torch.no_grad():
                c = self.coefficient(model, x, s, l, signals)               # [B, H_l]
            terms.append((c * a).sum(-1))
        return terms, None


class SignalEstimator(LayerwiseEstimator):
    """t_l = r_l log q(z_l | z_{l-1}) with a detached learning signal r_l per layer."""

    def learning_signals(self, model: SBN, x: Tensor, s: Sample) -> tuple[list[Tensor], Tensor | None]:
        """(r_l for l = 1..L, each ``[R]`` and detached; aux_loss or None)."""
        raise NotImplementedError

    def layer_terms(self, model: SBN, x: Tensor, s: Sample) -> tuple[list[Tensor], Tensor | None]:
        signals, aux = self.learning_signals(model, x, s)
        return [r * lq for r, lq in zip(signals, s.log_q)], aux
