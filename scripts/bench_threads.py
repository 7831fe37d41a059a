"""CPU threads on a busy machine: the marginal and nvil training steps and one evaluation, timed while 0, 1
and 3 other CPU-bound processes run, for torch's default thread count and for the ``threads`` policy
(sbn_train/threads.py), side by side in one run.

    python scripts/bench_threads.py                      # loads 0,1,3; the table of the README
    python scripts/bench_threads.py --loads 0,3 --rounds 8 --eval-rows 500
    python scripts/bench_threads.py --sweep              # also: 2 runs at once against the same 2 in turn

One process per load level runs sbn_2layer, batch 100, on random images (784 pixels) and alternates the
thread counts round by round (torch.set_num_threads), so that the background load hits them alike: per
round and count one marginal and one nvil step (medians over rounds, after 2 warm-up rounds), and on
some rounds an evaluation (ELBO and IWAE, K = 50, of ``--eval-rows`` rows; median of ``--evals``). The busy
processes are pure-Python loops, one core each, started before and ended after each load level. Settings:

* ``torch default``: torch's own thread count (one per core), OpenMP's default wait policy (spinning): what
  the CLI did before the ``threads`` key;
* ``threads=auto``: the policy for a single run (usable cores / 1); the same count as torch's default
  where the process may use every core, and then the same measurement;
* ``threads=1``;
* ``threads=auto, OMP passive * (CLI)`` and ``threads=1, OMP passive *``: with ``OMP_WAIT_POLICY=PASSIVE``
  (OpenMP's idle threads sleep at once instead of spinning; the CLI sets it unless it is set), the first
  what the CLI does now; the environment variable must be set before
  torch starts, so these two alternate in a second process, after the first. Each row also gives its
  times over those of threads=1 in the same process: a ratio that the drift of the background load
  between the two processes does not enter.

``--sweep`` also times 2 processes started at once (a 2-job joblib sweep), each doing the same work, with
torch's default threads and with the CLI's (usable cores / 2, passive wait policy), against the same 2 one after the other,
and prints the wall times and their ratio. The load average printed is the machine's (1 minute) when a
load level's measurements start: it includes whatever else the machine runs.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}


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

    default = torch.get_num_threads()
    counts = list(dict.fromkeys(c or default for c in map(int, args.counts.split(","))))
    images = torch.rand(5000, 784, generator=torch.Generator().manual_seed(0))
    steps = {}
    for name in ("marginal", "nvil"):
        torch.manual_seed(0)
        model = SBN(784, [200, 200], 0, x_mean=images.mean(0))
        est = build_estimator(name, model)
        state = TrainState.create(model, est, images, 100, OptimConfig(lr=1e-4), seed=1)
        state.estimator.train()
        steps[name] = TrainStep(state)
    model = steps["marginal"].state.model
    times = {(c, n): [] for c in counts for n in steps}
    evals = {c: [] for c in counts}
    for r in range(args.rounds + 2):                  # every round: each thread count in turn
        for c in counts:
            torch.set_num_threads(c)
            for n, step in steps.items():
                t0 = time.perf_counter()
                step()
                if r >= 2:
                    times[c, n].append(time.perf_counter() - t0)
            if r >= 2 and (r - 2) % max(args.rounds // args.evals, 1) == 0 and len(evals[c]) < args.evals:
                t0 = time.perf_counter()
                with torch.no_grad():
                    evaluate(model, images[:args.eval_rows], EvalConfig(limit=args.eval_rows, iwae_k=50), "valid")
                evals[c].append(time.perf_counter() - t0)
    print(json.dumps({"default": default, "results": {
        str(c): {"eval_s": statistics.median(evals[c]),
                 **{n: 1e3 * statistics.median(times[c, n]) for n in steps}} for c in counts}}), flush=True)


def child_cmd(args: argparse.Namespace, counts: str) -> list[str]:
    return [sys.executable, __file__, "--_child", "--counts", counts, "--rounds", str(args.rounds),
            "--evals", str(args.evals), "--eval-rows", str(args.eval_rows)]


def child_env(env: dict | None) -> dict:
    """This environment without OMP_WAIT_POLICY (OpenMP's default), plus ``env``."""
    return {**{k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}, **(env or {})}


def measure(args, counts: str, env: dict | None = None) -> dict:
    out = subprocess.run(child_cmd(args, counts), capture_output=True, text=True, env=child_env(env))
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
    ap.add_argument("--rounds", type=int, default=12, help="timed rounds (one step of each estimator per count)")
    ap.add_argument("--evals", type=int, default=3, help="timed evaluations per thread count")
    ap.add_argument("--eval-rows", type=int, default=1000, help="rows of a timed evaluation")
    ap.add_argument("--sweep", action="store_true", help="also time 2 runs at once against 2 in turn")
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--counts", default="0", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        child(args)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))       # the busy processes end with this one
    sys.path.insert(0, str(ROOT))
    from sbn_train.threads import choose_threads, usable_cores
    cores = usable_cores()
    auto, why = choose_threads("auto", None)
    sweep2, why2 = choose_threads("auto", {"_target_": "joblib", "n_jobs": 2})
    print(f"{cores} usable cores; threads=auto of one run: {auto} ({why}); {args.rounds} rounds, "
          f"{args.evals} evaluations of {args.eval_rows} rows per setting; sbn_2layer, batch 100")
    print(f"{'busy':>4} {'load avg':>8}  {'setting':<34} {'marginal ms':>11} {'nvil ms':>8} {'eval s':>7}   "
          f"{'/ threads=1 (m, n, e)':<17}")
    idle: dict[str, dict] = {}
    for load in map(int, args.loads.split(",")):
        procs = busy(load)
        try:
            time.sleep(2.0)
            la = os.getloadavg()[0]
            mixed = measure(args, f"0,{auto},1")
            passive = measure(args, f"{auto},1", PASSIVE)
        finally:
            stop(procs)
        d = mixed["default"]
        rows = [(f"torch default ({d} threads)", mixed["results"][str(d)], mixed["results"]["1"]),
                (f"threads=auto ({auto})", mixed["results"][str(auto)], mixed["results"]["1"]),
                ("threads=1", mixed["results"]["1"], mixed["results"]["1"]),
                (f"threads=auto, OMP passive * (CLI)", passive["results"][str(auto)], passive["results"]["1"]),
                (f"threads=1, OMP passive *", passive["results"]["1"], passive["results"]["1"])]
        for label, r, one in rows:
            vs_one = f"{r['marginal'] / one['marginal']:>5.2f} {r['nvil'] / one['nvil']:>5.2f} {r['eval_s'] / one['eval_s']:>5.2f}"
            if load == 0:
                idle[label] = r
            base = idle.get(label)
            rel = (f"  x{r['marginal'] / base['marginal']:.1f} / x{r['nvil'] / base['nvil']:.1f} / "
                   f"x{r['eval_s'] / base['eval_s']:.1f} of 0 busy") if base and load else ""
            print(f"{load:>4} {la:>8.2f}  {label:<34} {r['marginal']:>11.1f} {r['nvil']:>8.1f} "
                  f"{r['eval_s']:>7.2f}   {vs_one}{rel}", flush=True)
    print("(the settings without * alternate round by round in one process, those with * in a second process\n"
          " after it; '/ threads=1': time over threads=1's in the same process, marginal, nvil, evaluation)")
    if args.sweep:
        print(f"\n2 runs at once (a 2-job sweep) against the same 2 in turn; policy: {sweep2} threads ({why2})")
        for label, counts, env in (("torch default", "0", None),
                                   (f"threads=auto ({sweep2}), passive", str(sweep2), PASSIVE)):
            t0 = time.perf_counter()
            for _ in range(2):
                measure(args, counts, env)
            in_turn = time.perf_counter() - t0
            la = os.getloadavg()[0]
            t0 = time.perf_counter()
            procs = [subprocess.Popen(child_cmd(args, counts), stdout=subprocess.DEVNULL, env=child_env(env))
                     for _ in range(2)]
            for p in procs:
                p.wait()
            at_once = time.perf_counter() - t0
            print(f"  {label:<22} in turn {in_turn:6.1f} s, at once {at_once:6.1f} s: at once / in turn = "
                  f"{at_once / in_turn:.2f} (load avg {la:.2f} before)", flush=True)


if __name__ == "__main__":
    main()
