"""Antithetic estimators: ARM (Yin & Zhou 2019) and DisARM (Dong, Mnih & Tucker 2020).

One uniform u per unit gives an antithetic pair of samples of the same Bernoulli(sigmoid(a)):

    b = 1[u < sigmoid(a)],    b~ = 1[1 - u < sigmoid(a)].

ARM ("ARM: Augment-REINFORCE-merge gradient for stochastic binary networks", ICLR 2019; its estimator
written with the pair above) estimates d E[f(b)] / d a_i by

    (f(b) - f(b~)) (1/2 - u_i).

DisARM ("DisARM: an antithetic gradient estimator for binary latent variables", NeurIPS 2020, its
multivariate estimator) integrates u out given the pair, which can only lower the variance (it is
E[ARM | b, b~]):

    1/2 (f(b) - f(b~)) (b_i - b~_i) sigmoid(|a_i|).

Both estimators are stated for one layer of binary units; here they are applied layer by layer, each
layer with its own local learning signal. For layer l the layers below are the sample, the pair is
(z_l, z~_l) from u_l, f is the layer's downstream learning signal s_l (see ``score_function``; upstream
terms cancel in the difference), and on each branch the layers above are re-drawn from the SAME uniforms
u_{l+1..L} (common random numbers), so f(b) is the sampled configuration itself and every layer costs one
extra pass over the layers above it. Each branch's upper layers have the right conditional distribution given its z_l, so the
estimator stays unbiased. Generative parameters get the pathwise gradient of log p(x, z) at the sample.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..models import SBN, threshold
from .branches import Sample, layer_signal, resimulate
from .layerwise import LogitCoefficientEstimator


class ARM(LogitCoefficientEstimator):
    """ARM applied per stochastic layer with shared upper-layer noise on both branches (two evaluations)."""

    q_samples = 2

    def pair_coefficient(self, diff: Tensor, u: Tensor, logits: Tensor, z: Tensor, z_anti: Tensor) -> Tensor:
        """d(estimate)/d a, ``[B, H]``, from diff = f(b) - f(b~) ``[B]``."""
        return diff[:, None] * (0.5 - u)

    def coefficient(self, model: SBN, x: Tensor, s: Sample, l: int, signals: list[Tensor]) -> Tensor:
        a, z, u = s.q_logits[l - 1], s.zs[l - 1], s.uniforms[l - 1]
        z_anti = threshold(-s.lus[l - 1], a)                  # 1[1 - u < sigmoid(a)]: logit(1 - u) = -logit(u)
        branch = resimulate(model, s.zs, s.lus, l, z_anti)
        diff = signals[l - 1] - layer_signal(model, x, branch, l)                # [B]
        return self.pair_coefficient(diff, u, a, z, z_anti)                      # [B, H_l]


class DisARM(ARM):
    """DisARM: ARM with u integrated out given the antithetic pair; per coordinate Var(DisARM) <= Var(ARM)."""

    def pair_coefficient(self, diff: Tensor, u: Tensor, logits: Tensor, z: Tensor, z_anti: Tensor) -> Tensor:
        return 0.5 * diff[:, None] * (z - z_anti) * torch.sigmoid(logits.abs())
