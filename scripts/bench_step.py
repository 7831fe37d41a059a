"""Time training steps of several estimators side by side, in one process, on real MNIST batches.

    python scripts/bench_step.py                               # sbn_2layer, batch 100: the headline
    python scripts/bench_step.py --models sbn_2layer,sbn_4layer,sbn_nonlinear
    python scripts/bench_step.py --estimators reinforce,nvil,marginal,muprop
    python scripts/bench_step.py --scaling                     # marginal vs batch size and layer width
    python scripts/bench_step.py --replicas 1,4,16,64          # replica groups: aggregate steps/s per R
    python scripts/bench_step.py --eval-replicas 1,4           # replica groups' evaluation and final test

Every estimator runs the training loop's own step (``sbn_train.train.TrainStep`` over a
``TrainState``: minibatch sampling from the training split, estimator, backward, both optimizers), timed
phase by phase. Each round runs one step of every estimator in turn (interleaved, so machine noise hits
all alike); medians over rounds are printed for the minibatch (sampling and binarization), the estimator
call (forward: sampling z, the estimator's own work), backward, the optimizer step (the same RMSprop for
all) and the whole step. Batch sizes are the paper's schedules of configs/experiment/schedule/. ``marginal_reference`` is
the brute-force marginal estimator (B*H_l flipped rows through full layers). Peak extra memory is
measured in a fresh subprocess per estimator: peak resident memory during 3 steps minus resident
memory before them (CPU: /proc VmHWM after resetting it; CUDA: max_memory_allocated).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")   # as the CLI does; see sbn_train/cli.py

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sbn_train.config import ModelConfig, OptimConfig  # noqa: E402
from sbn_train.estimators import build_estimator  # noqa: E402
from sbn_train.models import SBN, build_model  # noqa: E402
from sbn_train.paths import config_dir  # noqa: E402
from sbn_train.state import RunError, TrainState, load_checkpoint  # noqa: E402
from sbn_train.train import TrainStep  # noqa: E402


def paper_batch(model_name: str) -> int:
    """The batch size of the paper's schedule for the model (configs/experiment/schedule/paper_<model>.yaml),
    else the default config's."""
    schedule = config_dir() / "experiment" / "schedule" / f"paper_{model_name}.yaml"
    cfg = OmegaConf.load(schedule if schedule.is_file() else config_dir() / "config.yaml")
    return int(cfg.train.batch_size)


def model_spec(name: str) -> tuple[list[int], ModelConfig]:
    """(latent sizes, the whole model config) of ``configs/model/<name>.yaml``."""
    cfg = OmegaConf.load(config_dir() / "model" / f"{name}.yaml")
    spec = ModelConfig(**{k: v for k, v in OmegaConf.to_container(cfg).items() if k != "defaults"})
    return list(spec.latent_sizes), spec


def model_text(spec: ModelConfig) -> str:
    text = f"n_hidden {spec.n_hidden}" if not spec.hidden else f"hidden {list(spec.hidden)} {spec.activation}"
    return text if spec.family == "bernoulli" else f"{text}, {spec.family} K = {spec.classes}"


def new_model(images: torch.Tensor, sizes: list[int], spec: ModelConfig) -> SBN:
    """The model of ``spec`` with ``sizes`` latent variables per layer."""
    return build_model(dataclasses.replace(spec, latent_sizes=list(sizes)), images.shape[1],
                       x_mean=images.mean(0).cpu())


def load_images(kind: str, device: torch.device) -> torch.Tensor:
    if kind == "mnist":
        from sbn_train.data import load_dataset
        data_dir = os.environ.get("SBN_TRAIN_DATA", "~/.cache/sbn-train")
        return load_dataset("mnist", data_dir=data_dir).train.to(device)
    g = torch.Generator().manual_seed(0)
    return torch.rand(5000, 784, generator=g).to(device)


CHECKPOINT: str | None = None     # --checkpoint: a run's checkpoint.pt / best.pt whose model weights are timed


def make(est_name: str, sizes: list[int], spec: ModelConfig, images: torch.Tensor, batch: int,
         device: torch.device) -> TrainStep:
    """The training step the loop runs (sbn_train.train.TrainStep) for a fresh run of ``est_name``."""
    torch.manual_seed(0)
    model = new_model(images, sizes, spec)
    if CHECKPOINT:
        model.load_state_dict(load_checkpoint(Path(CHECKPOINT), torch.device("cpu"))["model"])
    model = model.to(device)
    if est_name == "marginal_reference":
        est = build_estimator("marginal", model, implementation="reference")
    else:
        est = build_estimator(est_name, model)
    state = TrainState.create(model, est.to(device), images, batch, OptimConfig(lr=1e-4), seed=1)
    state.estimator.train()
    return TrainStep(state)


def replica_step(est_name: str, sizes: list[int], spec: ModelConfig, images: torch.Tensor, batch: int,
                 device: torch.device, r: int, graph: bool = False):
    """A callable doing one training step of ``r`` runs (seeds 1..r, learning rates spread over a decade):
    the ordinary TrainStep for r = 1, else one ReplicaGroup step; ``graph``: their CUDA-graph versions."""
    from sbn_train.graph import GraphStep
    from sbn_train.replicas import GraphedGroup, ReplicaGroup
    if r == 1:
        step = make(est_name, sizes, spec, images, batch, device)
        return GraphStep(step) if graph else step
    states = []
    for i in range(r):
        torch.manual_seed(i + 1)
        model = new_model(images, sizes, spec).to(device)
        est = build_estimator(est_name, model).to(device)
        states.append(TrainState.create(model, est, images, batch, OptimConfig(lr=1e-4 * 10 ** (i / max(r - 1, 1))),
                                        seed=i + 1))
    group = ReplicaGroup(states)
    return GraphedGroup(group) if graph else group.step


def replicas(args, device, images) -> None:
    """Aggregate steps/s (R runs' steps per second) and peak memory per R, interleaved rounds; on CUDA an
    eager and a graph column per R."""
    rs = [int(v) for v in args.replicas.split(",")]
    names = [n for n in args.estimators.split(",") if n != "marginal_reference"]
    modes = [False, True] if device.type == "cuda" else [False]
    print("R = 1 is the ordinary run (TrainStep, or its GraphStep); R > 1 one ReplicaGroup step (or its graph); "
          "steps/s counts every run's steps")
    cols = [(r, g) for g in modes for r in rs]
    label = {False: "eager", True: "graph"}
    head = [f"R={r} {label[g]}" for r, g in cols] + [f"R={r}/R=1 {label[g]}" for r, g in cols if r != rs[0]]
    if device.type == "cuda":
        head += [f"R={r} peak MB" for r in rs]
    print("| model | estimator | batch | " + " | ".join(head) + " |")
    for model_name in args.models.split(","):
        sizes, spec = model_spec(model_name)
        batch = args.batch or paper_batch(model_name)
        for name in names:
            steps, peaks = {}, {}
            for r, g in cols:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                steps[r, g] = replica_step(name, sizes, spec, images, batch, device, r, graph=g)
                for _ in range(5 if g else 1):                  # a graph: warm-up steps, then the capture
                    steps[r, g]()
                sync(device)
                if device.type == "cuda" and not g:
                    peaks[r] = torch.cuda.max_memory_allocated(device) / 2**20
            times = {c: [] for c in cols}
            for _ in range(args.rounds):
                for c in cols:
                    sync(device)
                    t0 = time.perf_counter()
                    steps[c]()
                    sync(device)
                    times[c].append(time.perf_counter() - t0)
            rate = {(r, g): r / statistics.median(times[r, g]) for r, g in cols}
            row = [model_name, name, str(batch)] + [f"{rate[c]:,.0f}" for c in cols] \
                + [f"{rate[r, g] / rate[rs[0], g]:.2f}x" for r, g in cols if r != rs[0]]
            if device.type == "cuda":
                row += [f"{peaks[r]:,.0f}" for r in rs]
            print("| " + " | ".join(row) + " |", flush=True)
            del steps


def eval_replicas(args, device, images) -> None:
    """Seconds of a group's periodic evaluation (validation bounds as train/eval settings of config.yaml: ELBO
    and K = eval.iwae_k, batches of eval.batch_size) and of its final test (test.elbo_samples and test.iwae_k,
    batches of test.batch_size) on the first ``--eval-rows`` rows, for R models: R standalone evaluations one
    after another (``split_bounds``, what a group did before) and one batched over the R
    (``replica_split_bounds``); R = 1 is the standalone run's. Interleaved rounds, medians."""
    from sbn_train.evaluation import ReplicaModels, replica_split_bounds, split_bounds
    from sbn_train.paths import config_dir
    cfg = OmegaConf.load(config_dir() / "config.yaml")
    phases = {"eval": (int(cfg.eval.batch_size), 1, int(cfg.eval.iwae_k), int(cfg.eval.max_rows)),
              "test": (int(cfg.test.batch_size), int(cfg.test.elbo_samples), int(args.test_k or cfg.test.iwae_k),
                       int(cfg.test.max_rows))}
    rs = [int(v) for v in args.eval_replicas.split(",")]
    data = images[:args.eval_rows]
    for model_name in args.models.split(","):
        sizes, spec = model_spec(model_name)
        models = []
        for i in range(max(rs)):
            torch.manual_seed(i + 1)
            models.append(new_model(images, sizes, spec).to(device))
        print(f"\n## {model_name} (latent {sizes}), {len(data)} rows, {device}, threads {torch.get_num_threads()}, "
              f"load average {os.getloadavg()[0]:.2f} at the start")
        for phase, (batch, samples, k, max_rows) in phases.items():
            def serial(r, batch=batch, samples=samples, k=k, max_rows=max_rows):
                return [split_bounds(m, data, batch, None, 5, samples, k, max_rows) for m in models[:r]]

            def batched(r, batch=batch, samples=samples, k=k, max_rows=max_rows):
                rm = ReplicaModels(models[0], [m.state_dict() for m in models[:r]])
                return replica_split_bounds(rm, data, batch, None, 5, samples, k, max_rows)
            cands = {f"R={r} {kind}": (lambda f=f, r=r: f(r)) for r in rs
                     for kind, f in (("serial", serial), ("batched", batched)) if r > 1 or kind == "serial"}
            times = {c: [] for c in cands}
            for c, f in cands.items():                              # warm-up
                f()
            for _ in range(args.rounds):
                for c, f in cands.items():
                    sync(device)
                    t0 = time.perf_counter()
                    f()
                    sync(device)
                    times[c].append(time.perf_counter() - t0)
            med = {c: statistics.median(v) for c, v in times.items()}
            print(f"{phase} (batch {batch}, ELBO samples {samples}, K {k}), {args.rounds} rounds: median s "
                  f"(min-max); rows/s of all R runs")
            for c, m in med.items():
                r = int(c.split()[0][2:])
                ratio = ""
                if c.endswith("batched"):
                    ratio = f"  serial/batched {med[f'R={r} serial'] / m:.2f}x"
                print(f"  {c:<14} {m:8.2f} s ({min(times[c]):.2f}-{max(times[c]):.2f})  "
                      f"{r * len(data) / m:9,.0f} rows/s{ratio}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(step: TrainStep, device) -> tuple[float, float, float, float]:
    """(minibatch, estimator call, backward, optimizer) seconds of one training step, phase by phase."""
    sync(device)
    t0 = time.perf_counter()
    x = step.batch()
    sync(device)
    t1 = time.perf_counter()
    out = step.estimate(x)
    sync(device)
    t2 = time.perf_counter()
    step.backward(out)
    sync(device)
    t3 = time.perf_counter()
    step.apply(out)
    step.record(out)
    sync(device)
    return t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3


def time_estimators(names, sizes, spec, batch, rounds, images, device, slow_rounds) -> dict:
    steps = {n: make(n, sizes, spec, images, batch, device) for n in names}
    times = {n: [] for n in names}
    for r in range(rounds + 2):                                   # 2 warm-up rounds
        for n in names:
            if n == "marginal_reference" and r >= slow_rounds + 2:
                continue
            t = timed_step(steps[n], device)
            if r >= 2:
                times[n].append(t)
    return {n: [statistics.median(col) * 1e3 for col in zip(*ts)] + [statistics.median(map(sum, ts)) * 1e3]
            for n, ts in times.items()}


def peak_memory_mb(est: str, model: str, batch: int, device: str, data: str, sizes: str | None = None) -> float:
    cmd = [sys.executable, __file__, "--_memory", est, "--models", model, "--batch", str(batch), "--threads", "1",
           "--device", device, "--data", data] + (["--checkpoint", CHECKPOINT] if CHECKPOINT else [])
    if sizes:
        cmd += ["--_sizes", sizes]
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_child(args) -> None:
    device = torch.device(args.device)
    images = load_images(args.data, device)
    sizes, spec = model_spec(args.models)
    if args._sizes:
        sizes = [int(s) for s in args._sizes.split(",")]
    step = make(args._memory, sizes, spec, images, args.batch, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _status_kb("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")            # reset the peak (VmHWM) to the current RSS
    for _ in range(3):
        timed_step(step, device)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _status_kb("VmHWM") * 1024
    print((peak - base) / 2 ** 20)


def headline(args, device, images) -> None:
    names = args.estimators.split(",")
    for model_name in args.models.split(","):
        sizes, spec = model_spec(model_name)
        batch = args.batch or paper_batch(model_name)
        res = time_estimators(names, sizes, spec, batch, args.rounds, images, device, args.slow_rounds)
        mem = {n: peak_memory_mb(n, model_name, batch, args.device, args.data) for n in names} if args.memory else {}
        base = res.get("reinforce", [None] * 5)[4]
        print(f"\n## {model_name} (latent {sizes}, {model_text(spec)}), batch {batch}, {device}")
        print(f"{'estimator':<20}{'batch':>8}{'forward':>10}{'backward':>10}{'optim':>8}{'step ms':>10}"
              f"{'/reinforce':>12}{'peak extra MB':>15}")
        for n in names:
            d, f, b, o, tot = res[n]
            ratio = f"{tot / base:.1f}" if base else "-"
            print(f"{n:<20}{d:>8.2f}{f:>10.2f}{b:>10.2f}{o:>8.2f}{tot:>10.2f}{ratio:>12}"
                  f"{mem.get(n, float('nan')):>15.1f}")
        step = {n: r[4] for n, r in res.items()}
        graph = graph_times(names, sizes, spec, batch, args.rounds, images, device) \
            if device.type == "cuda" else {}
        throughput_table(names, step, graph)
        if graph and "marginal" in graph and "nvil" in graph and graph["marginal"] and graph["nvil"]:
            print(f"ratio marginal/nvil (graph) = {graph['marginal'] / graph['nvil']:.2f}")
        if "marginal" in step and "nvil" in step:
            print(f"ratio marginal/nvil = {step['marginal'] / step['nvil']:.2f}")
        if "marginal" in step and "marginal_reference" in step:
            print(f"ratio marginal_reference/marginal = {step['marginal_reference'] / step['marginal']:.1f}")
        if spec.family == "categorical" and (spec.hidden or spec.n_hidden) and "marginal" in step:
            floor = floor_ms(sizes, spec, images, batch, args.rounds, device)
            print(f"floor (every alternative's rows through the generative nets that read its layer, one batched "
                  f"product per layer) = {floor:.2f} ms; ratio marginal/floor = {step['marginal'] / floor:.2f}")


def floor_ms(sizes, spec, images, batch, rounds, device) -> float:
    """The categorical marginal step's floor on a model whose nets have MLP tails (on a linear one the
    comparison is marginal/nvil against sbn_2layer's): for every layer l, the B*H_l*(K-1) alternatives' rows (first-layer
    pre-activations of the generative net that reads layer l, built before timing) through that net's MLP
    tail and the log-likelihood of the layer below, as one batched product per layer (for the VAE: 180 x B rows
    through 256-512-784 and the Bernoulli log-likelihood of x). Median ms over ``rounds``."""
    torch.manual_seed(0)
    model = new_model(images, sizes, spec).to(device)
    x = (images[:batch] > 0.5).to(images.dtype)
    K = model.family.classes
    with torch.no_grad():
        zs = model.sample_q(x, model.draw_uniforms(batch))
        below = [x] + zs[:-1]
        rows = [model.p_nets[l].first(zs[l]).repeat_interleave(h * (K - 1), 0) for l, h in enumerate(sizes)]
        targets = [v.repeat_interleave(h * (K - 1), 0) for v, h in zip(below, sizes)]
    times = []
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            for l, (r, v) in enumerate(zip(rows, targets)):
                model.log_prob_below(l, v, model.p_nets[l].tail(r))
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


RUN_STEPS = 2_000_000    # the paper's run length for the linear and deep models


def graph_times(names, sizes, spec, batch, rounds, images, device) -> dict[str, float | None]:
    """ms per step of the CUDA-graph replay of the same step (None where it cannot be captured)."""
    from sbn_train.graph import WARMUP_STEPS, GraphStep, graph_unsupported_reason
    out: dict[str, float | None] = {}
    for n in names:
        step = make(n, sizes, spec, images, batch, device)
        if graph_unsupported_reason(step.state) is not None:
            out[n] = None
            continue
        g = GraphStep(step)
        for _ in range(WARMUP_STEPS + 3):                        # warm-up steps, capture, first replays
            g()
        if g.failed:
            out[n] = None
            continue
        reps = max(50, rounds * 10)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            g()
        sync(device)
        out[n] = (time.perf_counter() - t0) / reps * 1e3
    return out


def throughput_table(names, eager_ms: dict[str, float], graph_ms: dict[str, float | None]) -> None:
    """Steps per second and the hours a 2M-step run implies, from the step times above."""
    cols = ["eager"] + (["graph"] if graph_ms else [])
    print(f"{'estimator':<20}" + "".join(f"{c + ' steps/s':>16}{c + ' h/2M':>12}" for c in cols))
    for n in names:
        row = f"{n:<20}"
        for ms in [eager_ms[n]] + ([graph_ms.get(n)] if graph_ms else []):
            if ms:
                row += f"{1e3 / ms:>16.1f}{RUN_STEPS * ms / 3.6e6:>12.2f}"
            else:
                row += f"{'eager only':>16}{'-':>12}"
        print(row)


def concurrency(args, device) -> None:
    """k runs at once (separate processes, as hydra/launcher=joblib runs them), each timing the training
    step for the same wall-clock window; prints the aggregate steps/s for each k."""
    model_name = args.models.split(",")[0]
    batch = args.batch or paper_batch(model_name)
    for est in args.estimators.split(","):
        print(f"\n## {k_list_text(args.concurrent)} concurrent runs of {est}, {model_name}, batch {batch}, {device}")
        print(f"{'k':>4}{'steps/s each':>16}{'aggregate steps/s':>20}{'vs k=1':>10}")
        base = None
        for k in [int(v) for v in args.concurrent.split(",")]:
            start = time.time() + args.warmup_seconds
            cmd = [sys.executable, __file__, "--_worker", est, "--models", model_name, "--batch", str(batch),
                   "--device", args.device, "--data", args.data, "--_start", str(start),
                   "--_seconds", str(args.window_seconds), "--threads", str(args.threads or 1)]
            procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ)
                     for _ in range(k)]
            rates = []
            for p in procs:
                out, err = p.communicate()
                if p.returncode != 0:
                    raise RuntimeError(err[-2000:])
                rates.append(float(out.strip().splitlines()[-1]))
            total = sum(rates)
            base = base or total
            print(f"{k:>4}{total / k:>16.1f}{total:>20.1f}{total / base:>10.2f}")


def k_list_text(spec: str) -> str:
    return "/".join(spec.split(","))


def worker(args) -> None:
    """One of the concurrent runs: warm up, then count steps in the common window."""
    device = torch.device(args.device)
    images = load_images(args.data, device)
    sizes, spec = model_spec(args.models)
    step = make(args._worker, sizes, spec, images, args.batch, device)
    if device.type == "cuda":
        from sbn_train.graph import GraphStep, graph_unsupported_reason
        if graph_unsupported_reason(step.state) is None:
            step = GraphStep(step)
    for _ in range(6):
        step()
    sync(device)
    while time.time() < args._start:
        step()
    sync(device)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args._seconds:
        for _ in range(10):
            step()
        n += 10
    sync(device)
    print(n / (time.perf_counter() - t0))


def scaling(args, device, images) -> None:
    print("\n## marginal step vs batch size (sbn_2layer, latent [200, 200])")
    print(f"{'batch':>6}{'step ms':>10}{'ms per 1k B*H*(D+H)':>22}{'peak extra MB':>15}")
    for batch in (20, 100, 400, 1000):
        t = time_estimators(["marginal"], [200, 200], model_spec("sbn_2layer")[1], batch, args.rounds, images, device, 0)["marginal"][4]
        mem = peak_memory_mb("marginal", "sbn_2layer", batch, args.device, args.data) if args.memory else float("nan")
        work = batch * 200 * (784 + 200) / 1e3
        print(f"{batch:>6}{t:>10.2f}{t / work:>22.5f}{mem:>15.1f}")
    print("\n## marginal step vs layer width (two layers of width H, batch 100)")
    print(f"{'H':>6}{'step ms':>10}{'ms per 1k B*H*(D+H)':>22}")
    for h in (50, 200, 500):
        t = time_estimators(["marginal"], [h, h], model_spec("sbn_2layer")[1], 100, args.rounds, images, device, 0)["marginal"][4]
        print(f"{h:>6}{t:>10.2f}{t / (100 * h * (784 + h) / 1e3):>22.5f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="sbn_2layer")
    ap.add_argument("--estimators", default="reinforce,nvil,marginal,marginal_reference")
    ap.add_argument("--batch", type=int, default=0, help="0: the paper's batch size for the model")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--slow-rounds", type=int, default=3, help="rounds for marginal_reference")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data", default="mnist", choices=["mnist", "random"])
    ap.add_argument("--no-memory", dest="memory", action="store_false")
    ap.add_argument("--scaling", action="store_true")
    ap.add_argument("--checkpoint", help="time the model weights of this checkpoint (a run of the same model) "
                                         "instead of the initialization")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--concurrent", help="k1,k2,...: aggregate steps/s of k runs at once (e.g. 1,2,4,8)")
    ap.add_argument("--warmup-seconds", type=float, default=20.0, help="concurrency mode: start-up allowance")
    ap.add_argument("--window-seconds", type=float, default=10.0, help="concurrency mode: timed window")
    ap.add_argument("--replicas", help="R1,R2,...: replica groups, aggregate steps/s per R (e.g. 1,4,16,64)")
    ap.add_argument("--eval-replicas", help="R1,R2,...: a group's evaluation and final test, R standalone ones "
                    "in turn against one batched over R (e.g. 1,4)")
    ap.add_argument("--eval-rows", type=int, default=1000, help="--eval-replicas: data rows evaluated")
    ap.add_argument("--test-k", type=int, default=0, help="--eval-replicas: K of the test bound (0: config.yaml's)")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_start", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--_seconds", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--_memory", help=argparse.SUPPRESS)
    ap.add_argument("--_sizes", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global CHECKPOINT
    CHECKPOINT = args.checkpoint
    if CHECKPOINT and not Path(CHECKPOINT).is_file():
        sys.exit(f"bench_step.py: no checkpoint at {CHECKPOINT}")
    if CHECKPOINT:
        try:
            load_checkpoint(Path(CHECKPOINT), torch.device("cpu"))["model"]
        except (RunError, KeyError) as e:
            sys.exit(f"bench_step.py: {e}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._memory:
        return memory_child(args)
    if args._worker:
        return worker(args)
    device = torch.device(args.device)
    cap = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, device {device}, CPU capability {cap}, threads {torch.get_num_threads()}")
    images = load_images(args.data, device)
    if args.eval_replicas:
        eval_replicas(args, device, images)
    elif args.replicas:
        replicas(args, device, images)
    elif args.concurrent:
        concurrency(args, device)
    elif args.scaling:
        scaling(args, device, images)
    else:
        headline(args, device, images)


if __name__ == "__main__":
    main()
