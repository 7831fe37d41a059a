"""What a sweep job sets up before its run (:func:`setup_job`, the first call of the CLI's task).

* A worker process of the sweep (``hydra/launcher=local``: joblib's loky workers, children of the sweep's
  process) gets SIGTERM when the sweep's process dies (:func:`sbn_train.lock.die_with_parent`): it saves
  its step and stops, and then the process ends, so a sweep killed with ``kill -9`` leaves no workers
  behind. The CLI exports the sweep's pid in :data:`MAIN_PID_ENV`.
* A job of Hydra's submitit launcher (``hydra/launcher=slurm``, ``submitit_local``) continues its run by
  itself when it is restarted. On the preemption signal (SIGUSR2: sent by SLURM on preemption and
  ``signal_delay_s`` before the time limit) the training loop saves its step, then calls submitit's
  handler (:mod:`sbn_train.signals`), which asks the launcher for the call to run next (the job's own
  call) and requeues the job. That call is given ``train.resume=true`` here, in the job's process, so the
  new attempt resumes from the checkpoint instead of refusing a folder that holds a run
  (``train.overwrite`` is dropped: it would discard the saved steps; neither key names the run folder).
  The job's pickle is rewritten the same way, for restarts that SLURM makes by itself.
* This project's submitit launchers (hydra_plugins/sbn_train_submitit) submit one job per replica group:
  its call holds the overrides of every job of the group, and each of them is given ``train.resume=true``,
  so a requeued group resumes every one of its runs.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)

#: the pid of the process the user started (exported by the CLI); a job in a child of it is a sweep worker
MAIN_PID_ENV = "SBN_TRAIN_MAIN_PID"
#: the override a requeued job runs with
RESUME = "train.resume=true"
_DROPPED = ("train.resume", "train.overwrite")
_SUBMITIT_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.BaseSubmititLauncher"


#: the module of this project's launchers (one submitit job per replica group), once Hydra's scan has loaded it
GROUP_LAUNCHER_MODULE = "hydra_plugins.sbn_train_submitit.group_launcher"


def register_launchers() -> None:
    """Make ``hydra/launcher=submitit_slurm`` and ``submitit_local`` this project's launchers, which submit one
    job per replica group (hydra_plugins/sbn_train_submitit), in this process only. Hydra's plugin scan
    (once per process) stores the plugin's own configs of those names, so it runs first; other Hydra apps of
    the environment keep the plugin's launchers. Nothing changes when the plugin folder is not found."""
    from hydra.core.plugins import Plugins
    Plugins.instance()
    module = sys.modules.get(GROUP_LAUNCHER_MODULE)
    if module is not None:
        module.register(shadow=True)


def setup_job() -> None:
    """Called first in every job, in the process that runs it."""
    if started_by_sweep():
        from hydra.core.hydra_config import HydraConfig

        from .lock import LOCK, die_with_parent
        die_with_parent()
        _exit_when_orphaned(Path(HydraConfig.get().runtime.output_dir) / LOCK)
    resume_when_requeued()


#: the run lock of the job this worker runs now, for :func:`_watch_parent`
_current_lock: list[Path] = []


def _exit_when_orphaned(lock: Path) -> None:
    """End this worker process once its sweep's process is gone and its run has saved. The run stops on
    the SIGTERM that :func:`die_with_parent` brings, but the worker would then wait for its next job, from
    a parent that no longer exists (loky's idle timeout: minutes, holding memory and any GPU context)."""
    first = not _current_lock
    _current_lock[:] = [lock]
    if first:
        import threading
        threading.Thread(target=_watch_parent, args=(os.getppid(),), name="sbn-train-orphan", daemon=True).start()


def _watch_parent(parent: int) -> None:
    import fcntl
    import time

    while os.getppid() == parent:
        time.sleep(0.5)
    try:
        from .lock import open_lock_file
        fd = open_lock_file(_current_lock[0])
        fcntl.flock(fd, fcntl.LOCK_EX)            # held by the run until it has saved and stopped
    except (OSError, RuntimeError):               # no folder (or no lock) to wait for: nothing to save either
        pass
    time.sleep(1.0)                               # the job's thread prints where it stopped
    os._exit(128 + signal.SIGTERM)


def started_by_sweep() -> bool:
    """True in a worker process that the sweep's own process started (joblib's loky workers). Submitit's
    jobs are not: their parent is submitit's job controller or SLURM, made to outlive the sweep's process."""
    main = os.environ.get(MAIN_PID_ENV)
    return main is not None and main != str(os.getpid()) and main == str(os.getppid())


def resume_overrides(overrides: Sequence[str]) -> list[str]:
    """A job's overrides with ``train.resume=true`` in place of any ``train.resume``/``train.overwrite``."""
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in _DROPPED]
    return [*kept, RESUME]


def resume_when_requeued() -> bool:
    """In a job of Hydra's submitit launcher (or of this project's, one job per replica group): make every
    later attempt of the job run with ``train.resume=true`` (each run of a group). Returns whether it did
    (False outside such a job)."""
    found = _submitit_submission()
    if found is None:
        return False
    delayed, pickle_path = found
    overrides, *rest = delayed.args
    if _is_overrides(overrides):
        delayed.args = (resume_overrides(overrides), *rest)
    else:                                         # a replica group: the overrides of each of its jobs
        delayed.args = ([resume_overrides(job) for job in overrides], *rest)
    # A restart that submitit does not drive (SLURM requeueing a job by itself after a node failure, or
    # on a preemption that sends SIGTERM only) reloads the job's pickle: it resumes too.
    from submitit import JobEnvironment
    from submitit.core.utils import temporary_save_path
    if JobEnvironment().global_rank != 0:         # one writer: the task that submitit lets requeue
        return True
    try:
        with temporary_save_path(pickle_path) as tmp:
            delayed.dump(tmp)
    except OSError as e:
        log.warning("cannot update %s (%s): a restart of this job by SLURM would not resume by itself",
                    pickle_path, e.strerror or e)
    return True


def _submitit_submission() -> tuple[Any, Path] | None:
    """The submission (launcher call) that submitit's preemption handler would requeue, and the job's
    pickle of it; None outside a submitit job."""
    environment = sys.modules.get("submitit.core.job_environment")
    if environment is None:                       # not a submitit job: submitit is not even imported
        return None
    handler = signal.getsignal(environment.JobEnvironment._usr_sig())
    owner = getattr(handler, "__self__", None)
    if not isinstance(owner, environment.SignalHandler):
        return None
    delayed = getattr(owner, "_delayed", None)
    args = getattr(delayed, "args", ())
    # by name: Hydra's plugin scan executes the plugin's module a second time, so the launcher that was
    # unpickled and the class that an import gives are not the same object
    launcher = any(f"{c.__module__}.{c.__qualname__}" == _SUBMITIT_LAUNCHER
                   for c in type(getattr(delayed, "function", None)).__mro__)
    if not (launcher and args and (_is_overrides(args[0]) or (
            isinstance(args[0], (list, tuple)) and args[0] and all(_is_overrides(job) for job in args[0])))):
        log.warning("submitit job not started by Hydra's submitit launcher: a requeued attempt will not "
                    "resume by itself (continue it with train.resume=true)")
        return None
    return delayed, environment.JobEnvironment().paths.submitted_pickle


def _is_overrides(value: Any) -> bool:
    """A job's overrides: a list of strings."""
    return isinstance(value, (list, tuple)) and all(isinstance(o, str) for o in value)
