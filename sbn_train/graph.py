"""The training step as one CUDA graph: minibatch sampling from the training split held on the device, the
estimator, backward and both optimizers are captured once and replayed every step, so a step costs one
graph launch instead of hundreds of kernel launches and host round trips.

What stays outside the graph (eager, between replays): the start of a new epoch (a fresh permutation of
the training rows, drawn from the same generator as in eager mode) and the host's own counters. The random
stream is the run's generator, registered with the graph, so its state is saved and restored by checkpoints
as in eager mode. Logging, evaluation, variance probes and checkpoints run eagerly at their intervals.

Requirements, checked before capture (otherwise the step runs eagerly with one warning line saying why):
a CUDA device, an estimator without host reads inside its forward (every config passes
``tests/test_host_sync.py``; one that sets ``capturable = False`` runs eagerly), estimator metrics held as tensors, and optimizers built with
``capturable=True`` (:meth:`TrainState.create` does so on CUDA).
"""
from __future__ import annotations

import logging

import torch

from .data import binarize

log = logging.getLogger(__name__)

#: eager steps before capture (lazy initialization: optimizer state, cuBLAS workspaces, autograd buffers);
#: they are ordinary training steps of the run
WARMUP_STEPS = 3


def graph_unsupported_reason(state) -> str | None:
    """Why the step of ``state`` cannot be captured, or None."""
    if state.device.type != "cuda":
        return f"the run is on {state.device}, not a CUDA device"
    est = state.estimator
    if not getattr(est, "capturable", True):
        return f"{type(est).__name__} is not capturable: {getattr(est, 'not_capturable_reason', 'host reads')}"
    for opt in (state.model_opt, state.est_opt):
        if opt is not None and not all(g.get("capturable", False) for g in opt.param_groups):
            return f"{type(opt).__name__} was built without capturable=True"
    return None


class _DeviceBatches:
    """The TrainSampler's minibatches with its permutation and position held in static device tensors, so
    a replay reads the next rows without the host; new epochs are started between replays."""

    def __init__(self, sampler):
        self.sampler = sampler
        data = sampler.data
        n, b = data.shape[0], sampler.batch_size
        self.n, self.b = n, b
        self.perm = torch.empty(n, dtype=torch.long, device=data.device)
        self.pos = torch.zeros((), dtype=torch.long, device=data.device)
        self.offsets = torch.arange(b, device=data.device)
        if sampler.perm is not None:
            self.perm.copy_(sampler.perm)
            self.pos.fill_(sampler.pos)
            sampler.perm = self.perm

    def before_step(self) -> None:
        """Eager: a new epoch when the next batch would run past the end (as TrainSampler.next does)."""
        s = self.sampler
        if s.perm is None or s.pos + self.b > self.n:
            self.perm.copy_(torch.randperm(self.n, generator=s.generator, device=self.perm.device))
            self.pos.zero_()
            s.perm, s.pos = self.perm, 0

    def batch(self) -> torch.Tensor:
        """Captured: the next rows, binarized."""
        idx = self.perm.index_select(0, self.pos + self.offsets)
        self.pos += self.b
        return binarize(self.sampler.data.index_select(0, idx), self.sampler.generator)

    def after_step(self) -> None:
        self.sampler.pos += self.b


class GraphStep:
    """Replaces ``TrainStep.__call__``: ``WARMUP_STEPS`` eager steps, then capture, then replays. If capture
    fails, one warning line says why and the run goes on eagerly."""

    def __init__(self, step):
        self.step = step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.batches: _DeviceBatches | None = None
        self.metrics: dict = {}
        self.warm = 0
        self.failed = False

    # the loop calls these two through the TrainStep interface
    def take_running_elbo(self) -> float:
        return self.step.take_running_elbo()

    @property
    def last_metrics(self) -> dict:
        return self.step.last_metrics

    def __call__(self) -> None:
        if self.failed or self.warm < WARMUP_STEPS:
            self._eager()
            return
        if self.graph is None:
            self.batches = _DeviceBatches(self.step.state.sampler)
            self.batches.before_step()
            if not self._capture():
                self.failed = True
                self._eager_after_failed_capture()
                return
        else:
            self.batches.before_step()
        self.graph.replay()
        self.batches.after_step()
        self.step.state.elbo_n += 1
        self.step.last_metrics = self.metrics

    def _eager(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step()
        torch.cuda.current_stream().wait_stream(side)
        self.warm += 1

    def _eager_after_failed_capture(self) -> None:
        # the permutation state lives in the static buffers now; the eager sampler goes on from there
        self.step()

    def _capture(self) -> bool:
        step, state = self.step, self.step.state
        graph = torch.cuda.CUDAGraph()
        try:
            graph.register_generator_state(state.generator)
            state.model_opt.zero_grad(set_to_none=True)
            with torch.cuda.graph(graph):
                x = self.batches.batch().to(step.dtype)
                est = step.estimate(x)
                step.backward(est)
                step.apply(est)
                step.record_device(est)
            if not all(torch.is_tensor(v) for v in est.metrics.values()):
                raise RuntimeError("the estimator reports metrics as Python numbers")
        except Exception as e:  # noqa: BLE001 - any capture failure falls back to the eager step
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            log.warning("train.cuda_graph: capture failed (%s); the step runs eagerly", first[:200])
            torch.cuda.synchronize()
            return False
        self.graph, self.metrics = graph, dict(est.metrics)
        return True
