"""Everything a run needs to continue exactly where it stopped, and the one place that saves and loads it.

:class:`TrainState` holds the model, the estimator, both optimizers, the training generator (minibatches
and the estimator's noise), the minibatch sampler, the step and the best validation bound so far. Its
``save`` writes what its ``load`` reads (``CHECKPOINT_FORMAT`` names the layout), atomically, and every
load uses ``torch.load(..., weights_only=True)``: a checkpoint holds tensors, numbers and strings only, so
nothing in a checkpoint file can run code.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import OptimConfig
from .data import binarize
from .estimators import Estimator
from .models import SBN

CHECKPOINT_FORMAT = 1


class RunError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


def make_optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def save_atomic(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: a kill never leaves a partial file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path, device: torch.device) -> dict:
    """A checkpoint's contents; only tensors, containers, numbers and strings are admitted (no code runs)."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated, not a checkpoint, or holding objects other than plain data
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"cannot read checkpoint {path} ({first[:200]}). Delete it, or start again with "
                       f"train.overwrite=true") from None


class TrainSampler:
    """Epoch-wise shuffled minibatches with dynamic binarization; its position is checkpointed."""

    def __init__(self, data: torch.Tensor, batch_size: int, generator: torch.Generator):
        if batch_size > data.shape[0]:
            raise RunError(f"train.batch_size={batch_size} exceeds the {data.shape[0]} training examples")
        self.data, self.batch_size, self.generator = data, batch_size, generator
        self.perm: torch.Tensor | None = None
        self.pos = 0

    def next(self) -> torch.Tensor:
        n = self.data.shape[0]
        if self.perm is None or self.pos + self.batch_size > n:
            self.perm = torch.randperm(n, generator=self.generator, device=self.generator.device)
            self.pos = 0
        idx = self.perm[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return binarize(self.data[idx.to(self.data.device)], self.generator)

    def state_dict(self) -> dict:
        return {"perm": None if self.perm is None else self.perm.cpu(), "pos": self.pos}

    def load_state_dict(self, s: dict) -> None:
        self.perm = None if s["perm"] is None else s["perm"].to(self.generator.device)
        self.pos = int(s["pos"])


@dataclass
class TrainState:
    model: SBN
    estimator: Estimator
    model_opt: torch.optim.Optimizer
    est_opt: torch.optim.Optimizer | None
    generator: torch.Generator          # the training stream: minibatches + the estimator's noise
    sampler: TrainSampler
    step: int = 0
    best: float = -math.inf             # best validation bound so far (the model in best.pt)
    best_step: int = 0
    est_params: list[nn.Parameter] = field(default_factory=list)

    @classmethod
    def create(cls, model: SBN, estimator: Estimator, train_data: torch.Tensor, batch_size: int,
               optim_cfg: OptimConfig, seed: int) -> "TrainState":
        device = model.prior_logits.device
        est_params = [p for p in estimator.parameters() if p.requires_grad]
        gen = torch.Generator(device=device).manual_seed(seed)
        return cls(model=model, estimator=estimator,
                   model_opt=make_optimizer(list(model.parameters()), optim_cfg),
                   est_opt=make_optimizer(est_params, optim_cfg) if est_params else None,
                   generator=gen, sampler=TrainSampler(train_data, batch_size, gen), est_params=est_params)

    @property
    def device(self) -> torch.device:
        return self.model.prior_logits.device

    def state_dict(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "model": self.model.state_dict(),
                "estimator": self.estimator.state_dict(), "model_opt": self.model_opt.state_dict(),
                "est_opt": self.est_opt.state_dict() if self.est_opt is not None else None,
                "generator": self.generator.get_state(), "sampler": self.sampler.state_dict(),
                "step": self.step, "best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.estimator.load_state_dict(state["estimator"])
        self.model_opt.load_state_dict(state["model_opt"])
        if self.est_opt is not None:
            self.est_opt.load_state_dict(state["est_opt"])
        self.generator.set_state(state["generator"].cpu())
        self.sampler.load_state_dict(state["sampler"])
        self.step, self.best = int(state["step"]), float(state["best"])
        self.best_step = int(state.get("best_step", 0))

    def save(self, path: Path) -> None:
        save_atomic(self.state_dict(), path)

    def load(self, path: Path) -> None:
        state = load_checkpoint(path, self.device)
        try:
            self.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise RunError(f"checkpoint {path} does not fit this run ({str(e).splitlines()[0][:200]}). "
                           f"Start again with train.overwrite=true") from None

    def save_best(self, path: Path, metrics: dict[str, float]) -> None:
        """``best.pt``: the model weights alone, with the step and the validation metrics that chose them."""
        save_atomic({"format": CHECKPOINT_FORMAT, "model": self.model.state_dict(), "step": self.step,
                     "metrics": dict(metrics)}, path)

    def load_best(self, path: Path) -> None:
        self.model.load_state_dict(load_checkpoint(path, self.device)["model"])
