"""Measurements of a model during and after training: bounds on a data split, the final test of the best
model, and the three views of the gradient-variance probe.

Every function draws its randomness from a generator it seeds itself, so the training stream (batches
and estimator noise) is the same whether or not a measurement runs.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from .config import VARIANCE_VIEWS, VarianceConfig
from .data import binarize, eval_batches
from .diagnostics import exact_gradient_by_parameter, gradient_moments
from .metrics import log10_tag
from .estimators import Estimator
from .models import SBN
from .progress import SILENT, Progress

#: added to an evaluation seed for the latent-sampling stream, so it differs from the binarization stream
SAMPLING_OFFSET = 0x9E3779B9


@torch.no_grad()
def elbo_average(model: SBN, x: Tensor, samples: int, generator: torch.Generator | None = None,
                 max_rows: int = 65536) -> Tensor:
    """ELBO(x) estimated by the mean of ``samples`` single-sample estimates per row, ``[B]``.

    The samples are drawn in chunks of at most ``max_rows`` rows (data x samples) so memory stays bounded.
    """
    B = x.shape[0]
    per_chunk = max(1, max_rows // max(B, 1))
    total = torch.zeros(B, device=x.device, dtype=torch.float64)
    done = 0
    while done < samples:
        c = min(per_chunk, samples - done)
        total += model.log_weights(x, c, generator).double().sum(0)   # [c, B] -> [B]
        done += c
    return total / samples


@torch.no_grad()
def split_bounds(model: SBN, data: Tensor, batch_size: int, limit: int | None, seed: int, elbo_samples: int,
                 iwae_k: int, max_rows: int, progress: Progress | None = None) -> tuple[Tensor, Tensor | None]:
    """Per-example ELBO (averaged over ``elbo_samples``) and K-sample bound (None if ``iwae_k`` is 0) over the
    first ``limit`` rows of ``data``, binarized with ``seed`` and sampled with a stream derived from it.
    ``progress`` (e.g. ``Progress("evaluating valid", enabled=True)``) reports the rows as they are done."""
    # not ``seed`` itself: the latent uniforms would repeat the binarization uniforms
    gen = torch.Generator(device=data.device).manual_seed(seed + SAMPLING_OFFSET)
    rows = data.shape[0] if limit is None else min(limit, data.shape[0])
    elbos, iwaes = [], []
    with (progress or SILENT).track(rows) as done:
        for x in eval_batches(data, batch_size, seed, limit):
            x = x.to(model.prior_logits.dtype)
            elbos.append(elbo_average(model, x, elbo_samples, gen, max_rows))
            if iwae_k:
                iwaes.append(model.iwae_bound(x, iwae_k, gen, max_rows=max_rows).double())
            done(x.shape[0])
    return torch.cat(elbos), (torch.cat(iwaes) if iwae_k else None)


def summarize(prefix: str, elbo: Tensor, iwae: Tensor | None, k: int, with_se: bool = False) -> dict[str, float]:
    """Means over examples, named by TensorBoard tag; ``with_se`` adds their standard errors over examples."""
    out = {f"{prefix}/elbo": float(elbo.mean())}
    if iwae is not None:
        out[f"{prefix}/iwae{k}"] = float(iwae.mean())
    if with_se:
        n = elbo.numel()
        out[f"{prefix}/elbo_se"] = float(elbo.std() / math.sqrt(n)) if n > 1 else float("nan")
        if iwae is not None:
            out[f"{prefix}/iwae{k}_se"] = float(iwae.std() / math.sqrt(n)) if n > 1 else float("nan")
    return out


# ----- the gradient-variance probe ---------------------------------------------------------------
def parameter_groups(model: SBN, prefix: str) -> dict[str, list[nn.Parameter]]:
    """``{prefix}/inference``, ``{prefix}/layer{l}`` (inference layer l) and ``{prefix}/generative``."""
    groups = {f"{prefix}/inference": model.inference_parameters()}
    for l, net in enumerate(model.q_nets, start=1):
        groups[f"{prefix}/layer{l}"] = list(net.parameters())
    groups[f"{prefix}/generative"] = model.generative_parameters()
    return groups


def fresh_minibatches(data: Tensor, batch_size: int, count: int, gen: torch.Generator) -> Iterator[Tensor]:
    """``count`` minibatches drawn with replacement of rows and freshly binarized."""
    for _ in range(count):
        idx = torch.randint(data.shape[0], (batch_size,), generator=gen, device=gen.device)
        yield binarize(data[idx.to(data.device)], gen)


def fixed_minibatch(data: Tensor, batch_size: int, seed: int) -> Tensor:
    """The same binarized minibatch for every call with the same arguments."""
    gen = torch.Generator(device=data.device).manual_seed(seed)
    return next(fresh_minibatches(data, batch_size, 1, gen))


def logged_views(model: SBN, cfg: VarianceConfig, max_steps: int | None = None) -> list[str]:
    """The variance views a run of ``model`` logs: none without the probe (or when it first comes after
    ``max_steps``), no ``exact`` for a model with more than ``cfg.exact_max_latents`` latent units (the
    argument ``views`` of the custom-scalars layout)."""
    if not cfg.every or (max_steps is not None and cfg.every > max_steps):
        return []
    return [v for v in cfg.views if v != "exact" or model.n_configurations <= 2 ** cfg.exact_max_latents]


def with_log10(values: dict[str, float]) -> dict[str, float]:
    """``values`` and the log10 of each positive finite one (``grad_var/inference`` -> ``grad_var_log10/...``);
    a zero variance (a deterministic estimator) has no log10 and gets none."""
    logs = {log10_tag(k): math.log10(v) for k, v in values.items() if math.isfinite(v) and v > 0}
    return {**values, **logs}


def measure_variance(model: SBN, estimator: Estimator, data: Tensor, batch_size: int, samples: int, seed: int,
                     views: Sequence[str] = VARIANCE_VIEWS, exact_max_latents: int = 12,
                     fixed_seed: int = 0) -> dict[str, float]:
    """Gradient-variance probe, each view from ``samples`` estimates (means over parameter elements):

    - ``minibatch`` (the paper's protocol): one estimate on each of ``samples`` fresh training minibatches;
      ``grad_var/{inference,layer{l},generative}``: data and latent noise together.
    - ``latent``: ``samples`` independent draws of the estimator's noise on one fixed minibatch (drawn with
      ``fixed_seed``, the same at every probe); ``grad_var_latent/...``: the latent noise alone.
    - ``exact``: on that minibatch and those draws, against the exact gradient by enumeration (only for models
      with at most ``exact_max_latents`` latent units); ``grad_bias/...`` (squared bias) and ``grad_mse/...``.

    Each positive value also comes as its log10 (``grad_var_log10/...``, ``grad_bias_log10/...``): TensorBoard
    gets the log10 values only, ``results.json`` both (:mod:`sbn_train.metrics`).

    The estimator runs in eval mode (its state and parameters are frozen) with generators seeded from ``seed``.
    """
    dtype = model.prior_logits.dtype
    out: dict[str, float] = {}
    if "minibatch" in views:
        gen = torch.Generator(device=data.device).manual_seed(seed)
        batches = (x.to(dtype) for x in fresh_minibatches(data, batch_size, samples, gen))
        m = gradient_moments(model, estimator, batches, gen, parameter_groups(model, "grad_var"))
        out.update({k: v["var"] for k, v in m.items()})
    exact = "exact" in views and model.n_configurations <= 2 ** exact_max_latents
    if "latent" in views or exact:
        x = fixed_minibatch(data, batch_size, fixed_seed).to(dtype)
        reference = exact_gradient_by_parameter(model, x) if exact else None
        gen = torch.Generator(device=data.device).manual_seed(seed + 1)
        m = gradient_moments(model, estimator, (x for _ in range(samples)), gen, parameter_groups(model, "view"),
                             reference)
        for name, v in m.items():
            group = name.split("/", 1)[1]
            if "latent" in views:
                out[f"grad_var_latent/{group}"] = v["var"]
            if exact:
                out[f"grad_bias/{group}"] = v["bias"]
                out[f"grad_mse/{group}"] = v["mse"]
    return with_log10(out)
