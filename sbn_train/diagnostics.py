"""Ground truth and measurements: exact enumeration for tiny models, gradient-variance probes."""
from __future__ import annotations

import itertools
from typing import Iterable

import torch
from torch import Tensor

from .models import SBN

#: largest number of latent units for which exact enumeration (2^N configurations) is allowed
MAX_EXACT_LATENTS = 20


class TooLargeForExact(ValueError):
    pass


def exact_size_error(latent_sizes: list[int], family: str = "bernoulli", classes: int = 2,
                     limit: int = MAX_EXACT_LATENTS) -> str | None:
    """Why a model of this shape is too large to enumerate (more than 2^``limit`` joint configurations),
    or None."""
    n, K = sum(latent_sizes), (classes if family == "categorical" else 2)
    if K ** n <= 2 ** limit:
        return None
    if family != "categorical":
        return (f"exact enumeration needs 2^{n} latent configurations; it is limited to models with at most "
                f"{limit} latent units (this model has latent_sizes={list(latent_sizes)}). "
                f"Use a smaller model, e.g. model.latent_sizes=[3,3].")
    return (f"exact enumeration needs {K}^{n} latent configurations, more than its limit of 2^{limit} "
            f"(this model has model.latent_sizes={list(latent_sizes)} with model.classes={K}). "
            f"Use a smaller model, e.g. model.latent_sizes=[2,2] model.classes=3.")


def check_exact_size(model: SBN, limit: int = MAX_EXACT_LATENTS) -> int:
    """The number of joint latent configurations, or :class:`TooLargeForExact` above 2^``limit``."""
    error = exact_size_error(model.latent_sizes, model.family.name, model.family.classes, limit)
    if error:
        raise TooLargeForExact(error)
    return model.n_configurations


def all_configurations(sizes: list[int], device=None, dtype=torch.float32, family=None) -> list[Tensor]:
    """Every joint configuration of the latent layers, a list of ``[C, width_l]`` tensors: 0/1 bits
    (C = 2^N), or one-hot blocks for a categorical ``family`` (C = K^N)."""
    if family is None or family.name == "bernoulli":
        n = sum(sizes)
        bits = torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)), device=device, dtype=dtype)  # [2^N, N]
        return list(bits.view(-1, n).split(sizes, dim=1))
    joint = family.configurations(sum(sizes), device, dtype)                    # [K^N, N*K]
    return list(joint.split([family.width(h) for h in sizes], dim=1))


def _per_config(model: SBN, x: Tensor, max_rows: int) -> Iterable[tuple[Tensor, Tensor]]:
    """Yield (log p(x, z) ``[B, C]``, log q(z | x) ``[B, C]``) over chunks of configurations."""
    check_exact_size(model)
    configs = all_configurations(model.latent_sizes, x.device, x.dtype, model.family)
    total, B = configs[0].shape[0], x.shape[0]
    per = max(1, max_rows // max(1, B))
    for s in range(0, total, per):
        zc = [z[s:s + per] for z in configs]
        C = zc[0].shape[0]
        xr = x[:, None, :].expand(B, C, x.shape[1]).reshape(B * C, -1)
        zr = [z[None].expand(B, C, z.shape[1]).reshape(B * C, -1) for z in zc]
        yield model.log_joint(xr, zr).view(B, C), model.log_q(xr, zr).view(B, C)


def exact_elbo(model: SBN, x: Tensor, max_rows: int = 1 << 18) -> Tensor:
    """sum_z q(z|x) [log p(x,z) - log q(z|x)], ``[B]``, differentiable in every model parameter."""
    out = x.new_zeros(x.shape[0])
    for lp, lq in _per_config(model, x, max_rows):
        out = out + (lq.exp() * (lp - lq)).sum(1)
    return out


@torch.no_grad()
def exact_log_likelihood(model: SBN, x: Tensor, max_rows: int = 1 << 18) -> Tensor:
    """log p(x) = logsumexp_z log p(x, z), ``[B]``."""
    parts = [torch.logsumexp(lp, 1) for lp, _ in _per_config(model, x, max_rows)]
    return torch.logsumexp(torch.stack(parts), 0)


def exact_gradient(model: SBN, x: Tensor) -> list[Tensor]:
    """Gradient of the batch-mean NEGATIVE ELBO w.r.t. ``model.parameters()``, by enumeration."""
    params = [p for p in model.parameters()]
    return list(torch.autograd.grad(-exact_elbo(model, x).mean(), params))


class Welford:
    """Running per-element mean and unbiased variance of a stream of flat vectors."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, v: Tensor) -> None:
        v = v.detach().double()
        self.n += 1
        if self.mean is None:
            self.mean, self.m2 = v.clone(), torch.zeros_like(v)
            return
        delta = v - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (v - self.mean)

    def variance(self) -> Tensor:
        if self.n < 2:
            raise ValueError("need at least two samples for a variance")
        return self.m2 / (self.n - 1)


def gradient_moments(model: SBN, estimator, batches: Iterable[Tensor], generator: torch.Generator,
                     params: dict[str, list[torch.nn.Parameter]],
                     reference: dict[torch.nn.Parameter, Tensor] | None = None) -> dict[str, dict[str, float]]:
    """Per group of parameters, the mean over its elements of the gradient's unbiased variance, and, when
    ``reference`` (the exact gradient of each parameter) is given, its squared bias and mean squared error.

    With M estimates g_1..g_M of an element whose exact value is g*, mean g-bar and unbiased variance s^2:
        var  = s^2
        mse  = (1/M) sum_m (g_m - g*)^2 = (g-bar - g*)^2 + (M-1)/M s^2      (unbiased for the MSE)
        bias = (g-bar - g*)^2 - s^2 / M = mse - s^2                         (unbiased for the squared bias;
               it can come out slightly negative by chance, and is zero in expectation for an unbiased estimator)
    each averaged over the group's elements. One estimate per element of ``batches``; the estimator is put in
    eval mode (no state updates) and restored; model and estimator ``.grad`` fields are not touched.
    """
    names = list(params)
    flat = [p for name in names for p in params[name]]
    stats = {name: Welford() for name in names}
    was_training = estimator.training
    estimator.eval()
    try:
        for x in batches:
            est = estimator(model, x, generator)
            grads = torch.autograd.grad(est.surrogate, flat, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, flat)]
            i = 0
            for name in names:
                k = len(params[name])
                stats[name].add(torch.cat([g.reshape(-1) for g in grads[i:i + k]]))
                i += k
    finally:
        estimator.train(was_training)
    out: dict[str, dict[str, float]] = {}
    for name, s in stats.items():
        var = s.variance()
        out[name] = {"var": float(var.mean())}
        if reference is not None:
            ref = torch.cat([reference[p].detach().reshape(-1).double() for p in params[name]])
            mse = (s.mean - ref) ** 2 + s.m2 / s.n
            out[name]["mse"] = float(mse.mean())
            out[name]["bias"] = float((mse - var).mean())
    return out


def exact_gradient_by_parameter(model: SBN, x: Tensor) -> dict[torch.nn.Parameter, Tensor]:
    """:func:`exact_gradient` keyed by parameter."""
    return dict(zip(model.parameters(), exact_gradient(model, x)))
