"""How many CPU threads a run gives torch (the ``threads`` key; ``auto`` by default).

``auto``: the cores this process may use (its CPU affinity, which a SLURM allocation or ``taskset``
narrows) divided by the number of runs its launcher starts at once on this machine, at least 1:

* one run, or a sweep of Hydra's basic launcher (one run after the other): 1 run at once;
* ``hydra/launcher=local`` (joblib): ``hydra.launcher.n_jobs`` runs at once (-1: one per core, -2: all
  cores but one, as joblib counts);
* ``hydra/launcher=slurm`` or ``submitit_local``: each job has ``cpus_per_task`` cores of its own
  (``SLURM_CPUS_PER_TASK`` inside a SLURM job).

An ``OMP_NUM_THREADS`` in the environment that is lower is kept (a site's or a test's choice; joblib's
workers get cores // n_jobs there, the same count).

Torch's own default is one thread per core in every process, whatever else runs: two sweep workers on
two cores then run four threads, and a parallel region waits for whichever thread the kernel has
descheduled. ``threads=N`` sets the count outright.
"""
from __future__ import annotations

import os
from typing import Any, Mapping


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):             # not on Linux
        return max(os.cpu_count() or 1, 1)


def parse_threads(value: Any) -> int | None:
    """``None`` for ``auto``, else the positive int ``value`` names; :class:`ValueError` otherwise."""
    text = str(value).strip()
    if text.lower() == "auto":
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1 or str(n) != text.lstrip("+"):
        raise ValueError(f"threads must be auto or a positive whole number of CPU threads, got {value!r}")
    return n


def runs_at_once(launcher: Mapping | None, cores: int) -> tuple[int, str]:
    """(runs sharing this machine's ``cores`` at once, how that was found) for a Hydra launcher config
    (``hydra.launcher``: its ``_target_`` and options); ``None``: a plain run."""
    target = str((launcher or {}).get("_target_", ""))
    if "joblib" in target.lower():
        n_jobs = launcher.get("n_jobs")
        n_jobs = 1 if n_jobs in (None, 0) else int(n_jobs)
        at_once = n_jobs if n_jobs > 0 else max(cores + 1 + n_jobs, 1)
        return max(at_once, 1), f"hydra.launcher.n_jobs={n_jobs}"
    return 1, "one run at a time"


def auto_threads(launcher: Mapping | None, environ: Mapping[str, str] = os.environ,
                 cores: int | None = None) -> tuple[int, str]:
    """(threads, a phrase saying why) of the ``auto`` policy."""
    cores = usable_cores() if cores is None else cores
    target = str((launcher or {}).get("_target_", ""))
    if "submitit" in target.lower():
        per_task = environ.get("SLURM_CPUS_PER_TASK") or (launcher or {}).get("cpus_per_task")
        if per_task:
            n = max(min(int(per_task), cores), 1)
            return n, f"cpus_per_task={int(per_task)}, {cores} usable cores"
    at_once, why = runs_at_once(launcher, cores)
    n, why = max(cores // at_once, 1), f"{cores} usable cores / {at_once} runs at once ({why})"
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and 0 < int(omp) < n:        # a lower count set in the environment is kept
        return int(omp), f"OMP_NUM_THREADS={int(omp)}; {why}"
    return n, why


def choose_threads(setting: Any, launcher: Mapping | None, environ: Mapping[str, str] = os.environ,
                   cores: int | None = None) -> tuple[int, str]:
    """(threads, why) for the ``threads`` key's value."""
    n = parse_threads(setting)
    if n is not None:
        return n, "threads=" + str(n)
    n, why = auto_threads(launcher, environ, cores)
    return n, f"threads=auto: {why}"
