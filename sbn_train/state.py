"""Everything a run needs to continue exactly where it stopped, and the one place that saves and loads it.

:class:`TrainState` holds the model, the estimator, both optimizers, the training generator (minibatches
and the estimator's noise), the minibatch sampler, the step and the best validation bound so far. Its
``save`` writes what its ``load`` reads (``CHECKPOINT_FORMAT`` names the layout), atomically, and every
load uses ``torch.load(..., weights_only=True)``: a checkpoint holds tensors, numbers and strings only, so
nothing in a checkpoint file can run code.
"""
from __future__ import annotations

import errno
import io
import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch
from torch import nn

from . import faults
from .config import OptimConfig
from .data.cache import create_temp_beside
from .data import TrainSampler
from .estimators import Estimator
from .metrics import current_tag
from .models import SBN

CHECKPOINT_FORMAT = 1


class RunError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


class CheckpointUnreadable(RunError):
    """A checkpoint file that cannot be read; ``why`` says what is wrong with it."""

    def __init__(self, path: Path, why: str):
        self.path, self.why = path, why
        super().__init__(f"cannot read checkpoint {path} ({why}). Delete it (or restore it from a copy), or "
                         f"start again with train.overwrite=true")


class RunRefused(RunError):
    """A command refused before the run folder became its own (the folder is busy, holds another run, or
    holds a run whose config differs): nothing is written into the folder, not even failed.json."""


def make_optimizer(params: list[nn.Parameter], cfg: OptimConfig, capturable: bool = False) -> torch.optim.Optimizer:
    """``capturable``: the optimizer's step counters live on the device, so its step can be captured in a
    CUDA graph (used for every CUDA run, graph or not, so that both follow the same arithmetic)."""
    extra = {"capturable": True} if capturable else {}
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                   **extra)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                weight_decay=cfg.weight_decay, **extra)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def write_atomic(path: Path, write: Callable[[BinaryIO], None], fault: tuple[str, int] | None = None) -> None:
    """``write(f)`` to a new, uniquely named temporary file in the same folder (created with ``O_EXCL``, so a
    symbolic link planted there is never followed), fsync it, rename it over ``path``, fsync the folder: a
    kill never leaves a partial file, and a failed write (disk full, unwritable folder) leaves the previous
    file, no temporary one, and a one-line :class:`RunError` naming the path. ``fault``: the
    fault-injection point between the write and the rename."""
    tmp: str | None = None
    try:
        fd, tmp = create_temp_beside(str(path), ".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if fault is not None:
            faults.point(*fault)
        os.replace(tmp, path)
        tmp = None
        _fsync_folder(path.parent)
    except OSError as e:
        raise RunError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def compact(obj: Any) -> Any:
    """``obj`` with every tensor that is a view into a larger storage (a replica's row of a group's stacks)
    copied out: ``torch.save`` writes a tensor's whole storage, so a replica's checkpoint would otherwise
    hold every replica's tensors."""
    if isinstance(obj, dict):
        return {k: compact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(compact(v) for v in obj)
    if torch.is_tensor(obj) and obj.untyped_storage().nbytes() > obj.numel() * obj.element_size():
        return obj.clone()
    return obj


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` through :func:`write_atomic` (views copied out: :func:`compact`). The bytes are built in
    memory first, so a failed write is the operating system's own error (e.g. "No space left on device"), not
    the archive writer's."""
    step = int(obj.get("step", -1)) if isinstance(obj, dict) else -1
    buffer = io.BytesIO()
    torch.save(compact(obj), buffer)
    write_atomic(path, lambda f: f.write(buffer.getbuffer()), ("checkpoint", step))


#: config keys that may differ between a run and its resumption (they do not change the trajectory of the
#: parameters): the length of the run, what is measured and logged, and where data and outputs live
MAY_CHANGE = ("train.max_steps", "train.eval_every", "train.log_every", "train.resume", "train.overwrite",
              "train.progress", "train.checkpoint_minutes", "train.cuda_graph", "train.divergence_nats", "train.replicas",
              "eval.", "test.", "variance.", "dataset.data_dir", "dataset.download_timeout", "hydra.", "threads")


def trajectory_config(config: dict) -> dict[str, Any]:
    """The flattened (dotted keys) part of a composed config that fixes the trajectory of a run."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            key = prefix[:-1]
            if not any(key == m or (m.endswith(".") and key.startswith(m)) for m in MAY_CHANGE):
                flat[key] = list(node) if isinstance(node, (list, tuple)) else node

    walk(config, "")
    return flat


#: trajectory keys added after runs were recorded without them, with the value that computes what those runs
#: computed: a record without the key is the same config as one with that value (binary latents, the
#: straight-through estimator's categorical temperature)
ADDED_KEYS = {"model.family": "bernoulli", "model.classes": 2, "model.hidden": [], "model.activation": "tanh",
              "model.learn_prior": True, "estimator.temperature": 1.0}


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every key whose value differs (or exists on one side only, unless it is one of
    :data:`ADDED_KEYS` at its default)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, ADDED_KEYS.get(key, "<unset>")), new.get(key, "<unset>")
        if a != b:
            out.append(f"{key}: {a} -> {b}")
    return out


def load_checkpoint(path: Path, device: torch.device) -> dict:
    """A checkpoint's contents; only tensors, containers, numbers and strings are admitted (no code runs)."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:      # weights_only refused a global: the file would build other objects
        why = "refused: the file holds objects other than tensors, numbers and strings"
    except FileNotFoundError:
        why = "no such file"
    except IsADirectoryError:
        why = "it is a folder"
    except PermissionError:
        why = "permission denied"
    except OSError as e:                # e.g. EINVAL: a seek past the end of a cut archive
        why = ("the file is cut short or is not a checkpoint" if e.errno == errno.EINVAL else
               f"{e.strerror or e}")
    except Exception as e:  # noqa: BLE001 - truncated or not a checkpoint: torch's archive/zip errors vary
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        why = f"the file is cut short or is not a checkpoint: {first[:160]}"
    raise CheckpointUnreadable(path, why) from None


def state_dict_mismatch(e: BaseException) -> str:
    """The first specific line of a ``load_state_dict`` error (``Missing key(s) ...``, ``size mismatch for
    ...``) instead of its heading ``Error(s) in loading state_dict for SBN:``."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    detail = [line for line in lines if not line.startswith("Error(s) in loading")]
    return ((detail or lines or [type(e).__name__])[0])[:200].rstrip(".")


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
    elbo_sum: torch.Tensor | None = None    # running training ELBO since the last log (on the device) ...
    elbo_n: int = 0                         # ... over this many steps
    metrics: dict[str, float] = field(default_factory=dict)   # the last value of every metric
    config: dict[str, Any] = field(default_factory=dict)      # trajectory_config of the run
    jobs_pending: bool = False              # saved by a stop during the jobs of ``step``: run them again
    first_elbo: float | None = None         # the model's validation ELBO before training (divergence anchor)

    def __post_init__(self):
        if self.elbo_sum is None:
            self.elbo_sum = torch.zeros((), device=self.device)

    @classmethod
    def create(cls, model: SBN, estimator: Estimator, train_data: torch.Tensor, batch_size: int,
               optim_cfg: OptimConfig, seed: int) -> "TrainState":
        device = model.prior_logits.device
        est_params = [p for p in estimator.parameters() if p.requires_grad]
        gen = torch.Generator(device=device).manual_seed(seed)
        cuda = device.type == "cuda"
        return cls(model=model, estimator=estimator,
                   model_opt=make_optimizer(list(model.parameters()), optim_cfg, capturable=cuda),
                   est_opt=make_optimizer(est_params, optim_cfg, capturable=cuda) if est_params else None,
                   generator=gen, sampler=TrainSampler(train_data, batch_size, gen), est_params=est_params)

    @property
    def device(self) -> torch.device:
        return self.model.prior_logits.device

    def state_dict(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "model": self.model.state_dict(),
                "estimator": self.estimator.state_dict(), "model_opt": self.model_opt.state_dict(),
                "est_opt": self.est_opt.state_dict() if self.est_opt is not None else None,
                "generator": self.generator.get_state(), "sampler": self.sampler.state_dict(),
                "step": self.step, "best": self.best, "best_step": self.best_step,
                "elbo_sum": self.elbo_sum, "elbo_n": self.elbo_n, "metrics": dict(self.metrics),
                "config": dict(self.config), "jobs_pending": self.jobs_pending, "first_elbo": self.first_elbo}

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
        if "elbo_sum" in state:
            self.elbo_sum = state["elbo_sum"].to(self.device)
            self.elbo_n = int(state["elbo_n"])
        self.metrics = {current_tag(k): v for k, v in state.get("metrics", {}).items()}   # an older run's tags
        self.jobs_pending = bool(state.get("jobs_pending", False))
        self.first_elbo = state.get("first_elbo")

    def running(self) -> tuple:
        """What the scheduled jobs change (running ELBO, best model, last metrics), taken before they run, so
        that a stop during them puts it back (:meth:`restore_running`) and a resume runs them again."""
        return self.elbo_sum.clone(), self.elbo_n, self.best, self.best_step, dict(self.metrics)

    def restore_running(self, saved: tuple) -> None:
        self.elbo_sum.copy_(saved[0])         # in place: a captured graph or a replica group writes there
        self.elbo_n, self.best, self.best_step, self.metrics = saved[1], saved[2], saved[3], dict(saved[4])

    def finite(self) -> bool:
        """True when every parameter (model and estimator) and optimizer statistic is finite (a sync)."""
        tensors = [p for p in self.model.parameters()] + self.est_params
        for opt in (self.model_opt, self.est_opt):
            if opt is not None:
                tensors += [v for st in opt.state.values() for v in st.values()
                            if torch.is_tensor(v) and v.is_floating_point()]
        return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True

    def save(self, path: Path) -> None:
        """The whole state, atomically; refused (RunError) when a parameter is not finite, so the last good
        checkpoint stays."""
        if not self.finite():
            raise RunError(f"training diverged by step {self.step}: non-finite parameters (not checkpointed; "
                           f"the last good checkpoint is kept); lower optim.lr")
        save_atomic(self.state_dict(), path)

    def load(self, path: Path, state: dict | None = None) -> None:
        """The checkpoint at ``path`` (or its contents ``state``, already read) into this state. Whether its
        config matches is the caller's check, made before anything is written (train.check_resume)."""
        if state is None:
            state = load_checkpoint(path, self.device)
        try:
            self.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise RunError(f"checkpoint {path} does not fit this run: it was written for another model or "
                           f"estimator ({state_dict_mismatch(e)}). Resume with the run's settings, or start "
                           f"again with train.overwrite=true") from None

    def save_best(self, path: Path, metrics: dict[str, float]) -> None:
        """``best.pt``: the model weights alone, with the step and the validation metrics that chose them."""
        save_atomic({"format": CHECKPOINT_FORMAT, "model": self.model.state_dict(), "step": self.step,
                     "metrics": dict(metrics)}, path)

    def load_best(self, path: Path) -> None:
        self.model.load_state_dict(load_checkpoint(path, self.device)["model"])
