"""The jobs of a local sweep share one machine safely: a sweep killed with ``kill -9`` leaves no workers
behind (each saves its step on the SIGTERM it gets when the sweep's process dies, and the sweep resumes),
and runs that load a dataset for the first time at once download and build its cache once."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from test_cli import ONE_THREAD, SMALL, sbn_train
from test_data import md5_of, write_fashion_raw

from sbn_train.data import fashion_mnist

ESTIMATORS = ("nvil", "reinforce")
RUN = [*SMALL, "train.eval_every=200", "variance.every=0", "device=cpu"]


def alive(pid: int) -> bool:
    """Running (a zombie, waiting for a reaper now that its parent is gone, is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def lock_pid(folder: Path) -> int | None:
    try:
        text = (folder / "run.lock").read_text().strip()
    except OSError:
        return None
    return int(text) if text else None


def test_killed_sweep_leaves_no_workers_and_resumes(tmp_path):
    sweep = tmp_path / "sweep"
    folders = [sweep / f"estimator={e}" for e in ESTIMATORS]
    # the console script, as a user starts it (its workers see its sys.argv: they must not take its place)
    args = [str(Path(sys.executable).parent / "sbn-train"), "-m", "hydra/launcher=local",
            f"estimator={','.join(ESTIMATORS)}", *RUN, "train.max_steps=1000000", f"hydra.sweep.dir={sweep}"]
    workers: list[int] = []
    with open(tmp_path / "stderr", "w") as err:
        main = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, **ONE_THREAD})
        try:
            deadline = time.monotonic() + 90
            # both runs are in their training loop: each has a pid in run.lock and a first checkpoint
            while not all(lock_pid(f) and (f / "checkpoint.pt").exists() for f in folders):
                assert main.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr").read_text()
                time.sleep(0.1)
            workers = [lock_pid(f) for f in folders]
            assert main.pid not in workers and all(alive(w) for w in workers)
            main.kill()                                              # kill -9: no handler runs in it
            main.wait()
            deadline = time.monotonic() + 30
            while any(alive(w) for w in workers) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not any(alive(w) for w in workers), "workers outlived the sweep's process"
        finally:
            for w in workers:
                if alive(w):
                    os.kill(w, signal.SIGKILL)
    # each worker saved its step on the SIGTERM and said where it stopped
    stderr = (tmp_path / "stderr").read_text()
    stopped = sorted(int(n) for n in re.findall(r"stopped at step (\d+) \(SIGTERM\)", stderr))
    saved = sorted(torch.load(f / "checkpoint.pt", weights_only=True)["step"] for f in folders)
    assert len(stopped) == 2 and stopped == saved, stderr[-3000:]

    steps = max(saved) + 50                                          # a short rest of the runs
    resumed = sbn_train("-m", "hydra/launcher=local", f"estimator={','.join(ESTIMATORS)}", *RUN,
                        f"train.max_steps={steps}", f"hydra.sweep.dir={sweep}", "train.resume=true", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for f in folders:
        step = torch.load(f / "checkpoint.pt", weights_only=True)["step"]
        assert json.loads((f / "results.json").read_text())["step"] == steps == step
        assert re.search(r"resumed from .* at step [1-9]", (f / "cli.log").read_text())


# Each process: imports, waits for the others, loads fashion_mnist; its "download" (the raw files are
# there, the wrapper stands in for the network) is slow, so without a lock every process would build.
LOADER = """
import json, os, sys, time
from pathlib import Path
from sbn_train.data import fashion_mnist, load_dataset
root, table, count, go = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
fashion_mnist.FASHION_MNIST_MD5 = table
fetch = fashion_mnist.ensure_raw_files
def slow_fetch(*args, **kwargs):
    with open(count, "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(1.0)
    return fetch(*args, **kwargs)
fashion_mnist.ensure_raw_files = slow_fetch
Path(f"{go}.{os.getpid()}").touch()
while not go.exists():
    time.sleep(0.01)
s = load_dataset("fashion_mnist", root, n_valid=4)
print(float(s.train.sum()), float(s.valid.sum()), float(s.test.sum()))
"""


def test_concurrent_first_loads_build_the_cache_once(tmp_path):
    data = tmp_path / "data"
    raw = data / "fashion_mnist" / "raw"
    write_fashion_raw(raw)
    table = json.dumps({f: md5_of(raw / f) for f in fashion_mnist.FASHION_MNIST_MD5})
    count, go = tmp_path / "builds", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", LOADER, str(data), table, str(count), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **ONE_THREAD}) for _ in range(4)]
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("go.*"))) < 4:                 # all four imported: start together
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
            time.sleep(0.05)
        go.touch()
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    assert len(count.read_text().split()) == 1                      # one process built, three waited
    assert len({o for o, _ in outs}) == 1                            # and all loaded the same splits
    assert (data / "fashion_mnist" / "fashion_mnist.pt").exists()
