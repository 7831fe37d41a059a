"""Replica groups from a Hydra sweep: ``sbn-train -m ... train.replicas=N``.

With ``train.replicas`` > 1, each job of the sweep (Hydra's basic launcher runs them one after another in
this process) is composed, checked and built as usual, but not trained: :func:`defer` keeps its
:class:`~sbn_train.train.RunSpec`. When the sweep has handed out every job, :func:`run_deferred` puts jobs
that differ only in ``seed``, ``optim.lr`` and ``optim.weight_decay`` (and in what may change without
changing a run: lengths, measurements, logging) into groups of at most ``train.replicas`` and trains each
group as one process with :func:`sbn_train.train.run_group`. Jobs that differ in anything else (estimator,
model, dataset, batch size, optimizer kind) are in different groups, trained one group after another.

Every job keeps the folder, name and files it would have had on its own, so the sweep's summary,
``scripts/report.py``, TensorBoard and ``train.resume=true`` see ordinary runs.
"""
from __future__ import annotations

import json
import logging
import sys
from typing import Any

from omegaconf import DictConfig

log = logging.getLogger(__name__)

#: keys in which the runs of one group may differ, besides those a resume may change (state.MAY_CHANGE)
PER_REPLICA = ("seed", "optim.lr", "optim.weight_decay")

_PENDING: list[tuple[Any, int]] = []            # (RunSpec, cap) of the deferred jobs, in sweep order
_DATA: dict = {}                                # splits shared by the jobs of this process


def grouping(cfg: DictConfig) -> bool:
    """Whether the current job waits for its replica group: ``train.replicas`` > 1 in a sweep that Hydra's
    basic launcher runs in this process. Other launchers start every job in a process (or SLURM job) of its
    own; there the jobs run one by one (the sweep's process says so in one warning line, launch.Checks)."""
    from hydra.core.hydra_config import HydraConfig
    hc = HydraConfig.get()
    return (cfg.train.replicas > 1 and hc.mode.name == "MULTIRUN"
            and str(hc.launcher.get("_target_", "")).endswith("BasicLauncher"))


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


def plan(pending: list[tuple[Any, int]]) -> list[list[Any]]:
    """The groups, in the order of their first job: jobs with the same :func:`group_key`, at most ``cap``
    (the first job's ``train.replicas``) per group."""
    by_key: dict[str, list] = {}
    caps: dict[str, int] = {}
    for spec, cap in pending:
        key = group_key(spec.config or {})
        by_key.setdefault(key, []).append(spec)
        caps.setdefault(key, cap)
    out = []
    for key, specs in by_key.items():
        cap = caps[key]
        out += [specs[i:i + cap] for i in range(0, len(specs), cap)]
    return out


def run_deferred(resume_args: list[str]) -> None:
    """Train the deferred jobs group by group. A failed run is recorded in its folder (the sweep's summary
    lists it) and the others go on; a stop signal saves every run of the group and ends the process with
    128 + the signal's number and the command that continues the sweep."""
    from .replicas import GroupError
    from .state import RunError
    from .train import Stopped, _write_failed, run_group
    if not _PENDING:
        return
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
                if not (spec.out_dir / "results.json").exists():
                    _write_failed(spec.out_dir, e)
            continue
        for spec, result in zip(specs, results):
            if isinstance(result, BaseException):
                log.error("%s: %s", spec.out_dir.name, result)
            else:
                log.info("%s finished at step %d", spec.out_dir.name, result.step)
