"""The training loop: step, evaluate, measure gradient variance, checkpoint, test the best model, log.

Metric names (TensorBoard tags) are an API:
    train/elbo                   mean single-sample ELBO of the training batches since the last log
    train/elbo_eval, train/iwae{K}   ELBO and K-sample bound on the first eval.train_limit training rows
    valid/elbo, valid/iwae{K}    the same on (the first eval.limit rows of) the validation split (fixed-seed
                                 binarization and sampling);
                                 the model with the best valid/iwae{K} (valid/elbo if eval.iwae_k=0) is best.pt
    test/elbo, test/iwae{K}      the best model on the test split: ELBO averaged over test.elbo_samples samples,
                                 bound with K = test.iwae_k (logged once, at the last step)
    grad_var/inference           the paper's protocol: M fresh training minibatches, one estimate each; mean over
                                 inference-net elements of the unbiased gradient variance
    grad_var/layer{l}            the same over inference layer l's parameters
    grad_var/generative          the same over generative-net parameters
    grad_var_latent/{inference,layer{l},generative}   one fixed minibatch, M draws of the estimator's noise
    grad_bias/{inference,layer{l},generative}   mean over elements of the squared bias against the exact gradient
    grad_mse/{inference,layer{l},generative}    mean over elements of the mean squared error against it
                                 (both only for models with at most variance.exact_max_latents latent units)
    estimator/*                  what the estimator reports (e.g. baseline statistics)
    perf/step_time_ms, perf/steps_per_s
    images/data, images/samples, images/reconstructions   (image datasets only)
and the custom-scalars layout (sbn_train.tb.LAYOUT) and the run's hyperparameters (hparams plugin).

results.json holds the final step, status, the last value of every metric, the best model's step and
validation metrics, test/* with their standard errors over test examples, and the hyperparameters.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import tb
from .config import EvalConfig, OptimConfig, TestConfig, TrainConfig, VarianceConfig
from .data import Splits, binarize, eval_batches
from .estimators import Estimator
from .evaluation import measure_variance, split_bounds, summarize
from .models import SBN

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
RESULTS = "results.json"
FAILED = "failed.json"       # written by the CLI when a run stops with an error
#: scalar tags shown as metrics in the hparams table
HPARAM_METRICS = ("train/", "valid/", "test/", "grad_var/inference")


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


def evaluate(model: SBN, data: Tensor, cfg: EvalConfig, prefix: str) -> dict[str, float]:
    """Single-sample ELBO and (if ``cfg.iwae_k``) the K-sample bound, averaged over the first ``cfg.limit``
    rows of ``data``: ``{prefix}/elbo`` and ``{prefix}/iwae{K}``."""
    elbo, iwae = split_bounds(model, data, cfg.batch_size, cfg.limit, cfg.seed, 1, cfg.iwae_k, cfg.max_rows)
    return summarize(prefix, elbo, iwae, cfg.iwae_k)


def evaluate_test(model: SBN, data: Tensor, cfg: TestConfig) -> dict[str, float]:
    """``test/elbo`` (averaged over ``cfg.elbo_samples``) and ``test/iwae{K}``, with standard errors over
    the test examples (``test/elbo_se`` ...)."""
    elbo, iwae = split_bounds(model, data, cfg.batch_size, cfg.limit, cfg.seed, cfg.elbo_samples, cfg.iwae_k,
                              cfg.max_rows)
    return summarize("test", elbo, iwae, cfg.iwae_k, with_se=True)


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


def finished_result(out_dir: Path, cfg: TrainConfig) -> RunResult | None:
    """The stored result of a run in ``out_dir`` that already reached ``cfg.max_steps``, else None."""
    try:
        results = json.loads((out_dir / RESULTS).read_text())
    except (OSError, ValueError):
        return None
    if results.get("status") != "finished" or int(results.get("step", -1)) != cfg.max_steps:
        return None
    return RunResult(step=int(results["step"]), metrics=results["metrics"], out_dir=str(out_dir))


def _log(writer, values: dict[str, float], step: int) -> None:
    for k, v in values.items():
        writer.add_scalar(k, v, step)


def _periodic_eval(model: SBN, splits: Splits, cfg: EvalConfig) -> dict[str, float]:
    out = evaluate(model, splits.valid, cfg, "valid")
    if cfg.train_split:
        ev = evaluate(model, splits.train, replace(cfg, limit=cfg.train_limit), "train")
        out["train/elbo_eval"] = ev.pop("train/elbo")      # train/elbo is the running training-batch ELBO
        out.update(ev)
    return out


def _write_results(out_dir: Path, results: dict) -> None:
    tmp = out_dir / (RESULTS + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp, out_dir / RESULTS)


def run(model: SBN, estimator: Estimator, splits: Splits, train_cfg: TrainConfig, optim_cfg: OptimConfig,
        eval_cfg: EvalConfig, var_cfg: VarianceConfig, out_dir: str | Path, seed: int,
        hparams: dict[str, Any] | None = None, test_cfg: TestConfig | None = None) -> RunResult:
    """Train ``model`` with ``estimator``, log to TensorBoard in ``out_dir``, then test the best model
    (unless ``test_cfg`` is None or disabled) and write ``results.json``."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = model.prior_logits.device
    resume_from = prepare_folder(out_dir, train_cfg)
    (out_dir / FAILED).unlink(missing_ok=True)
    done = finished_result(out_dir, train_cfg) if resume_from is not None else None
    if done is not None:
        log.info("%s already finished at step %d; nothing to do", out_dir, done.step)
        return done

    model_opt = make_optimizer(list(model.parameters()), optim_cfg)
    est_params = [p for p in estimator.parameters() if p.requires_grad]
    est_opt = make_optimizer(est_params, optim_cfg) if est_params else None
    gen = torch.Generator(device=device).manual_seed(seed)     # the training stream: batches + estimator noise
    sampler = TrainSampler(splits.train, train_cfg.batch_size, gen)
    step, best, best_step = 0, -math.inf, 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, device)
        model.load_state_dict(state["model"])
        estimator.load_state_dict(state["estimator"])
        model_opt.load_state_dict(state["model_opt"])
        if est_opt is not None:
            est_opt.load_state_dict(state["est_opt"])
        gen.set_state(state["generator"].cpu())
        sampler.load_state_dict(state["sampler"])
        step, best, best_step = int(state["step"]), float(state["best"]), int(state.get("best_step", 0))
        log.info("resumed from %s at step %d", resume_from, step)

    writer = SummaryWriter(str(out_dir), purge_step=step + 1 if step else None)
    n_img = min(eval_cfg.images, splits.valid.shape[0])
    img_x = next(eval_batches(splits.valid, max(n_img, 1), eval_cfg.seed, n_img)) if n_img else splits.valid[:0]
    if step == 0:
        tb.log_layout(writer)
        tb.log_images(writer, model, img_x, splits.image_shape, 0, eval_cfg.seed, with_data=True)
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
                _log(writer, {"train/elbo": train_elbo, "perf/step_time_ms": 1000 * dt, "perf/steps_per_s": 1 / dt,
                              **{f"estimator/{k}": v for k, v in est.metrics.items()}}, step)
                metrics["train/elbo"] = train_elbo
                bar.set_postfix(elbo=f"{train_elbo:.2f}", refresh=False)
                elbo_sum.zero_()
                elbo_n, n_window, t_window = 0, 0, time.perf_counter()

            if var_cfg.every and step % var_cfg.every == 0:
                v = measure_variance(model, estimator, splits.train, train_cfg.batch_size, var_cfg.samples,
                                     seed=(seed * 1_000_003 + step) % (2 ** 31), views=var_cfg.views,
                                     exact_max_latents=var_cfg.exact_max_latents, fixed_seed=seed)
                _log(writer, v, step)
                metrics.update(v)
                t_window, n_window = time.perf_counter(), 0

            if step % train_cfg.eval_every == 0 or step == train_cfg.max_steps:
                ev = _periodic_eval(model, splits, eval_cfg)
                _log(writer, ev, step)
                tb.log_images(writer, model, img_x, splits.image_shape, step, eval_cfg.seed)
                metrics.update(ev)
                score = ev.get(f"valid/iwae{eval_cfg.iwae_k}", ev["valid/elbo"])
                if score > best:
                    best, best_step = score, step
                    save_atomic({"model": model.state_dict(), "step": step, "metrics": dict(ev)}, out_dir / BEST)
                save_atomic({"model": model.state_dict(), "estimator": estimator.state_dict(),
                             "model_opt": model_opt.state_dict(),
                             "est_opt": est_opt.state_dict() if est_opt is not None else None,
                             "generator": gen.get_state(), "sampler": sampler.state_dict(),
                             "step": step, "best": best, "best_step": best_step}, out_dir / CHECKPOINT)
                writer.flush()
                t_window, n_window = time.perf_counter(), 0
    finally:
        bar.close()
    metrics["best/valid"] = best
    metrics["best/step"] = best_step
    if test_cfg is not None and test_cfg.enabled:
        metrics.update(_test_best_model(model, splits, test_cfg, out_dir, writer, step))
    _write_results(out_dir, {"step": step, "status": "finished", "metrics": metrics, "hparams": hparams or {}})
    if hparams:
        tb.log_hparams(writer, hparams, [k for k in metrics if k.startswith(HPARAM_METRICS) and not k.endswith("_se")])
    writer.close()
    return RunResult(step=step, metrics=metrics, out_dir=str(out_dir))


def _test_best_model(model: SBN, splits: Splits, cfg: TestConfig, out_dir: Path, writer, step: int) -> dict:
    """Load ``best.pt`` into ``model`` (it stays there) and evaluate it on the test split."""
    best = out_dir / BEST
    if best.exists():
        model.load_state_dict(load_checkpoint(best, model.prior_logits.device)["model"])
    t0 = time.perf_counter()
    out = evaluate_test(model, splits.test, cfg)
    log.info("tested the best model in %.1f s: %s", time.perf_counter() - t0,
             ", ".join(f"{k}={v:.4f}" for k, v in out.items()))
    _log(writer, {k: v for k, v in out.items() if not k.endswith("_se")}, step)
    return out
