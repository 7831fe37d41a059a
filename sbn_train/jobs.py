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
from .evaluation import measure_variance, split_bounds, summarize
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
    """The gradient-variance probe (:func:`sbn_train.evaluation.measure_variance`), on its own streams."""

    def __init__(self, cfg: VarianceConfig, data: torch.Tensor, batch_size: int, seed: int):
        self.every, self.cfg, self.data, self.batch_size, self.seed = cfg.every, cfg, data, batch_size, seed

    def __call__(self, ctx: Context, step: int) -> None:
        with phase("variance probe", f"M = {self.cfg.samples:,} estimates per view ({', '.join(self.cfg.views)})"):
            v = measure_variance(ctx.state.model, ctx.state.estimator, self.data, self.batch_size, self.cfg.samples,
                                 seed=(self.seed * 1_000_003 + step) % (2 ** 31), views=self.cfg.views,
                                 exact_max_latents=self.cfg.exact_max_latents, fixed_seed=self.seed)
        ctx.log(v, step)
        ctx.measured()


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


class EvaluateAndCheckpoint(Job):
    """Validation (and training-split) bounds; ``best.pt`` when the validation bound improves; then the
    checkpoint of the whole :class:`TrainState`."""
    at_end = True

    def __init__(self, every: int, cfg: EvalConfig, splits: Splits, show: bool = False):
        self.every, self.cfg, self.splits, self.show = every, cfg, splits, show

    def bounds(self, model: SBN) -> dict[str, float]:
        out = evaluate(model, self.splits.valid, self.cfg, "valid", self.show)
        if self.cfg.train_split:
            ev = evaluate(model, self.splits.train, replace(self.cfg, limit=self.cfg.train_limit), "train",
                          self.show)
            out[f"{TRAIN_ELBO}_eval"] = ev.pop(TRAIN_ELBO)   # TRAIN_ELBO is the running training-batch ELBO
            out.update(ev)
        return out

    def __call__(self, ctx: Context, step: int) -> None:
        state = ctx.state
        ev = self.bounds(state.model)
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
