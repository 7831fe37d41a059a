"""Gradient variance of the published-code variants against the estimators they modify, per inference layer.

    python scripts/compare_paper_code.py --pair marginal --checkpoint outputs/runs/<run>/checkpoint.pt
    python scripts/compare_paper_code.py --pair leg --model sbn_4layer                 # at initialization

Pairs: ``marginal`` vs ``marginal_paper_code`` and ``leg`` vs ``leg_paper_code`` (configs/estimator/). The
measurement is the paper's protocol, :func:`sbn_train.evaluation.measure_variance` with the view
"minibatch": M estimates, each on a fresh training minibatch; per inference layer the mean over its
parameter elements of the unbiased variance of the gradient.

Intervals: the M estimates are taken as G independent groups of M/G (probe seeds seed, seed+1, ...). Each
group's value is an unbiased estimate of the same variance; the point estimate is the mean of the G values
and its 95% interval the Student t interval over them (G - 1 degrees of freedom). The two estimators of a
pair draw the same random numbers in the same order (same minibatches, same uniforms), so each group is a
paired comparison: the ratio variant / original is taken per group, and its 95% interval is the t interval
over the G per-group ratios.

Without ``--checkpoint`` the model is the CLI's initialization for ``--seed`` (prior logits 0: there the
marginal pair is identical by construction). ``--checkpoint`` takes a ``checkpoint.pt`` or ``best.pt`` the
CLI wrote for the same ``--model``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sbn_train.data import load_dataset  # noqa: E402
from sbn_train.estimators import build_estimator  # noqa: E402
from sbn_train.evaluation import fresh_minibatches, measure_variance  # noqa: E402
from sbn_train.models import SBN  # noqa: E402
from sbn_train.paths import config_dir  # noqa: E402

PAIRS = {"marginal": ("marginal", "marginal_paper_code"), "leg": ("leg", "leg_paper_code")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", choices=sorted(PAIRS), required=True)
    p.add_argument("--model", default="sbn_2layer", help="a file of configs/model/ (default sbn_2layer)")
    p.add_argument("--checkpoint", type=Path, help="checkpoint.pt / best.pt written by sbn-train for --model")
    p.add_argument("--samples", type=int, default=1000, help="M, estimates per estimator (default 1000)")
    p.add_argument("--groups", type=int, default=10, help="G independent groups the M estimates form (default 10)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0, help="model initialization; probe seeds are seed*1000 + group")
    p.add_argument("--data-dir", default="~/.cache/sbn-train")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    a = p.parse_args(argv)
    if a.samples < 2 * a.groups or a.groups < 2:
        p.error(f"need --groups >= 2 and --samples >= 2 x --groups, got {a.samples} and {a.groups}")
    if a.checkpoint is not None and not a.checkpoint.is_file():
        p.error(f"--checkpoint {a.checkpoint}: no such file")
    return a


def read_weights(checkpoint: Path) -> dict:
    """The model weights of a checkpoint.pt / best.pt, read as the CLI reads them (tensors and plain data only:
    nothing in the file can run code); one line (SystemExit) naming the file if it cannot be used."""
    from sbn_train.state import CheckpointUnreadable, load_checkpoint
    try:
        state = load_checkpoint(checkpoint, torch.device("cpu"))
    except CheckpointUnreadable as e:
        raise SystemExit(f"compare_paper_code: error: cannot read checkpoint {checkpoint} ({e.why}); pass a "
                         f"checkpoint.pt or best.pt written by sbn-train") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise SystemExit(f"compare_paper_code: error: {checkpoint} holds no model weights (not a checkpoint.pt "
                         f"or best.pt written by sbn-train)")
    return state["model"]


def build_model(name: str, train: torch.Tensor, seed: int, checkpoint: Path | None) -> SBN:
    path = config_dir() / "model" / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"unknown model {name!r}: no {path}")
    cfg = OmegaConf.load(path)
    torch.manual_seed(seed)                                   # as the CLI does before building the model
    model = SBN(train.shape[1], list(cfg.latent_sizes), int(cfg.n_hidden), x_mean=train.mean(0))
    if checkpoint is not None:
        state = read_weights(checkpoint)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            from sbn_train.state import state_dict_mismatch
            raise SystemExit(f"compare_paper_code: error: {checkpoint} does not hold a {name} model "
                             f"({state_dict_mismatch(e)}); pass the --model it was trained with") from None
    return model


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95% Student t interval of the mean of ``values``."""
    t = torch.tensor(values, dtype=torch.float64)
    n = t.numel()
    half = float(stats.t.ppf(0.975, n - 1)) * float(t.std()) / math.sqrt(n)
    return float(t.mean()), float(t.mean()) - half, float(t.mean()) + half


def group_variances(model: SBN, name: str, data: torch.Tensor, args) -> list[dict[str, float]]:
    est = build_estimator(name, model).to(args.device)
    out = []
    for g in range(args.groups):
        v = measure_variance(model, est, data, args.batch_size, args.samples // args.groups,
                             seed=args.seed * 1000 + g, views=["minibatch"])
        out.append({k: v[k] for k in v if k.startswith("grad_var/layer") or k == "grad_var/inference"})
    return out


def predicted_top_bias(model: SBN, data: torch.Tensor, batch_size: int, batches: int, seed: int) -> float:
    """Mean over the top inference layer's parameter elements of the squared bias of ``marginal_paper_code``
    (the formula of :mod:`sbn_train.estimators.marginal`: s (1 - s) (1 - 2 s (1 - s)) b per row and top
    logit), its expectation estimated over ``batches`` fresh minibatches and samples of the layers below."""
    gen = torch.Generator(device=data.device).manual_seed(seed)
    params = list(model.q_nets[-1].parameters())
    total = [torch.zeros_like(p) for p in params]
    for x in fresh_minibatches(data, batch_size, batches, gen):
        x = x.to(model.prior_logits.dtype)
        zs = model.sample_q(x, model.draw_uniforms(x.shape[0], gen, x.device, x.dtype))
        a = model.q_logits(model.n_layers, ([x] + zs)[-2])                  # [B, H_L]
        with torch.no_grad():
            s = torch.sigmoid(a)
            beta = s * (1 - s) * (1 - 2 * s * (1 - s)) * model.prior_logits
        for t, g in zip(total, torch.autograd.grad((beta * a).sum() / x.shape[0], params)):
            t += g / batches
    return float(torch.cat([t.reshape(-1) for t in total]).pow(2).mean())


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.checkpoint is not None:
        read_weights(args.checkpoint)                         # a file it cannot use stops it before the data
    if args.threads:
        torch.set_num_threads(args.threads)
    train = load_dataset("mnist", args.data_dir).train.to(args.device)
    model = build_model(args.model, train, args.seed, args.checkpoint).to(args.device)
    original, variant = PAIRS[args.pair]
    t0 = time.perf_counter()
    groups = {name: group_variances(model, name, train, args) for name in (original, variant)}
    tags = list(groups[original][0])
    rows = {}
    for tag in tags:
        a = [g[tag] for g in groups[original]]
        b = [g[tag] for g in groups[variant]]
        rows[tag] = {original: t_interval(a), variant: t_interval(b),
                     "ratio": t_interval([y / x for x, y in zip(a, b)])}
    where = f"checkpoint {args.checkpoint}" if args.checkpoint else f"initialization (seed {args.seed})"
    print(f"model {args.model}, {where}; M = {args.samples} estimates per estimator in {args.groups} groups, "
          f"batch {args.batch_size}; {time.perf_counter() - t0:.0f} s")
    print(f"| parameters | {original} | {variant} | ratio {variant} / {original} |")
    print("|---|---:|---:|---:|")
    fmt = "{:.4g} [{:.4g}, {:.4g}]"
    for tag, r in rows.items():
        print(f"| {tag.split('/')[1]} | {fmt.format(*r[original])} | {fmt.format(*r[variant])} | "
              f"{fmt.format(*r['ratio'])} |")
    extra = {}
    if args.pair == "marginal":
        L = model.n_layers
        extra["bias2"] = predicted_top_bias(model, train, args.batch_size, args.samples, args.seed)
        var = rows[f"grad_var/layer{L}"][original][0]
        print(f"layer{L}, {variant}: squared bias (formula, mean over elements, {args.samples} minibatches) "
              f"{extra['bias2']:.4g}, {extra['bias2'] / var:.3g} x the variance of {original}; "
              f"mean |prior logit| {float(model.prior_logits.detach().abs().mean()):.3g}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                         "groups": groups, **extra}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
