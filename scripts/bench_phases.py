"""Where the time of the default main job (``make run``) goes, measured phase by phase in one process.

    python scripts/bench_phases.py                 # MNIST, the default config (sbn_2layer, marginal)
    python scripts/bench_phases.py --test-rows 1000 --steps 30

The job is ``sbn-train`` with its defaults (configs/config.yaml): ``train.max_steps`` training steps, the
periodic evaluation every ``train.eval_every`` steps (the validation split and the first
``eval.train_limit`` training rows, ELBO and the ``eval.iwae_k``-sample bound), the gradient-variance probe
every ``variance.every`` steps and the final test of the best model. This script runs one of each with the
code the training loop runs (``TrainStep``, ``EvaluateAndCheckpoint.bounds``, ``measure_variance``,
``evaluate_test``) and projects the whole job from them. The final test runs on the first ``--test-rows``
test rows only and is scaled to the full split (its cost is linear in the rows).

It also times the matrix products alone of the evaluation, with the shapes and chunks the evaluation uses,
and prints the evaluation's rate against that floor: evaluation / floor is the overhead of everything that
is not a matrix product (sampling, log-probabilities, log-sum-exp).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")   # as the CLI does; see sbn_train/cli.py

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sbn_train.config import Config, register_configs  # noqa: E402
from sbn_train.data import Splits, load_dataset  # noqa: E402
from sbn_train.estimators import estimator_from_config  # noqa: E402
from sbn_train.evaluation import measure_variance  # noqa: E402
from sbn_train.jobs import EvaluateAndCheckpoint  # noqa: E402
from sbn_train.models import SBN, build_model  # noqa: E402
from sbn_train.paths import config_dir  # noqa: E402
from sbn_train.state import TrainState, load_checkpoint  # noqa: E402
from sbn_train.train import TrainStep, evaluate_test  # noqa: E402


def default_config(overrides: list[str]):
    """The composed config of ``sbn-train <overrides>`` (typed) and its estimator section (a dict)."""
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = compose("config", overrides=overrides)
    return OmegaConf.to_object(cfg), OmegaConf.to_container(cfg.estimator, resolve=True), \
        OmegaConf.to_container(cfg.dataset, resolve=True)


def random_splits(n_test: int) -> Splits:
    """MNIST-shaped random intensities, for machines without the MNIST cache (timings only)."""
    g = torch.Generator().manual_seed(0)
    return Splits(train=torch.rand(50000, 784, generator=g), valid=torch.rand(10000, 784, generator=g),
                  test=torch.rand(n_test, 784, generator=g), name="random", image_shape=(28, 28))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def chunk_rows(n_rows: int, batch_size: int, samples: int, max_rows: int) -> list[int]:
    """The row counts of the sample chunks one bound (``samples`` per data row) processes, as
    ``split_bounds`` chunks them (``elbo_average`` and ``iwae_bound`` alike)."""
    out = []
    for start in range(0, n_rows, batch_size):
        b = min(batch_size, n_rows - start)
        per_chunk, done = max(1, max_rows // b), 0
        while done < samples:
            c = min(per_chunk, samples - done)
            out.append(c * b)
            done += c
    return out


@torch.no_grad()
def matmul_floor(model: SBN, chunks: list[int]) -> float:
    """Seconds of the affine maps alone that one pass over ``chunks`` needs: every layer of q and p once per
    sample row, on inputs of the same shapes (0/1 values, as the samples are)."""
    dtype, top = model.prior_logits.dtype, max(chunks)
    g = torch.Generator().manual_seed(0)
    inputs = {d: (torch.rand(top, d, generator=g, dtype=dtype) < 0.5).to(dtype) for d in set(model.sizes)}
    layers = [net.first for net in model.q_nets] + [net.first for net in model.p_nets]
    t0 = time.perf_counter()
    for rows in chunks:
        for lin in layers:
            F.linear(inputs[lin.in_features][:rows], lin.weight, lin.bias)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="config overrides, as on the sbn-train command line")
    ap.add_argument("--steps", type=int, default=20, help="training steps timed (median; after 3 warm-up steps)")
    ap.add_argument("--test-rows", type=int, default=500, help="test rows evaluated; the time is scaled to all")
    ap.add_argument("--data", default="mnist", choices=["mnist", "random"])
    ap.add_argument("--checkpoint", help="time the model weights of this checkpoint instead of the initialization")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, est_cfg, data_cfg = default_config(args.overrides)
    assert isinstance(cfg, Config)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"threads {torch.get_num_threads()}; overrides: {' '.join(args.overrides) or '(none: the defaults)'}")
    splits = load_dataset(**data_cfg) if args.data == "mnist" else random_splits(10000)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, splits.train.shape[1], x_mean=splits.train.mean(0))
    if args.checkpoint:
        model.load_state_dict(load_checkpoint(Path(args.checkpoint), torch.device("cpu"))["model"])
    estimator = estimator_from_config(est_cfg, model)
    tr, ev, var, te = cfg.train, cfg.eval, cfg.variance, cfg.test

    # one training step: the loop's own, median over --steps
    state = TrainState.create(model, estimator, splits.train, tr.batch_size, cfg.optim, cfg.seed)
    state.estimator.train()
    step = TrainStep(state)
    step_times = [timed(step) for _ in range(args.steps + 3)][3:]
    step_s = statistics.median(step_times)
    state.estimator.eval()

    # one periodic evaluation, and the matrix products of its shapes alone
    evaluation = EvaluateAndCheckpoint(tr.eval_every, ev, splits)
    eval_s = timed(lambda: evaluation.bounds(model))
    chunks = []
    splits_rows = [min(ev.limit or math.inf, splits.valid.shape[0])]
    if ev.train_split:
        splits_rows.append(min(ev.train_limit or math.inf, splits.train.shape[0]))
    for n in splits_rows:
        chunks += chunk_rows(int(n), ev.batch_size, 1, ev.max_rows)
        if ev.iwae_k:
            chunks += chunk_rows(int(n), ev.batch_size, ev.iwae_k, ev.max_rows)
    floor_s = matmul_floor(model, chunks)

    # one variance probe
    var_s = timed(lambda: measure_variance(model, estimator, splits.train, tr.batch_size, var.samples, seed=1,
                                           views=var.views, exact_max_latents=var.exact_max_latents,
                                           fixed_seed=cfg.seed)) if var.every else 0.0

    # the final test on the first --test-rows rows, scaled
    test_total = min(te.limit or math.inf, splits.test.shape[0])
    rows = int(min(args.test_rows, test_total))
    test_s = timed(lambda: evaluate_test(model, splits.test, replace(te, limit=rows))) if te.enabled else 0.0
    test_scaled = test_s * test_total / rows if te.enabled else 0.0

    n_evals = tr.max_steps // tr.eval_every + (tr.max_steps % tr.eval_every != 0)   # + the one at the end
    n_probes = tr.max_steps // var.every if var.every else 0
    phases = [("training steps", step_s, tr.max_steps), ("evaluations", eval_s, n_evals),
              ("variance probes", var_s, n_probes),
              (f"final test (from {rows:,} of {int(test_total):,} rows)", test_scaled, int(te.enabled))]
    total = sum(t * n for _, t, n in phases)
    print(f"\nprojected wall time of the job: {tr.max_steps:,} steps, batch {tr.batch_size}, "
          f"model {cfg.model.latent_sizes}, estimator {est_cfg['_target_'].rsplit('.', 1)[-1]}")
    print(f"{'phase':<44}{'one (s)':>10}{'count':>8}{'projected':>12}{'share':>8}")
    for name, t, n in phases:
        print(f"{name:<44}{t:>10.3f}{n:>8,}{t * n / 60:>10.1f} m{100 * t * n / total:>7.0f}%")
    print(f"{'total (checkpoints and images not counted)':<44}{'':>18}{total / 60:>10.1f} m")

    data_rows = sum(splits_rows)
    sample_rows = sum(chunks)
    print(f"\nevaluation: {data_rows:,} data rows ({sample_rows:,} sample rows: 1 ELBO sample + K={ev.iwae_k} per "
          f"row) in {eval_s:.2f} s = {data_rows / eval_s:,.0f} rows/s")
    print(f"matrix products alone, same shapes: {floor_s:.2f} s = {data_rows / floor_s:,.0f} rows/s")
    print(f"evaluation / matrix-product floor = {eval_s / floor_s:.2f} (target <= 3)")


if __name__ == "__main__":
    main()
