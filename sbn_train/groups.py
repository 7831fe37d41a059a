"""Replica groups from a Hydra sweep: ``sbn-train -m ... train.replicas=N``.

With ``train.replicas`` > 1, each job of the sweep (Hydra's basic launcher runs them one after another in
this process) is composed, checked and built as usual, but not trained: :func:`defer` keeps its
:class:`~sbn_train.train.RunSpec`. When the sweep has handed out every job, :func:`run_deferred` puts jobs
that differ only in ``seed``, ``optim.lr`` and ``optim.weight_decay`` (and in what may change without
changing a run: lengths, measurements, logging) into groups of at most ``train.replicas`` and trains each
group as one process with :func:`sbn_train.train.run_group`. Jobs that differ in anything else (estimator,
model, dataset, batch size, optimizer kind) are in different groups, trained one group after another.

With this project's submitit launchers (``hydra/launcher=slurm``, ``submitit_slurm``, ``submitit_local``:
hydra_plugins/sbn_train_submitit), the sweep's process puts the jobs into the same groups (:func:`partition`
of each job's :func:`group_key`, from its composed config) and submits one submitit job per group; that job
runs its jobs through Hydra one after another (each is deferred here) and then :func:`run_deferred`.

Every job keeps the folder, name and files it would have had on its own, so the sweep's summary,
``scripts/report.py``, TensorBoard and ``train.resume=true`` see ordinary runs.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

#: keys in which the runs of one group may differ, besides those a resume may change (state.MAY_CHANGE)
PER_REPLICA = ("seed", "optim.lr", "optim.weight_decay")

_PENDING: list[tuple[Any, int]] = []            # (RunSpec, cap) of the deferred jobs, in sweep order
_DATA: dict = {}                                # splits shared by the jobs of this process
#: the module of this project's submitit launchers (one submitit job per replica group)
GROUP_LAUNCHERS = "hydra_plugins.sbn_train_submitit."


def launcher_groups(target: str) -> bool:
    """Whether the launcher ``target`` (``hydra.launcher._target_``) trains replica groups: Hydra's basic
    launcher (the whole sweep in this process) and this project's submitit launchers (a group per job)."""
    return target.endswith("BasicLauncher") or target.startswith(GROUP_LAUNCHERS)


def grouping(cfg: DictConfig) -> bool:
    """Whether the current job waits for its replica group: ``train.replicas`` > 1 in a sweep whose jobs run
    in this process (Hydra's basic launcher, or a submitit job of this project's launchers holding one group).
    Other launchers start every job in a process of its own; there the jobs run one by one (the sweep's
    process says so in one warning line, launch.Checks)."""
    from hydra.core.hydra_config import HydraConfig
    hc = HydraConfig.get()
    return (cfg.train.replicas > 1 and hc.mode.name == "MULTIRUN"
            and launcher_groups(str(hc.launcher.get("_target_", ""))))


def run_config(task: DictConfig, choices: Mapping[str, Any]) -> dict:
    """A job's config as its run records it (the checkpoint's and results.json's ``config``): the task's
    resolved config and the estimator's config-group choice."""
    return {**OmegaConf.to_container(task, resolve=True), "estimator_choice": choices.get("estimator")}


def defer(cfg: DictConfig) -> None:
    """Build the current job's RunSpec (every check of a job runs now) and keep it for its group."""
    from .cli import job_spec
    spec = job_spec(cfg, _DATA)
    log.info("run folder: %s (waits for its replica group)", spec.out_dir)
    _PENDING.append((spec, int(cfg.train.replicas)))


def group_key(config: dict) -> str:
    """What the runs of one group must share: the trajectory config less the per-replica keys."""
    from .state import trajectory_config
    flat = trajectory_config(config)
    return json.dumps({k: v for k, v in flat.items() if k not in PER_REPLICA}, sort_keys=True, default=str)


def partition(keys: list[tuple[str, int]]) -> list[list[int]]:
    """Groups of job indices, in the order of their first job: jobs with the same key (:func:`group_key`),
    at most ``cap`` (the first such job's ``train.replicas``) per group; ``keys`` holds (key, cap) per job."""
    by_key: dict[str, list[int]] = {}
    caps: dict[str, int] = {}
    for i, (key, cap) in enumerate(keys):
        by_key.setdefault(key, []).append(i)
        caps.setdefault(key, cap)
    out = []
    for key, jobs in by_key.items():
        cap = caps[key]
        out += [jobs[i:i + cap] for i in range(0, len(jobs), cap)]
    return out


def plan(pending: list[tuple[Any, int]]) -> list[list[Any]]:
    """The groups of the deferred jobs (:func:`partition` of their RunSpecs' configs)."""
    return [[pending[i][0] for i in group]
            for group in partition([(group_key(spec.config or {}), cap) for spec, cap in pending])]


def run_deferred(resume_args: list[str]) -> dict[Path, Any]:
    """Train the deferred jobs group by group. A failed run is recorded in its folder (the sweep's summary
    lists it) and the others go on; a stop signal saves every run of the group and ends the process with
    128 + the signal's number and the command that continues the sweep. Returns each run's outcome by its
    folder: its RunResult, or the error it failed with."""
    from .replicas import GroupError
    from .state import RunError
    from .train import RESULTS, Stopped, _write_failed, run_group
    outcomes: dict[Path, Any] = {}
    if not _PENDING:
        return outcomes
    groups = plan(_PENDING)
    _PENDING.clear()
    for i, specs in enumerate(groups, start=1):
        log.info("replica group %d of %d: %d runs (%s)", i, len(groups), len(specs),
                 ", ".join(spec.out_dir.name for spec in specs))
        try:
            results = run_group(specs)
        except Stopped as e:
            sweep = specs[0].out_dir.parent
            args = [a for a in resume_args if a.split("=", 1)[0].lstrip("+~") not in
                    ("train.resume", "train.overwrite", "hydra.sweep.dir")]
            from .cli import command_line
            print(f"sbn-train: {e}; continue with: "
                  f"{command_line([*args, f'hydra.sweep.dir={sweep}', 'train.resume=true'])}", file=sys.stderr)
            sys.exit(128 + e.signum)
        except (RunError, GroupError) as e:      # the group as a whole: its runs are listed as failed
            log.error("replica group %d: %s", i, e)
            for spec in specs:
                if not (spec.out_dir / RESULTS).exists():
                    _write_failed(spec.out_dir, e)
                    outcomes[spec.out_dir] = e
            continue
        for spec, result in zip(specs, results):
            outcomes[spec.out_dir] = result
            if isinstance(result, BaseException):
                log.error("%s: %s", spec.out_dir.name, result)
            else:
                log.info("%s finished at step %d", spec.out_dir.name, result.step)
    return outcomes
