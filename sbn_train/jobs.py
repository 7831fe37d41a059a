"""Work scheduled around the training step. Each job has an interval (its trigger) and runs after the step
that reaches it; the loop in :mod:`sbn_train.train` runs them in the order given. Jobs that measure
(variance probe, evaluation) restart the step clock, so ``perf/*`` counts training steps only, and
draw their randomness from generators of their own, so training is the same whether or not they run.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from . import faults, tb
from .config import EvalConfig, VarianceConfig
from .data import Splits, eval_batches
from .evaluation import (ReplicaModels, measure_variance, measure_variance_replicas, replica_split_bounds,
                         split_bounds, summarize)
from .metrics import bounds_prefix, in_tensorboard
from .models import SBN
from .progress import Progress, phase
from .state import RunError, TrainState

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
TRAIN_ELBO = f"{bounds_prefix('train')}/elbo"     # the running ELBO of the training batches


class StepClock:
    """Seconds per training step over a window that measurements do not enter."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self.t0, self.n = time.perf_counter(), 0

    def tick(self) -> None:
        self.n += 1

    def seconds_per_step(self) -> float:
        return (time.perf_counter() - self.t0) / max(self.n, 1)


@dataclass
class Context:
    """What the jobs of one run share."""
    state: TrainState
    step_fn: Any                      # the TrainStep: running ELBO and the estimator's last metrics
    writer: Any                       # SummaryWriter
    out_dir: Path
    clock: StepClock
    bar: Any                          # tqdm

    @property
    def metrics(self) -> dict[str, float]:
        """The last value of every metric (results.json); part of the checkpointed state."""
        return self.state.metrics

    def write(self, values: dict[str, float], step: int) -> None:
        """TensorBoard scalars only; ``results.json``-only metrics (the probe's linear values) are skipped."""
        for k, v in values.items():
            if in_tensorboard(k):
                self.writer.add_scalar(k, v, step)

    def measured(self) -> None:
        """After a measurement: the step clock and the progress bar's rate and ETA leave its time out."""
        self.clock.restart()
        if hasattr(self.bar, "unpause"):
            self.bar.unpause()

    def log(self, values: dict[str, float], step: int) -> None:
        """TensorBoard scalars, also kept as the run's final metrics (results.json)."""
        self.write(values, step)
        self.metrics.update(values)


class Job:
    """Runs every ``every`` steps (0: never) and, if ``at_end``, after the last step."""
    every: int = 0
    at_end: bool = False

    def due(self, step: int, max_steps: int) -> bool:
        return (self.every > 0 and step % self.every == 0) or (self.at_end and step == max_steps)

    def __call__(self, ctx: Context, step: int) -> None:
        raise NotImplementedError


class LogTraining(Job):
    """``bounds/train/elbo`` (running mean since the last log), ``perf/*`` and the estimator's own metrics.

    It also watches for divergence: a non-finite ELBO, or (``divergence_nats`` > 0) a running ELBO more than
    ``divergence_nats`` nats per data dimension below the lower of the model's ELBO before training
    (``TrainState.first_elbo``) and -D log 2 (the bound of a model that predicts every pixel as a coin flip)
    stops the run with an error; the last good checkpoint stays. Training raises the bound from where it
    starts, so a run that falls a further D nats below both is not learning any more."""
    at_end = True

    def __init__(self, every: int, lr: float, divergence_nats: float = 0.0, x_dim: int = 1):
        self.every, self.lr = every, lr
        self.floor_gap, self.coin_flip = divergence_nats * x_dim, -x_dim * math.log(2.0)

    def check(self, ctx: Context, train_elbo: float, step: int) -> None:
        if not math.isfinite(train_elbo):
            raise RunError(f"training diverged at step {step} (ELBO {train_elbo}); lower optim.lr (now {self.lr})")
        start = ctx.state.first_elbo
        anchor = self.coin_flip if start is None else min(start, self.coin_flip)
        if self.floor_gap and train_elbo < anchor - self.floor_gap:
            raise RunError(f"training diverged at step {step}: {TRAIN_ELBO} {train_elbo:.1f} is below "
                           f"{anchor - self.floor_gap:.1f}, {self.floor_gap:g} nats under where it started "
                           f"(train.divergence_nats per data dimension); lower optim.lr (now {self.lr})")

    def __call__(self, ctx: Context, step: int) -> None:
        train_elbo = ctx.step_fn.take_running_elbo()                 # a sync point
        self.check(ctx, train_elbo, step)
        dt = ctx.clock.seconds_per_step()
        est_metrics = {f"estimator/{k}": float(v) for k, v in ctx.step_fn.last_metrics.items()}
        ctx.write({TRAIN_ELBO: train_elbo, "perf/step_time_ms": 1000 * dt, "perf/steps_per_s": 1 / dt,
                   **est_metrics}, step)
        ctx.metrics[TRAIN_ELBO] = train_elbo
        ctx.bar.set_postfix(elbo=f"{train_elbo:.2f}", refresh=False)
        ctx.clock.restart()


class VarianceProbe(Job):
    """The gradient-variance probe (:func:`sbn_train.evaluation.measure_variance`), on its own streams.

    In a replica group, ``batch`` (a :class:`GroupProbes`) measures the probes of the group's runs that are due
    at the same step with the same settings together: the ``minibatch`` and ``latent`` views as one vmapped
    gradient of those replicas per estimate (``ReplicaGroup.probe_gradients``), each replica fed with its own
    probe streams (its minibatches, then its estimator's uniforms in eval mode, from its probe generator in the
    standalone order) and with per-replica Welford statistics
    (:func:`sbn_train.evaluation.measure_variance_replicas`); the ``exact`` view (tiny models) runs per run, with
    the ``latent`` view that shares its estimates. A group that is not vectorized (``marginal`` and ``leg`` on a
    CPU take turns replica by replica) and a run alone in its class probe as a standalone run does."""

    def __init__(self, cfg: VarianceConfig, data: torch.Tensor, batch_size: int, seed: int):
        self.every, self.cfg, self.data, self.batch_size, self.seed = cfg.every, cfg, data, batch_size, seed
        self.batch: GroupProbes | None = None

    def probe_seed(self, step: int) -> int:
        return (self.seed * 1_000_003 + step) % (2 ** 31)

    def measure(self, ctx: Context, step: int) -> dict[str, float]:
        """This run's probe on its own."""
        return measure_variance(ctx.state.model, ctx.state.estimator, self.data, self.batch_size, self.cfg.samples,
                                seed=self.probe_seed(step), views=self.cfg.views,
                                exact_max_latents=self.cfg.exact_max_latents, fixed_seed=self.seed)

    def shares_work(self, other: "VarianceProbe") -> bool:
        """Whether ``other``'s probe is computed as this job's is: the same settings, batch size and data."""
        return self.cfg == other.cfg and self.batch_size == other.batch_size and same_data(self.data, other.data)

    def __call__(self, ctx: Context, step: int) -> None:
        with phase("variance probe", f"M = {self.cfg.samples:,} estimates per view ({', '.join(self.cfg.views)})"):
            v = self.batch.values(self, ctx, step) if self.batch is not None else self.measure(ctx, step)
        ctx.log(v, step)
        ctx.measured()


class GroupProbes:
    """The variance probes of a replica group's runs, batched over the runs (as :class:`GroupEvaluations`
    batches their evaluations).

    ``holder[0]`` is the current :class:`~sbn_train.replicas.ReplicaGroup` (None before the first step).
    Before a group's jobs run after a step, :meth:`start` sets the runs (their probe job and :class:`Context`)
    whose probe is due. The first of them to run its probe measures, at once, every member whose job
    :meth:`~VarianceProbe.shares_work` with it, whose state is a replica of the group and whose model has the
    same architecture; the others take their values when their own job runs. A run alone in its class, and
    every run of a group that is not vectorized, probes as a standalone run does. The replicas' tensors are
    read when the first probe runs: the jobs before a run's probe do not change them."""

    def __init__(self, holder: list):
        self.holder = holder
        self.members: list[tuple[VarianceProbe, Context]] = []
        self.ready: dict[int, dict[str, float]] = {}

    def start(self, members: list[tuple[VarianceProbe, Context]]) -> None:
        self.members, self.ready = list(members), {}

    def values(self, job: VarianceProbe, ctx: Context, step: int) -> dict[str, float]:
        if id(job) not in self.ready:
            self._measure(job, ctx, step)
        return self.ready.pop(id(job))

    def _measure(self, job: VarianceProbe, ctx: Context, step: int) -> None:
        group = self.holder[0]
        states = [] if group is None or not group.vectorize else group.states
        mine = [(j, c) for j, c in self.members if j is not job and id(j) not in self.ready
                and c.state.step == step and j.shares_work(job) and any(c.state is s for s in states)
                and same_architecture(c.state.model, ctx.state.model)]
        if not mine or not any(ctx.state is s for s in states):
            self.ready[id(job)] = job.measure(ctx, step)
            return
        together = [(job, ctx)] + mine
        rows = [next(r for r, s in enumerate(states) if s is c.state) for _, c in together]
        cfg = job.cfg
        values = measure_variance_replicas(group, rows, job.data, job.batch_size, cfg.samples,
                                           [j.probe_seed(step) for j, _ in together], cfg.views,
                                           cfg.exact_max_latents, [j.seed for j, _ in together])
        for (j, _), v in zip(together, values):
            self.ready[id(j)] = v


class Images(Job):
    """Data (once, at step 0), model samples and reconstructions as TensorBoard image grids."""
    at_end = True

    def __init__(self, every: int, valid: torch.Tensor, image_shape, seed: int, n_images: int):
        self.every, self.shape, self.seed = every, image_shape, seed
        n = min(n_images, valid.shape[0])
        self.x = next(eval_batches(valid, max(n, 1), seed, n)) if n else valid[:0]

    def first(self, ctx: Context) -> None:
        tb.log_images(ctx.writer, ctx.state.model, self.x, self.shape, 0, self.seed, with_data=True)

    def __call__(self, ctx: Context, step: int) -> None:
        tb.log_images(ctx.writer, ctx.state.model, self.x, self.shape, step, self.seed)


def initial_elbo(model: SBN, valid: torch.Tensor, seed: int, rows: int = 100) -> float | None:
    """The model's mean ELBO on the first ``rows`` validation rows, from generators of its own."""
    if valid.shape[0] == 0:
        return None
    elbo, _ = split_bounds(model, valid, rows, rows, seed, 1, 0, 65536)
    return float(elbo.mean())


def evaluate(model: SBN, data: torch.Tensor, cfg: EvalConfig, split: str, show: bool = False) -> dict[str, float]:
    """Single-sample ELBO and (if ``cfg.iwae_k``) the K-sample bound, averaged over the first ``cfg.limit``
    rows of ``data``: ``bounds/{split}/elbo`` and ``bounds/{split}/iwae{K}``. A line at its start and end,
    and a progress bar of the rows if ``show``."""
    elbo, iwae = split_bounds(model, data, cfg.batch_size, cfg.limit, cfg.seed, 1, cfg.iwae_k, cfg.max_rows,
                              progress=Progress(f"evaluating {split}", enabled=show))
    return summarize(bounds_prefix(split), elbo, iwae, cfg.iwae_k)


def evaluate_replicas(models: ReplicaModels, data: torch.Tensor, cfg: EvalConfig, split: str,
                      show: bool = False) -> list[dict[str, float]]:
    """:func:`evaluate` of every replica of ``models`` in one batched computation (one dict per replica)."""
    elbo, iwae = replica_split_bounds(models, data, cfg.batch_size, cfg.limit, cfg.seed, 1, cfg.iwae_k,
                                      cfg.max_rows, progress=Progress(f"evaluating {split} ({models.size} runs)",
                                                                      enabled=show))
    return [summarize(bounds_prefix(split), elbo[r], None if iwae is None else iwae[r], cfg.iwae_k)
            for r in range(models.size)]


def same_data(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same split (the same tensor, or equal ones)."""
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))


def same_architecture(a: SBN, b: SBN) -> bool:
    """Models whose tensors can be stacked: the same names, shapes, dtypes and devices."""
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(
        (sa[k].shape, sa[k].dtype, sa[k].device) == (sb[k].shape, sb[k].dtype, sb[k].device) for k in sa)


def partition(items: list, together) -> list[list]:
    """``items`` in classes of ``together(a, b)`` (compared with each class's first item), in order."""
    classes: list[list] = []
    for item in items:
        for c in classes:
            if together(c[0], item):
                c.append(item)
                break
        else:
            classes.append([item])
    return classes


class EvaluateAndCheckpoint(Job):
    """Validation (and training-split) bounds; ``best.pt`` when the validation bound improves; then the
    checkpoint of the whole :class:`TrainState`. In a replica group, ``batch`` (a :class:`GroupEvaluations`)
    computes the bounds of the group's runs together."""
    at_end = True

    def __init__(self, every: int, cfg: EvalConfig, splits: Splits, show: bool = False):
        self.every, self.cfg, self.splits, self.show = every, cfg, splits, show
        self.batch: GroupEvaluations | None = None

    def bounds(self, model: SBN) -> dict[str, float]:
        out = evaluate(model, self.splits.valid, self.cfg, "valid", self.show)
        if self.cfg.train_split:
            ev = evaluate(model, self.splits.train, replace(self.cfg, limit=self.cfg.train_limit), "train",
                          self.show)
            out[f"{TRAIN_ELBO}_eval"] = ev.pop(TRAIN_ELBO)   # TRAIN_ELBO is the running training-batch ELBO
            out.update(ev)
        return out

    def replica_bounds(self, models: ReplicaModels) -> list[dict[str, float]]:
        """:meth:`bounds` of every replica of ``models`` (runs whose jobs :meth:`shares_work` with this one)."""
        out = evaluate_replicas(models, self.splits.valid, self.cfg, "valid", self.show)
        if self.cfg.train_split:
            train = evaluate_replicas(models, self.splits.train, replace(self.cfg, limit=self.cfg.train_limit),
                                      "train", self.show)
            for o, ev in zip(out, train):
                o[f"{TRAIN_ELBO}_eval"] = ev.pop(TRAIN_ELBO)   # TRAIN_ELBO is the running training-batch ELBO
                o.update(ev)
        return out

    def shares_work(self, other: "EvaluateAndCheckpoint") -> bool:
        """Whether ``other``'s bounds are computed as this job's are: the same settings and data."""
        return self.cfg == other.cfg and same_data(self.splits.valid, other.splits.valid) and \
            (not self.cfg.train_split or same_data(self.splits.train, other.splits.train))

    def __call__(self, ctx: Context, step: int) -> None:
        state = ctx.state
        ev = self.batch.bounds(self, ctx) if self.batch is not None else self.bounds(state.model)
        faults.point("eval", step)
        ctx.log(ev, step)
        valid = bounds_prefix("valid")
        score = ev.get(f"{valid}/iwae{self.cfg.iwae_k}", ev[f"{valid}/elbo"])
        if score > state.best:
            state.best, state.best_step = score, step
            state.save_best(ctx.out_dir / BEST, ev)
        state.save(ctx.out_dir / CHECKPOINT)
        ctx.writer.flush()
        ctx.measured()


class GroupEvaluations:
    """The periodic evaluations of a replica group's runs, batched over the runs.

    Before a group's jobs run after a step, :attr:`members` is set to the runs (their evaluation job and
    :class:`Context`) whose evaluation is due. The first of them to run its evaluation evaluates, at once,
    every member whose job :meth:`~EvaluateAndCheckpoint.shares_work` with it and whose model has the same
    architecture (one :class:`~sbn_train.evaluation.ReplicaModels` computation per split and batch of rows); the
    others take their bounds when their own job runs. A run alone in its class is evaluated as a standalone
    run is. The models' tensors are read when the first job runs: the jobs before a run's evaluation do not
    change them."""

    def __init__(self):
        self.members: list[tuple[EvaluateAndCheckpoint, Context]] = []
        self.ready: dict[int, dict[str, float]] = {}

    def start(self, members: list[tuple[EvaluateAndCheckpoint, Context]]) -> None:
        self.members, self.ready = list(members), {}

    def bounds(self, job: EvaluateAndCheckpoint, ctx: Context) -> dict[str, float]:
        if id(job) not in self.ready:
            self._evaluate(job, ctx)
        return self.ready.pop(id(job))

    def _evaluate(self, job: EvaluateAndCheckpoint, ctx: Context) -> None:
        mine = [(j, c) for j, c in self.members if j is not job and id(j) not in self.ready
                and j.shares_work(job) and same_architecture(c.state.model, ctx.state.model)]
        if not mine:
            self.ready[id(job)] = job.bounds(ctx.state.model)
            return
        together = [(job, ctx)] + mine
        models = ReplicaModels(ctx.state.model, [c.state.model.state_dict() for _, c in together])
        for (j, _), ev in zip(together, job.replica_bounds(models)):
            self.ready[id(j)] = ev
