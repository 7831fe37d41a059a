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
from typing import Any, Callable

import torch
from torch import nn

from . import faults, tb
from . import metrics as registry
from .config import EvalConfig, OptimConfig, TestConfig, TrainConfig, VarianceConfig
from .data import Splits
from .estimators import Estimate, Estimator
from .evaluation import ReplicaModels, logged_views, replica_split_bounds, split_bounds, summarize
from .jobs import (BEST, CHECKPOINT, Context, EvaluateAndCheckpoint, GroupEvaluations, GroupProbes, Images, Job,
                   LogTraining, StepClock, VarianceProbe, evaluate, initial_elbo, partition, same_architecture,
                   same_data)
from .models import SBN
from .progress import Progress, training_progress
from .lock import FolderBusy, RunLock
from .signals import Interrupted, StopSignals
from .state import (RunError, RunRefused, TrainSampler, TrainState, config_changes, load_checkpoint, make_optimizer,
                    save_atomic, trajectory_config, write_atomic)

__all__ = ["BEST", "CHECKPOINT", "FAILED", "RESULTS", "RunError", "RunResult", "RunSettings", "Stopped", "TrainSampler",
           "TrainState", "TrainStep", "evaluate", "evaluate_test", "load_checkpoint", "make_optimizer", "run",
           "save_atomic"]

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


def evaluate_test_replicas(models: ReplicaModels, data: torch.Tensor, cfg: TestConfig,
                           show: bool = False) -> list[dict[str, float]]:
    """:func:`evaluate_test` of every replica of ``models`` in one batched computation (one dict per replica)."""
    elbo, iwae = replica_split_bounds(models, data, cfg.batch_size, cfg.limit, cfg.seed, cfg.elbo_samples,
                                      cfg.iwae_k, cfg.max_rows,
                                      progress=Progress(f"testing the best models of {models.size} runs",
                                                        enabled=show))
    return [summarize("test", elbo[r], None if iwae is None else iwae[r], cfg.iwae_k, with_se=True)
            for r in range(models.size)]


#: the files a run writes in its folder; the only ones it ever deletes (with ``train.overwrite=true``)
OWNED = (CHECKPOINT, BEST, RESULTS, FAILED)
#: ... and by pattern: TensorBoard's event files, and the temporary files of an interrupted atomic write
OWNED_PATTERNS = ("events.out.tfevents.*", *(f".{name}.*.tmp" for name in OWNED))


def owned_files(out_dir: Path) -> list[Path]:
    """The files in ``out_dir`` that a run wrote (checkpoints, results, events, temporary files)."""
    found = [out_dir / name for name in OWNED if (out_dir / name).exists()]
    return found + sorted(p for pattern in OWNED_PATTERNS for p in out_dir.glob(pattern))


def holds_run(out_dir: Path) -> bool:
    """True if ``out_dir`` holds (part of) a previous run: checkpoint, best model, results or events."""
    return any(p.name != FAILED for p in owned_files(out_dir) if not p.name.endswith(".tmp"))


def prepare_folder(out_dir: Path, cfg: TrainConfig) -> Path | None:
    """Return the checkpoint to resume from (or None); refuse to overwrite a previous run by accident.

    Only ``train.overwrite=true`` deletes anything, and only the files the run owns (:func:`owned_files`);
    other files in the folder are never touched. A resume of a folder without a checkpoint returns None:
    :func:`check_resume` decides whether that is a finished run, a fresh folder, or a refusal."""
    ckpt = out_dir / CHECKPOINT
    if cfg.overwrite:
        for p in owned_files(out_dir):
            p.unlink(missing_ok=True)
        return None
    if cfg.resume:
        return ckpt if ckpt.exists() else None
    if holds_run(out_dir):
        raise RunRefused(f"{out_dir} already holds a run{_saved_step(ckpt)}. Continue it with train.resume=true, "
                         f"discard it with train.overwrite=true, or set hydra.run.dir=<another folder>")
    return None


def _saved_step(ckpt: Path) -> str:
    """`` (saved at step N)`` for a readable checkpoint, else ``""``."""
    try:
        return f" (saved at step {int(torch.load(ckpt, map_location='cpu', weights_only=True)['step'])})"
    except Exception:  # noqa: BLE001 - only decorates a message
        return ""


def _read_results(out_dir: Path) -> dict | None:
    try:
        results = json.loads((out_dir / RESULTS).read_text())
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) else None


def finished_result(out_dir: Path, cfg: TrainConfig) -> RunResult | None:
    """The stored result of a run in ``out_dir`` that already reached ``cfg.max_steps``, else None."""
    results = _read_results(out_dir)
    if results is None or results.get("status") != "finished" or not isinstance(results.get("metrics"), dict):
        return None
    try:
        step = int(results.get("step", -1))
    except (TypeError, ValueError):
        return None
    if step != cfg.max_steps:
        return None
    return RunResult(step=step, metrics=results["metrics"], out_dir=str(out_dir))


def _hparam_changes(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for the recorded hyperparameters that fix the trajectory (results.json written
    before it held the trajectory config: everything but the run's length)."""
    return [f"{k}: {old[k]} -> {new[k]}" for k in sorted(set(old) & set(new))
            if k != "max_steps" and old[k] != new[k]]


def check_resume(out_dir: Path, cfg: TrainConfig, resume_from: Path | None, checkpoint: dict | None,
                 config: dict[str, Any], hparams: dict[str, Any]) -> RunResult | None:
    """Before a resume writes anything: compare the command's trajectory config with the run's own record
    (its ``checkpoint``'s, read from ``resume_from``, else its results.json's), finished or not, and refuse
    a change. Returns the stored result of a run that already reached ``cfg.max_steps`` (nothing to do), else
    None (train on). A run without its checkpoint that has not finished is refused: it cannot continue, and
    its files stay."""
    results = _read_results(out_dir)
    if resume_from is not None:
        recorded, what = checkpoint.get("config"), resume_from
    else:
        recorded, what = (results or {}).get("config"), out_dir / RESULTS
    if isinstance(recorded, dict) and config:
        changes = config_changes(recorded, config)
    elif results is not None and isinstance(results.get("hparams"), dict) and hparams:
        changes = _hparam_changes(results["hparams"], hparams)
    else:
        changes = []
    if changes:
        raise RunRefused(f"cannot resume {out_dir}: the config differs from the run's ({'; '.join(changes)}; "
                         f"recorded in {what}). Use the run's settings, start again with train.overwrite=true, "
                         f"or set hydra.run.dir=<another folder>")
    done = finished_result(out_dir, cfg)
    if done is not None or resume_from is not None:
        return done
    if holds_run(out_dir):
        raise RunRefused(f"cannot resume {out_dir}: it has no {CHECKPOINT} (deleted?), and its run has not "
                         f"finished at train.max_steps={cfg.max_steps}"
                         + (f" (results.json: step {results.get('step')})" if results else "")
                         + ". Nothing was changed there. Restore the checkpoint, start again with "
                           "train.overwrite=true, or set hydra.run.dir=<another folder>")
    log.warning("train.resume=true but %s holds no run: starting from step 0", out_dir)
    return None


def _write_results(out_dir: Path, results: dict) -> None:
    """results.json, atomically (a failed write leaves no file behind and says which path and why)."""
    text = json.dumps(results, indent=2, default=str)
    write_atomic(out_dir / RESULTS, lambda f: f.write(text.encode()), ("results", int(results.get("step", -1))))


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
    before = state.running()
    try:
        with stop.interruptible():
            for job in due:
                job(ctx, step)
    except Interrupted:
        state.restore_running(before)
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


@dataclass
class RunSpec:
    """One run of a group: what :func:`run` takes."""
    model: SBN
    estimator: Estimator
    splits: Splits
    settings: RunSettings
    out_dir: Path
    hparams: dict[str, Any] | None = None
    config: dict | None = None
    on_start: Callable[[], None] | None = None    # called once the folder is checked and is this run's


def run(model: SBN, estimator: Estimator, splits: Splits, settings: RunSettings, out_dir: str | Path,
        hparams: dict[str, Any] | None = None, config: dict | None = None,
        on_start: Callable[[], None] | None = None) -> RunResult:
    """Train ``model`` with ``estimator``, log to TensorBoard in ``out_dir``, then test the best model
    (unless ``settings.test`` is None or disabled) and write ``results.json``.

    ``config`` (the composed config as a plain dict) is recorded in the checkpoint; a resume whose config
    differs in a key that changes the trajectory is refused (:func:`check_resume`), finished or not. The
    folder is locked for the whole run; ``on_start`` is called once the folder is checked and is this run's
    (a refused command never reaches it).
    Raises :class:`Stopped` after saving when a stop signal arrives."""
    result = run_group([RunSpec(model, estimator, splits, settings, Path(out_dir), hparams, config, on_start)])[0]
    if isinstance(result, BaseException):
        raise result
    return result


class RunSession:
    """One run's folder, lock, state, jobs, TensorBoard writer and progress bar: everything :func:`run` does
    around the steps, in phases, so that a replica group can drive R of them with one step."""

    def __init__(self, spec: RunSpec):
        self.spec, self.out_dir = spec, Path(spec.out_dir)
        self.lock: RunLock | None = None
        self.ctx: Context | None = None
        self.writer = self.bar = None
        self.jobs: list[Job] = []

    @property
    def state(self) -> TrainState:
        return self.ctx.state

    def open(self) -> RunResult | None:
        """Lock the folder and load or create the state; the stored result of a finished run, else None."""
        from torch.utils.tensorboard import SummaryWriter

        spec, tr, out_dir = self.spec, self.spec.settings.train, self.out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.lock = RunLock(out_dir).acquire()
        except FolderBusy as e:
            raise RunRefused(str(e)) from None
        trajectory = trajectory_config(spec.config) if spec.config else {}
        resume_from = prepare_folder(out_dir, tr)
        # read once: its config is compared here, its state loaded below
        checkpoint = load_checkpoint(resume_from, torch.device("cpu")) if resume_from is not None else None
        done = check_resume(out_dir, tr, resume_from, checkpoint, trajectory, spec.hparams or {}) \
            if tr.resume else None
        if done is not None:                  # nothing to do, and nothing written: the record stays the run's
            log.info("%s already finished at step %d; nothing to do", out_dir, done.step)
            return done
        if spec.on_start is not None:
            spec.on_start()                   # the folder is this command's now: its record may be written
        (out_dir / FAILED).unlink(missing_ok=True)
        state = TrainState.create(spec.model, spec.estimator, spec.splits.train, tr.batch_size,
                                  spec.settings.optim, spec.settings.seed)
        state.config = trajectory
        if resume_from is not None:
            state.load(resume_from, checkpoint)
            log.info("resumed from %s at step %d", resume_from, state.step)
        self.jobs = make_jobs(spec.settings, spec.splits)
        # a resume drops what the killed run logged after its checkpoint (and the pending jobs' own step)
        purge = (state.step if state.jobs_pending else state.step + 1) if state.step else None
        self.writer = SummaryWriter(str(out_dir), purge_step=purge)
        self.bar = training_progress(tr.max_steps, state.step, tr.progress, out_dir.name[:40])
        self.ctx = Context(state=state, step_fn=None, writer=self.writer, out_dir=out_dir, clock=StepClock(),
                           bar=self.bar)
        return None

    def start(self, step_fn) -> None:
        """The step the jobs read (running ELBO, metrics); at step 0 the first measurements and charts."""
        ctx, spec, state = self.ctx, self.spec, self.state
        ctx.step_fn = step_fn
        if state.step == 0:
            state.first_elbo = initial_elbo(state.model, spec.splits.valid, spec.settings.eval.seed)
            tb.log_layout(self.writer, n_layers=state.model.n_layers,
                          views=logged_views(state.model, spec.settings.variance, spec.settings.train.max_steps),
                          iwae=spec.settings.eval.iwae_k > 0)
            for job in self.jobs:
                if isinstance(job, Images):
                    job.first(ctx)
        state.estimator.train()

    def finish(self, stop: StopSignals, tests: "GroupTests | None" = None) -> RunResult:
        """The final test of the best model and results.json; ``tests``: a replica group's final tests, batched
        over the runs that finish together."""
        ctx, state, settings = self.ctx, self.state, self.spec.settings
        self.bar.close()
        metrics = state.metrics
        metrics["best/valid"] = state.best
        metrics["best/step"] = state.best_step
        if settings.test is not None and settings.test.enabled:
            try:
                with stop.interruptible():
                    metrics.update(_test_best_model(ctx, self.spec.splits, settings.test, settings.train.progress,
                                                    tests))
            except Interrupted:
                stop.chain()                  # e.g. a scheduler's requeue handler
                raise Stopped(stop.signum, state.step) from None
        with stop.shielded():
            _write_results(self.out_dir, {"step": state.step, "status": "finished", "metrics": metrics,
                                          "hparams": self.spec.hparams or {}, "config": state.config})
            ctx.write({k: v for k, v in metrics.items() if k.startswith("test/")}, state.step)
            if self.spec.hparams:
                tb.log_hparams(self.writer, self.spec.hparams, registry.hparam_tags(metrics))
        return RunResult(step=state.step, metrics=metrics, out_dir=str(self.out_dir))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def run_group(specs: list[RunSpec]) -> list[RunResult | BaseException]:
    """Train the runs of ``specs`` together: one run is :func:`run`'s ordinary loop; two or more share one
    :class:`~sbn_train.replicas.ReplicaGroup` step (they must share the model, estimator, data, batch size
    and optimizer kind; seeds, learning rates and weight decays may differ). Each run keeps its own folder,
    jobs, checkpoints and results.json. A run that fails (divergence, a bad folder) gets its error as its
    result, and the others go on; a stop signal saves every run and raises :class:`Stopped`."""
    sessions = [RunSession(spec) for spec in specs]
    results: list[RunResult | BaseException | None] = [None] * len(specs)
    try:
        with StopSignals() as stop:
            live = []
            for i, session in enumerate(sessions):
                try:
                    done = session.open()
                except RunError as e:
                    results[i] = e
                    session.close()
                    if len(specs) > 1 and not isinstance(e, RunRefused):   # (the CLI records a lone run's)
                        _write_failed(session.out_dir, e)
                    continue
                if done is not None:
                    results[i] = done
                    session.close()
                else:
                    live.append(i)
            if len(specs) == 1 and live:
                session = sessions[0]
                session.start(make_step(session.state, session.spec.settings.train.cuda_graph))
                tr = session.spec.settings.train
                train_loop(session.ctx, session.ctx.step_fn, session.jobs, tr.max_steps, stop,
                           60.0 * tr.checkpoint_minutes)
                results[0] = session.finish(stop)
            elif live:
                _group_loop([sessions[i] for i in live], stop, results, live)
    finally:
        for session in sessions:
            session.close()
    return results


class _ReplicaStep:
    """What a replica's jobs read from "the step": its running ELBO and its estimator metrics of the last
    group step. ``holder[0]`` is the current group (rebuilt when a run leaves it)."""

    take_running_elbo = TrainStep.take_running_elbo

    def __init__(self, holder: list, state: TrainState):
        self.holder, self.state = holder, state

    @property
    def last_metrics(self) -> dict:
        group = self.holder[0]
        return group.replica_metrics(group.states.index(self.state)) if group is not None else {}


def _write_failed(out_dir: Path, error: BaseException) -> None:
    text = json.dumps({"error": f"{type(error).__name__}: {error}"}, indent=2)
    try:
        write_atomic(out_dir / FAILED, lambda f: f.write(text.encode()))
    except RunError as e:
        log.warning("could not record the failure of %s: %s", out_dir, e)


def _group_loop(live: list[RunSession], stop: StopSignals, results: list, index: list[int]) -> None:
    """The replica group's loop: one group step, then each run's jobs; runs leave the group when they
    finish or fail (the group is rebuilt from the others), and a stop signal saves every run."""
    from .replicas import GraphedGroup, GroupError, ReplicaGroup, check_fits

    slot = {id(s): i for s, i in zip(live, index)}
    try:
        check_fits([s.state for s in live])
    except GroupError as e:              # every run of the group is listed as failed; other groups go on
        for session in live:
            results[slot[id(session)]] = RunError(str(e))
            _write_failed(session.out_dir, RunError(str(e)))
            session.close()
        live.clear()
        return
    holder: list = [None]
    evaluations, probes = GroupEvaluations(), GroupProbes(holder)
    for s in live:
        s.start(_ReplicaStep(holder, s.state))
        for job in s.jobs:
            if isinstance(job, (EvaluateAndCheckpoint, VarianceProbe)):
                job.batch = evaluations if isinstance(job, EvaluateAndCheckpoint) else probes

    def leave(session: RunSession, outcome) -> None:
        results[slot[id(session)]] = outcome
        if isinstance(outcome, BaseException):
            log.error("%s: %s", session.out_dir, outcome)
            _write_failed(session.out_dir, outcome)
        session.close()
        live.remove(session)

    def due(session: RunSession, step: int) -> list[Job]:
        return [j for j in session.jobs if j.due(step, session.spec.settings.train.max_steps)]

    def save_all() -> None:
        """Every run's checkpoint; a run that cannot be saved (non-finite parameters) leaves the group."""
        with stop.shielded():
            for session in list(live):
                try:
                    session.state.save(session.out_dir / CHECKPOINT)
                    session.writer.flush()
                except RunError as e:
                    leave(session, e)

    def save_all_and_stop() -> None:
        save_all()
        stop.chain()
        raise Stopped(stop.signum, max((session.state.step for session in live), default=0))

    def run_jobs(sessions: list[RunSession]) -> None:
        evaluations.start([(job, session.ctx) for session in sessions for job in due(session, session.state.step)
                           if isinstance(job, EvaluateAndCheckpoint)])
        probes.start([(job, session.ctx) for session in sessions for job in due(session, session.state.step)
                      if isinstance(job, VarianceProbe)])
        for k, session in enumerate(list(sessions)):
            state = session.state
            jobs = due(session, state.step)
            if not jobs:
                continue
            before = state.running()
            try:
                with stop.interruptible():
                    for job in jobs:
                        job(session.ctx, state.step)
            except Interrupted:
                state.restore_running(before)
                state.jobs_pending = True
                for later in sessions[k + 1:]:
                    if later in live and due(later, later.state.step):
                        later.state.jobs_pending = True
                save_all_and_stop()
            except RunError as e:             # e.g. this run diverged: it stops alone
                leave(session, e)

    group = step_group = None

    def current_group():
        """The group of the live runs (built again when one has left), and its step (graphed on CUDA)."""
        nonlocal group, step_group
        if group is None or group.states != [s.state for s in live]:
            group = holder[0] = ReplicaGroup([s.state for s in live])
            graph = live[0].spec.settings.train.cuda_graph
            step_group = GraphedGroup(group) if group.device.type == "cuda" and graph is not False else group.step
        return group, step_group

    pending = [s for s in live if s.state.jobs_pending]
    for s in pending:
        s.state.jobs_pending = False
    if pending:
        current_group()      # a resume's pending probes are measured batched, as the uninterrupted group measured them
    run_jobs(pending)
    last_save = time.monotonic()
    while live:
        finishing = [s for s in live if s.state.step >= s.spec.settings.train.max_steps]
        tests = GroupTests(finishing)
        for session in finishing:
            try:
                leave(session, session.finish(stop, tests))
            except RunError as e:
                leave(session, e)
            except Stopped:                   # during its final test: the others save, then all stop
                session.close()
                live.remove(session)
                save_all_and_stop()
            group = None
        if not live:
            break
        _, step_group = current_group()
        faults.point("step", live[0].state.step + 1)
        step_group()
        for session in live:
            session.state.step += 1
            session.ctx.clock.tick()
            session.bar.update(1)
        before = list(live)
        run_jobs(list(live))
        if live != before:
            group = None
        if stop.requested:
            save_all_and_stop()
        seconds = min(60.0 * s.spec.settings.train.checkpoint_minutes for s in live) if live else 0
        if seconds and time.monotonic() - last_save > seconds:
            before = list(live)
            save_all()                        # by wall time: a kill -9 loses minutes, not eval_every steps
            if live != before:
                group = None
            last_save = time.monotonic()


def _test_best_model(ctx: Context, splits: Splits, cfg: TestConfig, show: bool,
                     tests: "GroupTests | None" = None) -> dict:
    """Load ``best.pt`` into the model (it stays there) and evaluate it on the test split (``tests``: with the
    other runs of a replica group that finish at the same time)."""
    best = ctx.out_dir / BEST
    if best.exists():
        ctx.state.load_best(best)
    t0 = time.perf_counter()
    out = tests.result(ctx) if tests is not None else None
    if out is None:
        out = evaluate_test(ctx.state.model, splits.test, cfg, show)
    faults.point("test", ctx.state.step)
    log.info("tested the best model in %.1f s: %s", time.perf_counter() - t0,
             ", ".join(f"{k}={v:.4f}" for k, v in out.items()))
    return out


class GroupTests:
    """The final tests of the runs of a replica group that finish at the same time, batched over the runs.

    The first run to test its best model tests, at once, every other finishing run with the same test
    settings, test data and model architecture (one :class:`~sbn_train.evaluation.ReplicaModels` computation
    per batch of rows): their best models are read from their ``best.pt`` (else their current weights) into
    the stacks, not into their modules, which load their own when their turn comes (a stop in between leaves
    every other run as it was). A run alone in its class is tested as a standalone run is (:meth:`result`
    returns None)."""

    def __init__(self, sessions: list):
        self.sessions = [s for s in sessions if s.spec.settings.test is not None and s.spec.settings.test.enabled]
        self.ready: dict[int, dict[str, float]] = {}
        self.tested: set[int] = set()

    @staticmethod
    def _together(a, b) -> bool:
        ta, tb_ = a.spec.settings.test, b.spec.settings.test
        return ta == tb_ and same_data(a.spec.splits.test, b.spec.splits.test) and \
            same_architecture(a.state.model, b.state.model)

    def result(self, ctx: Context) -> dict[str, float] | None:
        me = next((s for s in self.sessions if s.ctx is ctx), None)
        if me is None:
            return None
        if id(me) not in self.ready:
            mine = next(c for c in partition(self.sessions, self._together) if me in c)
            mine = [s for s in mine if s is me or (id(s) not in self.ready and id(s) not in self.tested)]
            if len(mine) == 1:
                self.tested.add(id(me))
                return None
            states = []
            for s in mine:
                best = s.out_dir / BEST
                states.append(s.state.model.state_dict() if s is me or not best.exists()
                              else load_checkpoint(best, s.state.device)["model"])
            cfg = me.spec.settings.test
            models = ReplicaModels(me.state.model, states)
            for s, out in zip(mine, evaluate_test_replicas(models, me.spec.splits.test, cfg,
                                                           me.spec.settings.train.progress)):
                self.ready[id(s)] = out
        self.tested.add(id(me))
        return self.ready.pop(id(me))
