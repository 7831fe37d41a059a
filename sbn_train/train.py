"""The training loop: the step, then the scheduled jobs (log, variance probe, images, evaluation and
checkpoint; :mod:`sbn_train.jobs`), then the final test of the best model and ``results.json``.

Metric names (TensorBoard tags) are an API; their registry is :mod:`sbn_train.metrics`.
results.json holds the final step, status, the last value of every metric, the best model's step and
validation bound, test/* with their standard errors over test examples, and the hyperparameters.
"""
from __future__ import annotations

import json
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import faults, tb
from . import metrics as registry
from .config import EvalConfig, OptimConfig, TestConfig, TrainConfig, VarianceConfig
from .data import Splits
from .estimators import Estimate, Estimator
from .evaluation import logged_views, split_bounds, summarize
from .jobs import (BEST, CHECKPOINT, Context, EvaluateAndCheckpoint, Images, Job, LogTraining, StepClock,
                   VarianceProbe, evaluate, initial_elbo)
from .models import SBN
from .progress import Progress, training_progress
from .lock import FolderBusy, RunLock
from .signals import Interrupted, StopSignals
from .state import (RunError, TrainSampler, TrainState, load_checkpoint, make_optimizer, save_atomic,
                    trajectory_config, write_atomic)

__all__ = ["BEST", "CHECKPOINT", "FAILED", "RESULTS", "RunError", "RunResult", "RunSettings", "Stopped", "TrainSampler",
           "TrainState", "TrainStep", "evaluate", "evaluate_test", "load_checkpoint", "make_optimizer", "run",
           "save_atomic", "train_step"]

log = logging.getLogger(__name__)

RESULTS = "results.json"
FAILED = "failed.json"       # written by the CLI when a run stops with an error


def compute_grads(est: Estimate, model_opt: torch.optim.Optimizer, est_opt: torch.optim.Optimizer | None,
                  est_params: list[nn.Parameter]) -> None:
    """Model parameters get the surrogate's gradient; the estimator's own parameters get their ``aux_loss``'s
    alone (e.g. a baseline's squared error, or a variance objective built from the gradient estimate with
    ``create_graph=True``), so neither loss leaks into the other's parameters."""
    model_opt.zero_grad(set_to_none=True)
    if est_opt is not None and est.aux_loss is not None:
        grads = torch.autograd.grad(est.aux_loss, est_params, retain_graph=True, allow_unused=True)
        for p, g in zip(est_params, grads):
            p.grad = g
    est.surrogate.backward(inputs=[p for g in model_opt.param_groups for p in g["params"]])


def apply_grads(est: Estimate, model_opt: torch.optim.Optimizer, est_opt: torch.optim.Optimizer | None) -> None:
    model_opt.step()
    if est_opt is not None and est.aux_loss is not None:
        est_opt.step()


def train_step(model: SBN, estimator: Estimator, est: Estimate, model_opt: torch.optim.Optimizer,
               est_opt: torch.optim.Optimizer | None, est_params: list[nn.Parameter]) -> None:
    """One update from the estimate ``est``: gradients, then both optimizers."""
    compute_grads(est, model_opt, est_opt, est_params)
    apply_grads(est, model_opt, est_opt)


class TrainStep:
    """The unit the loop repeats: a minibatch, the estimate, the update. The running training ELBO is
    accumulated on the device and read only when the loop logs it. ``batch``, ``estimate``, ``backward``,
    ``apply`` and ``record`` are its phases (scripts/bench_step.py times them one by one)."""

    def __init__(self, state: TrainState):
        self.state = state
        self.dtype = state.model.prior_logits.dtype
        self.last_metrics: dict[str, Any] = {}

    def batch(self) -> torch.Tensor:
        return self.state.sampler.next().to(self.dtype)

    def estimate(self, x: torch.Tensor) -> Estimate:
        return self.state.estimator(self.state.model, x, self.state.generator)

    def backward(self, est: Estimate) -> None:
        compute_grads(est, self.state.model_opt, self.state.est_opt, self.state.est_params)

    def apply(self, est: Estimate) -> None:
        apply_grads(est, self.state.model_opt, self.state.est_opt)

    def record_device(self, est: Estimate) -> None:
        self.state.elbo_sum += est.elbo.mean()

    def record(self, est: Estimate) -> None:
        self.record_device(est)
        self.state.elbo_n += 1
        self.last_metrics = est.metrics

    def __call__(self) -> None:
        est = self.estimate(self.batch())
        self.backward(est)
        faults.point("step", self.state.step)
        self.apply(est)
        self.record(est)

    def take_running_elbo(self) -> float:
        """The mean training ELBO since the last call (a device sync), and a fresh start."""
        state = self.state
        value = float(state.elbo_sum) / max(state.elbo_n, 1)
        state.elbo_sum.zero_()
        state.elbo_n = 0
        return value


@dataclass
class RunSettings:
    """The typed settings a run needs (built by the CLI from its config)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    variance: VarianceConfig = field(default_factory=VarianceConfig)
    test: TestConfig | None = field(default_factory=TestConfig)
    seed: int = 0


@dataclass
class RunResult:
    step: int
    metrics: dict[str, float]
    out_dir: str


def evaluate_test(model: SBN, data: torch.Tensor, cfg: TestConfig, show: bool = False) -> dict[str, float]:
    """``test/elbo`` (averaged over ``cfg.elbo_samples``) and ``test/iwae{K}``, with standard errors over
    the test examples (``test/elbo_se`` ...)."""
    elbo, iwae = split_bounds(model, data, cfg.batch_size, cfg.limit, cfg.seed, cfg.elbo_samples, cfg.iwae_k,
                              cfg.max_rows, progress=Progress("testing the best model", enabled=show))
    return summarize("test", elbo, iwae, cfg.iwae_k, with_se=True)


def prepare_folder(out_dir: Path, cfg: TrainConfig) -> Path | None:
    """Return the checkpoint to resume from (or None); refuse to overwrite a previous run by accident."""
    ckpt = out_dir / CHECKPOINT
    old = [p for p in out_dir.glob("events.out.tfevents.*")] + [p for p in (ckpt, out_dir / RESULTS) if p.exists()]
    if cfg.resume:
        if ckpt.exists():
            return ckpt
        log.warning("train.resume=true but %s has no checkpoint: starting from step 0", out_dir)
    elif old and not cfg.overwrite:
        raise RunError(f"{out_dir} already holds a run{_saved_step(ckpt)}. Continue it with train.resume=true, "
                       f"discard it with train.overwrite=true, or set hydra.run.dir=<another folder>")
    for p in set(old) | set(out_dir.glob("*.pt")):
        p.unlink(missing_ok=True)
    return None


def _saved_step(ckpt: Path) -> str:
    """`` (saved at step N)`` for a readable checkpoint, else ``""``."""
    try:
        return f" (saved at step {int(torch.load(ckpt, map_location='cpu', weights_only=True)['step'])})"
    except Exception:  # noqa: BLE001 - only decorates a message
        return ""


def finished_result(out_dir: Path, cfg: TrainConfig) -> RunResult | None:
    """The stored result of a run in ``out_dir`` that already reached ``cfg.max_steps``, else None."""
    try:
        results = json.loads((out_dir / RESULTS).read_text())
    except (OSError, ValueError):
        return None
    if results.get("status") != "finished" or int(results.get("step", -1)) != cfg.max_steps:
        return None
    return RunResult(step=int(results["step"]), metrics=results["metrics"], out_dir=str(out_dir))


def _write_results(out_dir: Path, results: dict) -> None:
    """results.json, atomically (a failed write leaves no file behind and says which path and why)."""
    text = json.dumps(results, indent=2, default=str)
    write_atomic(out_dir / RESULTS, lambda tmp: tmp.write_text(text), ("results", int(results.get("step", -1))))


def make_step(state: TrainState, cuda_graph: bool | None):
    """The step the loop calls: the TrainStep, or its CUDA-graph replay (``train.cuda_graph``; None: on for
    CUDA devices). When the graph cannot be used, one warning line says why."""
    step = TrainStep(state)
    if cuda_graph is False or (cuda_graph is None and state.device.type != "cuda"):
        return step
    from .graph import GraphStep, graph_unsupported_reason
    reason = graph_unsupported_reason(state)
    if reason is not None:
        if cuda_graph or state.device.type == "cuda":
            log.warning("train.cuda_graph: %s; the step runs eagerly", reason)
        return step
    return GraphStep(step)


def make_jobs(settings: RunSettings, splits: Splits) -> list[Job]:
    """The scheduled jobs, in the order they run after a step."""
    tr = settings.train
    jobs: list[Job] = [LogTraining(tr.log_every, settings.optim.lr, tr.divergence_nats, splits.train.shape[1]),
                       VarianceProbe(settings.variance, splits.train, tr.batch_size, settings.seed)]
    if settings.eval.images and splits.image_shape is not None:
        jobs.append(Images(tr.eval_every, splits.valid, splits.image_shape, settings.eval.seed, settings.eval.images))
    jobs.append(EvaluateAndCheckpoint(tr.eval_every, settings.eval, splits, show=tr.progress))
    return jobs


class Stopped(Exception):
    """A run stopped by a signal after saving its state; ``train.resume=true`` continues it."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        super().__init__(f"stopped at step {step} ({signal.Signals(signum).name})")


def _run_jobs(ctx: Context, jobs: list[Job], step: int, max_steps: int, stop: StopSignals) -> None:
    """The jobs due after ``step``. A stop signal during them saves the state as it was before them
    (``jobs_pending``), so a resume runs them again and nothing they logged is lost or doubled."""
    due = [job for job in jobs if job.due(step, max_steps)]
    if not due:
        return
    state = ctx.state
    before = (state.elbo_sum.clone(), state.elbo_n, state.best, state.best_step, dict(state.metrics))
    try:
        with stop.interruptible():
            for job in due:
                job(ctx, step)
    except Interrupted:
        state.elbo_sum, state.elbo_n, state.best, state.best_step, state.metrics = before
        state.jobs_pending = True
        _save_and_stop(ctx, stop)


def _save_and_stop(ctx: Context, stop: StopSignals) -> None:
    with stop.shielded():
        ctx.state.save(ctx.out_dir / CHECKPOINT)
        ctx.writer.flush()
    stop.chain()                              # e.g. a scheduler's requeue handler
    raise Stopped(stop.signum, ctx.state.step)


def train_loop(ctx: Context, step_fn, jobs: list[Job], max_steps: int, stop: StopSignals,
               checkpoint_seconds: float) -> None:
    state = ctx.state
    state.estimator.train()
    if state.jobs_pending:                    # the jobs of the saved step were cut short by a stop
        state.jobs_pending = False
        _run_jobs(ctx, jobs, state.step, max_steps, stop)
    last_save = time.monotonic()
    while state.step < max_steps:
        state.step += 1
        step_fn()
        ctx.clock.tick()
        ctx.bar.update(1)
        _run_jobs(ctx, jobs, state.step, max_steps, stop)
        if stop.requested:
            _save_and_stop(ctx, stop)
        if checkpoint_seconds and time.monotonic() - last_save > checkpoint_seconds:
            with stop.shielded():             # by wall time: a kill -9 loses minutes, not eval_every steps
                state.save(ctx.out_dir / CHECKPOINT)
            last_save = time.monotonic()
        elif any(isinstance(j, EvaluateAndCheckpoint) and j.due(state.step, max_steps) for j in jobs):
            last_save = time.monotonic()


def run(model: SBN, estimator: Estimator, splits: Splits, settings: RunSettings, out_dir: str | Path,
        hparams: dict[str, Any] | None = None, config: dict | None = None) -> RunResult:
    """Train ``model`` with ``estimator``, log to TensorBoard in ``out_dir``, then test the best model
    (unless ``settings.test`` is None or disabled) and write ``results.json``.

    ``config`` (the composed config as a plain dict) is recorded in the checkpoint; a resume whose config
    differs in a key that changes the trajectory is refused. The folder is locked for the whole run.
    Raises :class:`Stopped` after saving when a stop signal arrives."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = RunLock(out_dir).acquire()
    except FolderBusy as e:
        raise RunError(str(e)) from None
    try:
        with StopSignals() as stop:
            return _run_locked(model, estimator, splits, settings, out_dir, hparams, config, stop)
    finally:
        lock.release()


def _run_locked(model, estimator, splits, settings: RunSettings, out_dir: Path, hparams, config,
                stop: StopSignals) -> RunResult:
    from torch.utils.tensorboard import SummaryWriter

    tr = settings.train
    resume_from = prepare_folder(out_dir, tr)
    (out_dir / FAILED).unlink(missing_ok=True)
    done = finished_result(out_dir, tr) if resume_from is not None else None
    if done is not None:
        log.info("%s already finished at step %d; nothing to do", out_dir, done.step)
        return done

    state = TrainState.create(model, estimator, splits.train, tr.batch_size, settings.optim, settings.seed)
    state.config = trajectory_config(config) if config else {}
    if resume_from is not None:
        state.load(resume_from)
        log.info("resumed from %s at step %d", resume_from, state.step)
    step_fn = make_step(state, tr.cuda_graph)
    jobs = make_jobs(settings, splits)
    # a resume drops what the killed run logged after its checkpoint (and the pending jobs' own step)
    purge = (state.step if state.jobs_pending else state.step + 1) if state.step else None
    writer = SummaryWriter(str(out_dir), purge_step=purge)
    bar = training_progress(tr.max_steps, state.step, tr.progress, out_dir.name[:40])
    ctx = Context(state=state, step_fn=step_fn, writer=writer, out_dir=out_dir, clock=StepClock(), bar=bar)
    try:
        if state.step == 0:
            state.first_elbo = initial_elbo(model, splits.valid, settings.eval.seed)
            tb.log_layout(writer, n_layers=model.n_layers, views=logged_views(model, settings.variance),
                          iwae=settings.eval.iwae_k > 0)
            for job in jobs:
                if isinstance(job, Images):
                    job.first(ctx)
        train_loop(ctx, step_fn, jobs, tr.max_steps, stop, 60.0 * tr.checkpoint_minutes)
        bar.close()
        metrics = state.metrics
        metrics["best/valid"] = state.best
        metrics["best/step"] = state.best_step
        if settings.test is not None and settings.test.enabled:
            try:
                with stop.interruptible():
                    metrics.update(_test_best_model(ctx, splits, settings.test, tr.progress))
            except Interrupted:
                stop.chain()                  # e.g. a scheduler's requeue handler
                raise Stopped(stop.signum, state.step) from None
        with stop.shielded():
            _write_results(out_dir, {"step": state.step, "status": "finished", "metrics": metrics,
                                     "hparams": hparams or {}})
            ctx.write({k: v for k, v in metrics.items() if k.startswith("test/") and registry.lookup(k).scalar},
                      state.step)
            if hparams:
                tb.log_hparams(writer, hparams, registry.hparam_tags(metrics))
    finally:
        bar.close()
        writer.close()
    return RunResult(step=state.step, metrics=metrics, out_dir=str(out_dir))


def _test_best_model(ctx: Context, splits: Splits, cfg: TestConfig, show: bool) -> dict:
    """Load ``best.pt`` into the model (it stays there) and evaluate it on the test split."""
    best = ctx.out_dir / BEST
    if best.exists():
        ctx.state.load_best(best)
    t0 = time.perf_counter()
    out = evaluate_test(ctx.state.model, splits.test, cfg, show)
    faults.point("test", ctx.state.step)
    log.info("tested the best model in %.1f s: %s", time.perf_counter() - t0,
             ", ".join(f"{k}={v:.4f}" for k, v in out.items()))
    return out
