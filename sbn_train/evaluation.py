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
from .diagnostics import Welford, exact_gradient_by_parameter, gradient_moments
from .metrics import log10_tag
from .estimators import Estimator
from .models import EVAL_BLOCK_ROWS, SBN, UniformTape
from .progress import SILENT, Progress

#: added to an evaluation seed for the latent-sampling stream, so it differs from the binarization stream
SAMPLING_OFFSET = 0x9E3779B9

#: rows (data x samples x replicas) of one vmapped evaluation call of a replica group on a CPU
REPLICA_BLOCK_ROWS = EVAL_BLOCK_ROWS


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


# ----- the same bounds for R models at once (a replica group) -------------------------------------
class _Call(nn.Module):
    """A model as the one submodule ``model``, calling the method it is given: ``functional_call`` swaps in
    one replica's tensors and calls the model's own public methods (``log_weights``)."""

    def __init__(self, model: SBN):
        super().__init__()
        self.model = model

    def forward(self, method: str, *args):
        return getattr(self.model, method)(*args)


class ReplicaModels:
    """R models of one architecture as stacked tensors ``[R, ...]``, their bounds computed by one vmapped
    call of the model's own :meth:`~sbn_train.models.SBN.log_weights` for all of them.

    ``template``: a model of that architecture (its own tensors are not used, nor changed: ``functional_call``
    swaps the stacks in for the call); ``states``: each replica's ``state_dict`` (its parameters and buffers,
    e.g. a replica's current modules or its ``best.pt``). ``block_rows``: on a CPU, the rows (data x samples x
    replicas) of one vmapped call (None: ``REPLICA_BLOCK_ROWS``)."""

    def __init__(self, template: SBN, states: list[dict[str, Tensor]], block_rows: int | None = None):
        if not states:
            raise ValueError("ReplicaModels needs at least one model")
        self.template, self.size, self.block_rows = template, len(states), block_rows
        self.dtype = template.prior_logits.dtype
        device = template.prior_logits.device
        self.tensors = {f"model.{k}": torch.stack([sd[k].detach().to(device) for sd in states])
                        for k in states[0]}
        self._call = _Call(template)
        self._batched = torch.func.vmap(self._one, in_dims=(0, 0, None, None))

    def _one(self, tensors: dict, x: Tensor, uniforms: list[Tensor], samples: int) -> Tensor:
        return torch.func.functional_call(self._call, tensors, ("log_weights", x, samples, UniformTape(uniforms)))

    def _blocks(self, samples: int, B: int, max_rows: int, device: torch.device) -> tuple[int, int]:
        """(samples, data rows) of one vmapped call. All replicas' rows of a call together are at most
        ``max_rows`` (the memory of one run's evaluation chunk), and on a CPU about ``block_rows`` (blocks
        that stay in cache, as ``log_weights`` makes them for one model). The samples of a call are as many
        as fit, then the data rows: each call computes its rows' first inference layer once for all its
        samples, as one ``log_weights`` call does for its chunk."""
        rows = max_rows if device.type != "cpu" else min(max_rows, self.block_rows or REPLICA_BLOCK_ROWS)
        per_replica = max(1, rows // self.size)
        s = min(samples, per_replica)
        return s, max(1, min(B, per_replica // s))

    @torch.no_grad()
    def log_weights(self, x: Tensor, samples: int, generator: torch.Generator, max_rows: int = 65536) -> Tensor:
        """``[R, samples, B]``: row r is ``SBN.log_weights(x, samples, generator)`` of replica r, with the same
        uniforms: they are drawn as that call draws them (one ``draw_uniforms(samples * B)``: one uniform per
        sample, data row and latent unit), once for all replicas, then handed to the vmapped calls, each a
        block of samples and data rows (:meth:`_blocks`), on a :class:`UniformTape`."""
        B = x.shape[0]
        us = self.template.draw_uniforms(samples * B, generator, x.device, x.dtype)   # log_weights' own draw
        s, b = self._blocks(samples, B, max_rows, x.device)
        if s >= samples and b >= B:
            return self._batched(self.tensors, x.expand(self.size, *x.shape), us, samples)
        grid = [u.view(samples, B, u.shape[-1]) for u in us]                # sample-major: row s * B + b
        out = x.new_empty(self.size, samples, B)
        for s0 in range(0, samples, s):
            s1 = min(samples, s0 + s)
            for b0 in range(0, B, b):
                b1 = min(B, b0 + b)
                xb = x[b0:b1]
                block = [g[s0:s1, b0:b1].reshape(-1, g.shape[-1]) for g in grid]
                out[:, s0:s1, b0:b1] = self._batched(self.tensors, xb.expand(self.size, *xb.shape), block,
                                                     s1 - s0)
        return out

    @torch.no_grad()
    def elbo_average(self, x: Tensor, samples: int, generator: torch.Generator, max_rows: int = 65536) -> Tensor:
        """:func:`elbo_average` of every replica, ``[R, B]`` (float64), its chunks and draws."""
        B = x.shape[0]
        per_chunk = max(1, max_rows // max(B, 1))
        total = torch.zeros(self.size, B, device=x.device, dtype=torch.float64)
        done = 0
        while done < samples:
            c = min(per_chunk, samples - done)
            total += self.log_weights(x, c, generator, max_rows).double().sum(1)
            done += c
        return total / samples

    @torch.no_grad()
    def iwae_bound(self, x: Tensor, k: int, generator: torch.Generator, max_rows: int = 65536) -> Tensor:
        """``SBN.iwae_bound`` of every replica, ``[R, B]``: its chunks of at most ``max_rows`` rows (the same
        draws), combined by the same running logsumexp."""
        B = x.shape[0]
        per_chunk = max(1, max_rows // max(B, 1))
        total = torch.full((self.size, B), -math.inf, device=x.device, dtype=x.dtype)
        done = 0
        while done < k:
            c = min(per_chunk, k - done)
            w = self.log_weights(x, c, generator, max_rows)                   # [R, c, B]
            total = torch.logaddexp(total, torch.logsumexp(w, 1))
            done += c
        return total - math.log(k)


@torch.no_grad()
def replica_split_bounds(models: ReplicaModels, data: Tensor, batch_size: int, limit: int | None, seed: int,
                         elbo_samples: int, iwae_k: int, max_rows: int,
                         progress: Progress | None = None) -> tuple[Tensor, Tensor | None]:
    """:func:`split_bounds` of every replica of ``models`` at once: ``[R, rows]`` ELBOs and K-sample bounds.
    Row r equals ``split_bounds(model_r, ...)`` with the same arguments up to float rounding (the replicas'
    matrix products are batched, and blocked by rows differently): the same binarized batches and the same
    latent uniforms, since a run's evaluation streams are seeded by ``seed`` alone, the same for every
    replica; they are drawn once, in the order one run draws them, and shared."""
    gen = torch.Generator(device=data.device).manual_seed(seed + SAMPLING_OFFSET)
    rows = data.shape[0] if limit is None else min(limit, data.shape[0])
    elbos, iwaes = [], []
    with (progress or SILENT).track(rows) as done:
        for x in eval_batches(data, batch_size, seed, limit):
            x = x.to(models.dtype)
            elbos.append(models.elbo_average(x, elbo_samples, gen, max_rows))
            if iwae_k:
                iwaes.append(models.iwae_bound(x, iwae_k, gen, max_rows).double())
            done(x.shape[0])
    return torch.cat(elbos, 1), (torch.cat(iwaes, 1) if iwae_k else None)


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
    out.update(_fixed_views(model, estimator, data, batch_size, samples, seed, views, exact_max_latents,
                            fixed_seed))
    return with_log10(out)


def _exact_applies(model: SBN, views: Sequence[str], exact_max_latents: int) -> bool:
    return "exact" in views and model.n_configurations <= 2 ** exact_max_latents


def _fixed_views(model: SBN, estimator: Estimator, data: Tensor, batch_size: int, samples: int, seed: int,
                 views: Sequence[str], exact_max_latents: int, fixed_seed: int) -> dict[str, float]:
    """The ``latent`` and ``exact`` views of :func:`measure_variance` (without log10 values)."""
    dtype = model.prior_logits.dtype
    out: dict[str, float] = {}
    exact = _exact_applies(model, views, exact_max_latents)
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
    return out


def _replica_moments(group, rows: list[int], gens: list[torch.Generator], batches, samples: int,
                     params: dict[str, list[nn.Parameter]]) -> list[dict[str, float]]:
    """:func:`~sbn_train.diagnostics.gradient_moments` (the variances only) of the replicas ``rows`` of
    ``group``, ``samples`` estimates each, from one vmapped gradient per estimate: replica ``rows[i]`` draws
    its minibatch (``batches(i)``) and then its estimator's uniforms (in eval mode) from ``gens[i]``, as its
    standalone probe draws them. Per-replica Welford statistics ``[k, N]``, element by element the
    arithmetic of :class:`~sbn_train.diagnostics.Welford`."""
    model = group.states[rows[0]].model
    names = {id(p): f"model.{n}" for n, p in model.named_parameters()}
    groups = {g: [names[id(p)] for p in ps] for g, ps in params.items()}
    stats = {g: Welford() for g in groups}
    for _ in range(samples):
        xs = torch.stack([batches(i) for i in range(len(rows))])
        grads = group.probe_gradients(rows, xs, group.probe_uniforms(rows, gens, xs.shape[1]))
        for g, ns in groups.items():
            stats[g].add(torch.cat([grads[n].reshape(len(rows), -1) for n in ns], dim=1))
    out = []
    for i in range(len(rows)):
        out.append({g: float(s.variance()[i].mean()) for g, s in stats.items()})
    return out


def measure_variance_replicas(group, rows: list[int], data: Tensor, batch_size: int, samples: int,
                              seeds: list[int], views: Sequence[str] = VARIANCE_VIEWS, exact_max_latents: int = 12,
                              fixed_seeds: list[int] | None = None) -> list[dict[str, float]]:
    """:func:`measure_variance` of the replicas ``rows`` of a vectorized
    :class:`~sbn_train.replicas.ReplicaGroup` (replica ``rows[i]`` with ``seeds[i]`` and ``fixed_seeds[i]``),
    one dict per row. The ``minibatch`` and ``latent`` views run as one vmapped gradient of the replicas per
    estimate, each fed with its own probe streams (:func:`_replica_moments`); the ``exact`` view (tiny models)
    runs per replica, with the ``latent`` view that shares its estimates. Each value equals the standalone
    probe's up to float rounding (the replicas' matrix products are batched)."""
    fixed_seeds = list(fixed_seeds) if fixed_seeds is not None else [0] * len(rows)
    states = [group.states[r] for r in rows]
    model = states[0].model
    dtype = model.prior_logits.dtype
    outs: list[dict[str, float]] = [{} for _ in rows]
    if "minibatch" in views:
        gens = [torch.Generator(device=data.device).manual_seed(s) for s in seeds]
        streams = [fresh_minibatches(data, batch_size, samples, g) for g in gens]
        m = _replica_moments(group, rows, gens, lambda i: next(streams[i]).to(dtype), samples,
                             parameter_groups(model, "grad_var"))
        for o, v in zip(outs, m):
            o.update(v)
    if _exact_applies(model, views, exact_max_latents):
        for o, s, seed, fixed in zip(outs, states, seeds, fixed_seeds):
            o.update(_fixed_views(s.model, s.estimator, data, batch_size, samples, seed,
                                  [v for v in views if v != "minibatch"], exact_max_latents, fixed))
    elif "latent" in views:
        xs = [fixed_minibatch(data, batch_size, f).to(dtype) for f in fixed_seeds]
        gens = [torch.Generator(device=data.device).manual_seed(s + 1) for s in seeds]
        m = _replica_moments(group, rows, gens, lambda i: xs[i], samples, parameter_groups(model, "view"))
        for o, v in zip(outs, m):
            o.update({f"grad_var_latent/{name.split('/', 1)[1]}": var for name, var in v.items()})
    return [with_log10(o) for o in outs]
