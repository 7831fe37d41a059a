"""The estimator contract.

An estimator is an ``nn.Module`` called as ``est(model, x, generator=None)``. It returns an
:class:`Estimate` whose ``surrogate`` is a scalar: ``surrogate.backward()`` leaves in every model
parameter's ``.grad`` an estimate of the gradient of the batch-mean NEGATIVE ELBO (generative and
inference parameters alike). Parameters the estimator owns (baseline nets, control variates) get
their gradient from ``aux_loss`` only; the training loop steps them with an optimizer of their own.

State that adapts during training (moving averages) is updated only in ``train()`` mode, so a
measurement in ``eval()`` mode leaves the estimator exactly as it found it.

``forward`` reads nothing back to the host: ``metrics`` are detached 0-dim tensors on the model's
device, converted to floats by whoever logs them (a host read is a synchronization point on a GPU).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..models import SBN

#: default bound on the entries of per-chunk temporaries of the flipped-unit passes (8 MB in float32)
DEFAULT_MAX_ELEMENTS = 1 << 21


@dataclass
class Estimate:
    surrogate: Tensor                 # scalar; its gradient estimates d(-mean ELBO)/d(model params)
    elbo: Tensor                      # [B], detached single-sample ELBO log p(x,z) - log q(z|x)
    aux_loss: Tensor | None = None    # scalar loss for the estimator's own parameters, or None
    metrics: dict[str, Tensor] = field(default_factory=dict)   # detached 0-dim tensors, logged as estimator/<key>


class Estimator(nn.Module):
    """Base class; subclasses implement ``forward(model, x, generator=None) -> Estimate``.

    The class attributes below describe the estimator to the test suite, which derives its lists from them:
    every file of ``configs/estimator/`` is checked against the exact gradient of its ``objective``
    (unbiased ones must pass, biased ones must fail the same test).
    """

    #: True when E[gradient of surrogate] equals the exact gradient of ``objective`` for every parameter value
    unbiased: bool = True
    #: the bound whose gradient the surrogate estimates: "elbo", or "iwae" (the K-sample bound, e.g. VIMCO)
    objective: str = "elbo"
    #: False for an estimator without noise (the exact gradient by enumeration)
    monte_carlo: bool = True
    #: samples z ~ q(. | x) per example at which the learning signal is evaluated (an antithetic pair counts
    #: two, K-sample estimators K); the variance comparisons put estimators with equal counts side by side
    q_samples: int = 1
    #: True for the likelihood-ratio estimator with a baseline that does not depend on the unit it multiplies
    #: (LR, LR+C, NVIL's input-dependent baselines): the marginal estimator is its conditional expectation
    #: given the other noise (Tokui & Sato), so its variance is no smaller than the marginal estimator's. Other
    #: control variates (MuProp's, REBAR/RELAX's, the antithetic pairs) are outside that theorem.
    rao_blackwellized_by_marginal: bool = False
    #: False where a replica group on a CPU is faster taking turns replica by replica than under vmap (measured
    #: with ``scripts/bench_step.py --replicas 1,4``; on a GPU groups are always vectorized)
    vmap_on_cpu: bool = True
    #: the latent families (``sbn_train.models.FAMILIES``) the estimator is defined for
    families: tuple[str, ...] = ("bernoulli",)

    @classmethod
    def supported_families(cls, options: Mapping[str, Any]) -> tuple[str, ...]:
        """The families an instance built with the config ``options`` (constructor keywords) works on."""
        return cls.families

    def __init__(self, model: SBN | None = None):
        super().__init__()
        if model is not None:
            name = model.family.name
            supported = self.supported_families(getattr(self, "_options", {}))
            if name not in supported:
                words = {"bernoulli": "binary", "categorical": "categorical"}
                raise ValueError(f"{type(self).__name__} is defined for {' and '.join(words[f] for f in supported)} "
                                 f"latents only, and this model's are {words.get(name, name)}")

    def forward(self, model: SBN, x: Tensor, generator: torch.Generator | None = None) -> Estimate:  # noqa: D401
        raise NotImplementedError


def check_max_elements(max_elements: int) -> int:
    if max_elements <= 0:
        raise ValueError(f"max_elements must be positive, got {max_elements}")
    return int(max_elements)


def elbo_of(model: SBN, x: Tensor, zs: list[Tensor], log_p: list[Tensor] | None = None,
            log_q: list[Tensor] | None = None) -> Tensor:
    """Detached single-sample ELBO ``[B]`` from precomputed per-layer terms when given."""
    with torch.no_grad():
        lp = torch.stack(log_p).sum(0) if log_p is not None else model.log_joint(x, zs)
        lq = torch.stack(log_q).sum(0) if log_q is not None else model.log_q(x, zs)
        return (lp - lq).detach()
