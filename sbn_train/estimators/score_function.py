"""Likelihood-ratio (score-function) estimators: LR, LR+C, LR+C+IDB (NVIL).

For layer l the learning signal holds only the terms downstream of it,

    s_l = log p(z_L) + sum_{k >= l} [ log p(z_{k-1} | z_k) - log q(z_k | z_{k-1}) ]     (``downstream_signals``),

and the inference-net gradient is sum_l (s_l - b_l) * grad log q(z_l | z_{l-1}) (Williams 1992;
upstream terms have zero covariance with the layer's score). Generative parameters get the pathwise
gradient of log p(x, z).

Baselines (Mnih & Gregor 2014, "Neural variational inference and learning in belief networks",
sec. 3.1-3.3): a per-layer moving average c_l <- c_l + rate * (mean(s_l - b_l) - c_l), and an
input-dependent baseline b_l = MLP_l(parent of layer l) trained by squared error on s_l - c_l.
Optional variance normalization divides the centred signal by max(1, running std); it rescales the
gradient, so an estimator with it is not an unbiased estimator of the ELBO gradient.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..models import SBN
from .branches import Sample, downstream_signals
from .layerwise import SignalEstimator

__all__ = ["ScoreFunction", "downstream_signals"]


class ScoreFunction(SignalEstimator):
    """LR with optional moving-average (``moving_average``) and input-dependent (``input_dependent``)
    baselines. ``reinforce`` = neither, ``reinforce_ma`` = LR+C, ``nvil`` = LR+C+IDB."""

    rao_blackwellized_by_marginal = True
    families = ("bernoulli", "categorical")

    def __init__(self, model: SBN | None = None, moving_average: bool = False, input_dependent: bool = False,
                 ma_rate: float = 0.2, baseline_hidden: int = 100, normalize_variance: bool = False):
        super().__init__(model)
        if input_dependent and model is None:
            raise ValueError("an input-dependent baseline needs the model to size its nets")
        if not 0.0 < ma_rate <= 1.0:
            raise ValueError(f"ma_rate must be in (0, 1], got {ma_rate}")
        self.moving_average = moving_average
        self.input_dependent = input_dependent
        self.ma_rate = ma_rate
        self.normalize_variance = normalize_variance
        self.unbiased = not normalize_variance
        n_layers = model.n_layers if model is not None else 0
        self.register_buffer("ma_mean", torch.zeros(max(n_layers, 1)))
        self.register_buffer("ma_var", torch.ones(max(n_layers, 1)))
        self.baselines = nn.ModuleList()
        if input_dependent:
            for l in range(n_layers):
                self.baselines.append(nn.Sequential(
                    nn.Linear(model.sizes[l], baseline_hidden), nn.Tanh(), nn.Linear(baseline_hidden, 1)))

    def centre(self, model: SBN, signals: list[Tensor], parents: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """Subtract the baselines from each layer's signal ``[B]`` (and normalize, if asked); returns the
        centred signals and the input-dependent baselines' squared-error loss. Updates the moving
        averages in train mode only."""
        out, aux = [], signals[0].new_zeros(())
        new_mean, new_var = self.ma_mean.clone(), self.ma_var.clone()
        for l, s in enumerate(signals):
            centred = s
            if self.input_dependent:
                b = self.baselines[l](model.q_input(l + 1, parents[l]).detach()).squeeze(-1)   # [B]
                target = s - self.ma_mean[l] if self.moving_average else s
                aux = aux + ((target - b) ** 2).mean()
                centred = centred - b.detach()
            if self.moving_average:
                new_mean[l] = self.ma_mean[l] + self.ma_rate * (centred.mean() - self.ma_mean[l])
                centred = centred - self.ma_mean[l]
                new_var[l] = self.ma_var[l] + self.ma_rate * (centred.var(unbiased=False) - self.ma_var[l])
            if self.normalize_variance:
                centred = centred / self.ma_var[l].sqrt().clamp(min=1.0)
            out.append(centred.detach())
        if self.training and self.moving_average:
            with torch.no_grad():
                self.ma_mean.copy_(new_mean)
                self.ma_var.copy_(new_var)
        return out, aux

    def learning_signals(self, model: SBN, x: Tensor, s: Sample) -> tuple[list[Tensor], Tensor | None]:
        centred, aux = self.centre(model, downstream_signals(s.log_p, s.log_q), s.parents)
        return centred, aux if self.input_dependent else None
