"""The training loop: step, evaluate, measure gradient variance, checkpoint, log.

Metric names (TensorBoard tags) are an API:
    train/elbo                   mean single-sample ELBO of the training batches since the last log
    valid/elbo, valid/iwae{K}    validation ELBO and K-sample importance-weighted bound (fixed-seed binarization)
    grad_var/inference           mean over inference-net elements of the unbiased gradient variance
    grad_var/layer{l}            the same over inference layer l's parameters
    grad_var/generative          the same over generative-net parameters
    perf/step_time_ms, perf/steps_per_s
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import EvalConfig, OptimConfig, TrainConfig, VarianceConfig
from .data import Splits, binarize, eval_batches
from .diagnostics import gradient_variance
from .estimators import Estimator
from .models import SBN

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
RESULTS = "results.json"


class RunError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


def make_optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


class TrainSampler:
    """Epoch-wise shuffled minibatches with dynamic binarization; its position is checkpointed."""

    def __init__(self, data: Tensor, batch_size: int, generator: torch.Generator):
        if batch_size > data.shape[0]:
            raise RunError(f"train.batch_size={batch_size} exceeds the {data.shape[0]} training examples")
        self.data, self.batch_size, self.generator = data, batch_size, generator
        self.perm: Tensor | None = None
        self.pos = 0

    def next(self) -> Tensor:
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


@torch.no_grad()
def evaluate(model: SBN, data: Tensor, cfg: EvalConfig, prefix: str) -> dict[str, float]:
    """ELBO and (if ``cfg.iwae_k``) the K-sample bound, averaged over ``data`` (first ``cfg.limit`` rows)."""
    gen = torch.Generator(device=data.device).manual_seed(cfg.seed)
    n, elbo, iwae = 0, 0.0, 0.0
    for x in eval_batches(data, cfg.batch_size, cfg.seed, cfg.limit):
        x = x.to(model.prior_logits.dtype)
        elbo += float(model.elbo(x, gen).sum())
        if cfg.iwae_k:
            iwae += float(model.iwae_bound(x, cfg.iwae_k, gen).sum())
        n += x.shape[0]
    out = {f"{prefix}/elbo": elbo / n}
    if cfg.iwae_k:
        out[f"{prefix}/iwae{cfg.iwae_k}"] = iwae / n
    return out


def measure_variance(model: SBN, estimator: Estimator, data: Tensor, batch_size: int, samples: int,
                     seed: int) -> dict[str, float]:
    """The paper's protocol: ``samples`` fresh training minibatches, one estimate each.

    Uses its own generator, so the training stream is the same whether or not this runs.
    """
    gen = torch.Generator(device=data.device).manual_seed(seed)

    def batches():
        for _ in range(samples):
            idx = torch.randint(data.shape[0], (batch_size,), generator=gen, device=gen.device)
            yield binarize(data[idx.to(data.device)], gen)

    groups = {"grad_var/inference": model.inference_parameters(),
              "grad_var/generative": model.generative_parameters()}
    for l, net in enumerate(model.q_nets, start=1):
        groups[f"grad_var/layer{l}"] = list(net.parameters())
    return gradient_variance(model, estimator, batches(), gen, groups)


def save_atomic(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: a kill never leaves a partial file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, device: torch.device) -> dict:
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # truncated or not a checkpoint
        raise RunError(f"cannot read checkpoint {path}: {e}. Delete it, or start again with "
                       f"train.overwrite=true") from e


def train_step(model: SBN, estimator: Estimator, est, model_opt: torch.optim.Optimizer,
               est_opt: torch.optim.Optimizer | None, est_params: list[nn.Parameter]) -> None:
    """One update. Model parameters follow the surrogate; the estimator's own parameters follow its
    ``aux_loss`` alone (e.g. a baseline's squared error, or a variance objective built from the
    gradient estimate with ``create_graph=True``), so neither loss leaks into the other's parameters."""
    model_opt.zero_grad(set_to_none=True)
    if est_opt is not None and est.aux_loss is not None:
        grads = torch.autograd.grad(est.aux_loss, est_params, retain_graph=True, allow_unused=True)
        for p, g in zip(est_params, grads):
            p.grad = g
    est.surrogate.backward(inputs=[p for g in model_opt.param_groups for p in g["params"]])
    model_opt.step()
    if est_opt is not None and est.aux_loss is not None:
        est_opt.step()


@dataclass
class RunResult:
    step: int
    metrics: dict[str, float]
    out_dir: str


def prepare_folder(out_dir: Path, cfg: TrainConfig) -> Path | None:
    """Return the checkpoint to resume from (or None); refuse to overwrite a previous run by accident."""
    ckpt = out_dir / CHECKPOINT
    old = [p for p in out_dir.glob("events.out.tfevents.*")] + [p for p in (ckpt, out_dir / RESULTS) if p.exists()]
    if cfg.resume:
        if ckpt.exists():
            return ckpt
        log.warning("train.resume=true but %s has no checkpoint: starting from step 0", out_dir)
    elif old and not cfg.overwrite:
        raise RunError(f"{out_dir} already holds a run. Continue it with train.resume=true, "
                       f"discard it with train.overwrite=true, or set hydra.run.dir=<another folder>")
    for p in set(old) | set(out_dir.glob("*.pt")):
        p.unlink(missing_ok=True)
    return None


def run(model: SBN, estimator: Estimator, splits: Splits, train_cfg: TrainConfig, optim_cfg: OptimConfig,
        eval_cfg: EvalConfig, var_cfg: VarianceConfig, out_dir: str | Path, seed: int,
        hparams: dict[str, Any] | None = None) -> RunResult:
    """Train ``model`` with ``estimator`` and log to TensorBoard in ``out_dir``."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = model.prior_logits.device
    resume_from = prepare_folder(out_dir, train_cfg)

    model_opt = make_optimizer(list(model.parameters()), optim_cfg)
    est_params = [p for p in estimator.parameters() if p.requires_grad]
    est_opt = make_optimizer(est_params, optim_cfg) if est_params else None
    gen = torch.Generator(device=device).manual_seed(seed)     # the training stream: batches + estimator noise
    sampler = TrainSampler(splits.train, train_cfg.batch_size, gen)
    step, best = 0, -math.inf
    if resume_from is not None:
        state = load_checkpoint(resume_from, device)
        model.load_state_dict(state["model"])
        estimator.load_state_dict(state["estimator"])
        model_opt.load_state_dict(state["model_opt"])
        if est_opt is not None:
            est_opt.load_state_dict(state["est_opt"])
        gen.set_state(state["generator"].cpu())
        sampler.load_state_dict(state["sampler"])
        step, best = int(state["step"]), float(state["best"])
        log.info("resumed from %s at step %d", resume_from, step)

    writer = SummaryWriter(str(out_dir), purge_step=step + 1 if step else None)
    bar = tqdm(total=train_cfg.max_steps, initial=step, disable=not train_cfg.progress, dynamic_ncols=True,
               desc=out_dir.name[:40])
    metrics: dict[str, float] = {}
    elbo_sum, elbo_n, t_window, n_window = torch.zeros((), device=device), 0, time.perf_counter(), 0
    estimator.train()
    try:
        while step < train_cfg.max_steps:
            step += 1
            x = sampler.next().to(model.prior_logits.dtype)
            est = estimator(model, x, gen)
            train_step(model, estimator, est, model_opt, est_opt, est_params)
            elbo_sum += est.elbo.mean()
            elbo_n, n_window = elbo_n + 1, n_window + 1
            bar.update(1)

            if step % train_cfg.log_every == 0 or step == train_cfg.max_steps:
                train_elbo = float(elbo_sum) / elbo_n                 # a sync point
                if not math.isfinite(train_elbo):
                    raise RunError(f"training diverged at step {step} (ELBO {train_elbo}); "
                                   f"lower optim.lr (now {optim_cfg.lr})")
                dt = (time.perf_counter() - t_window) / n_window
                writer.add_scalar("train/elbo", train_elbo, step)
                writer.add_scalar("perf/step_time_ms", 1000 * dt, step)
                writer.add_scalar("perf/steps_per_s", 1 / dt, step)
                for k, v in est.metrics.items():
                    writer.add_scalar(f"estimator/{k}", v, step)
                metrics["train/elbo"] = train_elbo
                bar.set_postfix(elbo=f"{train_elbo:.2f}", refresh=False)
                elbo_sum.zero_()
                elbo_n, n_window, t_window = 0, 0, time.perf_counter()

            if var_cfg.every and step % var_cfg.every == 0:
                v = measure_variance(model, estimator, splits.train, train_cfg.batch_size, var_cfg.samples,
                                     seed=(seed * 1_000_003 + step) % (2 ** 31))
                for k, val in v.items():
                    writer.add_scalar(k, val, step)
                metrics.update(v)
                t_window, n_window = time.perf_counter(), 0

            if step % train_cfg.eval_every == 0 or step == train_cfg.max_steps:
                ev = evaluate(model, splits.valid, eval_cfg, "valid")
                for k, val in ev.items():
                    writer.add_scalar(k, val, step)
                metrics.update(ev)
                score = ev.get(f"valid/iwae{eval_cfg.iwae_k}", ev["valid/elbo"])
                if score > best:
                    best = score
                    save_atomic({"model": model.state_dict(), "step": step, "metrics": dict(ev)}, out_dir / BEST)
                save_atomic({"model": model.state_dict(), "estimator": estimator.state_dict(),
                             "model_opt": model_opt.state_dict(),
                             "est_opt": est_opt.state_dict() if est_opt is not None else None,
                             "generator": gen.get_state(), "sampler": sampler.state_dict(),
                             "step": step, "best": best}, out_dir / CHECKPOINT)
                writer.flush()
                t_window, n_window = time.perf_counter(), 0
    finally:
        bar.close()
    metrics["best/valid"] = best
    results = {"step": step, "metrics": metrics, "hparams": hparams or {}}
    tmp = out_dir / (RESULTS + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp, out_dir / RESULTS)
    if hparams:
        writer.add_hparams({k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()},
                           {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".")
    writer.close()
    return RunResult(step=step, metrics=metrics, out_dir=str(out_dir))
