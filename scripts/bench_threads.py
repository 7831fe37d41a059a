"""CPU threads on a busy machine: the marginal and nvil training steps and one evaluation, timed while 0, 1
and 3 other CPU-bound processes run, for torch's default thread count and for the ``threads`` policy
(sbn_train/threads.py), side by side in one run.

    python scripts/bench_threads.py                      # loads 0,1,3; the headline table of the README
    python scripts/bench_threads.py --loads 0,3 --rounds 10 --eval-rows 500
    python scripts/bench_threads.py --sweep              # also: 2 runs at once against the same 2 in turn

Each measurement runs in a fresh process (torch fixes OpenMP's settings when it starts), on sbn_2layer,
batch 100, random images (784 pixels): per round one marginal and one nvil step (interleaved; medians over
rounds, after 2 warm-up rounds), then one evaluation (ELBO and IWAE, K = 50, of ``--eval-rows`` rows).
The busy processes are pure-Python loops, one core each; they are started before and ended after each
load level. Settings compared ("policy" is ``threads=auto`` of a single run, or what it gives a sweep):

* ``torch default``: torch's own thread count (one per core);
* ``threads=auto``: the policy for a single run (here: usable cores / 1);
* ``threads=1``;
* ``threads=auto, OMP passive``: as ``threads=auto`` with ``OMP_WAIT_POLICY=PASSIVE`` (OpenMP's idle
  threads sleep at once instead of spinning).

``--sweep`` also times 2 processes started at once (a 2-job joblib sweep) doing the same work, with torch's
default threads and with the policy's (usable cores / 2), against the same 2 one after the other; it prints
the wall times and their ratio. The load average printed is the machine's before each load level starts.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(args: argparse.Namespace) -> None:
    """One measurement: print a JSON line of medians (ms per step) and the evaluation's seconds."""
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")   # as the CLI does
    import torch
    sys.path.insert(0, str(ROOT))
    from sbn_train.config import EvalConfig, OptimConfig
    from sbn_train.estimators import build_estimator
    from sbn_train.jobs import evaluate
    from sbn_train.models import SBN
    from sbn_train.state import TrainState
    from sbn_train.train import TrainStep

    if args.threads:
        torch.set_num_threads(args.threads)
    images = torch.rand(5000, 784, generator=torch.Generator().manual_seed(0))
    steps = {}
    for name in ("marginal", "nvil"):
        torch.manual_seed(0)
        model = SBN(784, [200, 200], 0, x_mean=images.mean(0))
        est = build_estimator(name, model)
        state = TrainState.create(model, est, images, 100, OptimConfig(lr=1e-4), seed=1)
        state.estimator.train()
        steps[name] = TrainStep(state)
    times = {n: [] for n in steps}
    t_start = time.perf_counter()
    for r in range(args.rounds + 2):
        for n, step in steps.items():
            t0 = time.perf_counter()
            step()
            if r >= 2:
                times[n].append(time.perf_counter() - t0)
    work = time.perf_counter() - t_start
    model = steps["marginal"].state.model
    t0 = time.perf_counter()
    with torch.no_grad():
        evaluate(model, images[:args.eval_rows], EvalConfig(limit=args.eval_rows, iwae_k=50), "valid")
    eval_s = time.perf_counter() - t0
    print(json.dumps({"threads": torch.get_num_threads(), "eval_s": eval_s, "steps_s": work,
                      **{n: 1e3 * statistics.median(t) for n, t in times.items()}}), flush=True)


def child_cmd(args: argparse.Namespace, threads: int) -> list[str]:
    return [sys.executable, __file__, "--_child", "--threads", str(threads), "--rounds", str(args.rounds),
            "--eval-rows", str(args.eval_rows)]


def measure(args, threads: int, env: dict | None = None) -> dict:
    out = subprocess.run(child_cmd(args, threads), capture_output=True, text=True, env={**os.environ, **(env or {})})
    if out.returncode:
        sys.exit(f"bench_threads: a measurement failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--loads", default="0,1,3", help="numbers of busy processes, comma-separated")
    ap.add_argument("--rounds", type=int, default=15, help="timed rounds (one step of each estimator)")
    ap.add_argument("--eval-rows", type=int, default=1000, help="rows of the timed evaluation")
    ap.add_argument("--sweep", action="store_true", help="also time 2 runs at once against 2 in turn")
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        child(args)
        return
    sys.path.insert(0, str(ROOT))
    from sbn_train.threads import choose_threads, usable_cores
    cores = usable_cores()
    auto, why = choose_threads("auto", None)
    sweep2, why2 = choose_threads("auto", {"_target_": "joblib", "n_jobs": 2})
    settings = [("torch default", 0, None), ("threads=auto", auto, None), ("threads=1", 1, None),
                ("threads=auto, OMP passive", auto, {"OMP_WAIT_POLICY": "PASSIVE"})]
    print(f"{cores} usable cores; threads=auto: {auto} ({why}); {args.rounds} rounds, evaluation of "
          f"{args.eval_rows} rows; sbn_2layer, batch 100")
    print(f"{'busy':>4} {'load avg':>8}  {'setting':<27} {'thr':>3} {'marginal ms':>11} {'nvil ms':>8} {'eval s':>7}")
    idle: dict[str, dict] = {}
    for load in map(int, args.loads.split(",")):
        procs = busy(load)
        try:
            time.sleep(1.0)
            la = os.getloadavg()[0]
            for label, threads, env in settings:
                r = measure(args, threads, env)
                idle.setdefault(label, r) if load == 0 else None
                base = idle.get(label)
                rel = (f"  (x{r['marginal'] / base['marginal']:.1f} / x{r['nvil'] / base['nvil']:.1f} / "
                       f"x{r['eval_s'] / base['eval_s']:.1f} of idle)") if base and load else ""
                print(f"{load:>4} {la:>8.2f}  {label:<27} {r['threads']:>3} {r['marginal']:>11.1f} "
                      f"{r['nvil']:>8.1f} {r['eval_s']:>7.2f}{rel}", flush=True)
        finally:
            stop(procs)
    if args.sweep:
        print(f"\n2 runs at once (a 2-job sweep) against the same 2 in turn; policy: {sweep2} threads ({why2})")
        for label, threads in (("torch default", 0), ("threads=auto (2 jobs)", sweep2)):
            t0 = time.perf_counter()
            for _ in range(2):
                measure(args, threads)
            in_turn = time.perf_counter() - t0
            t0 = time.perf_counter()
            procs = [subprocess.Popen(child_cmd(args, threads), stdout=subprocess.DEVNULL) for _ in range(2)]
            for p in procs:
                p.wait()
            at_once = time.perf_counter() - t0
            print(f"  {label:<22} in turn {in_turn:6.1f} s, at once {at_once:6.1f} s: "
                  f"at once / in turn = {at_once / in_turn:.2f} (load avg {os.getloadavg()[0]:.2f})", flush=True)


if __name__ == "__main__":
    main()
