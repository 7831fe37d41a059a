"""hydra-submitit-launcher with one submitit job (a SLURM array task) per replica group.

``hydra/launcher=slurm`` (configs/hydra/launcher/slurm.yaml), ``submitit_slurm`` and ``submitit_local``
select these launchers in sbn-train (:func:`register`; ``submitit_*_groups`` in any app). The sweep's process
composes every job's config, puts the jobs into replica groups exactly as Hydra's basic launcher would
(sbn_train.groups: jobs that differ only in seed, optim.lr and optim.weight_decay, at most
``train.replicas`` per group) and submits one job per group. That job runs each of its jobs through Hydra
(composed, checked, built, deferred: sbn_train.groups.defer) and then trains them as one replica group
(sbn_train.groups.run_deferred). With ``train.replicas=1`` (the default) every group is one run: one job per
run, as with the plugin's own launchers.

Requeue: the job's call holds the overrides of every job of its group; at its start each is given
``train.resume=true`` (sbn_train.launcher.resume_when_requeued), in the call that submitit's ``checkpoint``
resubmits on preemption or timeout and in the job's pickle that SLURM reloads when it requeues the job by
itself, so a new attempt resumes every run of the group from its checkpoint.

Hydra imports this module on every start (its plugin scan): it imports nothing of sbn_train or torch at
module level. No ``from __future__ import annotations``: the scan executes the module before it is in
sys.modules, where dataclasses cannot resolve string annotations.
"""

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, run_job, setup_globals
from omegaconf import OmegaConf, open_dict

from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, LocalQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

log = logging.getLogger(__name__)


class GroupSubmititLauncher(BaseSubmititLauncher):
    """One submitit job per replica group (a group of one: one job per run)."""

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.resume_args: List[str] = []

    def group_jobs(self, job_overrides: Sequence[Sequence[str]]) -> List[List[int]]:
        """The replica groups of the sweep's jobs, as lists of indices into ``job_overrides``: the groups
        that Hydra's basic launcher would form (sbn_train.groups.partition). A job whose config cannot be
        composed here is a group of its own; its job reports the error as usual."""
        from hydra.core.hydra_config import HydraConfig

        from sbn_train.groups import group_key, partition, run_config
        from sbn_train.launch import task_config

        assert self.hydra_context is not None and self.config is not None
        keys = []
        for i, overrides in enumerate(job_overrides):
            original = HydraConfig.instance().cfg
            try:
                sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
                HydraConfig.instance().set_config(sweep_config)   # as run_job sets it for the job
                task = task_config(sweep_config)
                keys.append((group_key(run_config(task, sweep_config.hydra.runtime.choices)),
                             max(int(task.train.replicas), 1)))
            except Exception as e:  # noqa: BLE001 - the job itself reports it
                log.debug("job #%d not grouped: %s", i, e)
                keys.append((f"(job {i}: {type(e).__name__})", 1))
            finally:
                HydraConfig.instance().cfg = original
        return partition(keys)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        # lazy import to ensure plugin discovery remains fast
        import submitit

        assert self.config is not None
        assert len(job_overrides) > 0
        groups = self.group_jobs(job_overrides)
        self.resume_args = list(sys.argv[1:])     # the sweep's command line, for a "continue with" line
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **self._init_params())
        executor.update_parameters(**self._job_params())

        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {self.config.hydra.sweep.dir}")
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))

        log.info(f"{len(job_overrides)} jobs in {len(groups)} replica groups, one submitit job each")
        group_overrides, group_nums = [], []
        for g, members in enumerate(groups, start=1):
            log.info(f"  group {g}:")
            for i in members:
                log.info(f"\t#{initial_job_idx + i} : {' '.join(filter_overrides(job_overrides[i]))}")
            group_overrides.append([list(job_overrides[i]) for i in members])
            group_nums.append([initial_job_idx + i for i in members])
        state = Singleton.get_state()
        jobs = executor.map_array(self, group_overrides, group_nums, [state] * len(groups))

        returns: List[Any] = [None] * len(job_overrides)
        for members, job in zip(groups, jobs):
            for i, ret in zip(members, job.results()[0]):
                returns[i] = ret
        return returns

    def _init_params(self) -> Dict[str, Any]:
        """The executor's own arguments, as the plugin's ``launch`` builds them."""
        params = {"folder": self.params["submitit_folder"]}
        params.update({f"{self._EXECUTOR}_{k}": v for k, v in self.params.items() if k in {"max_num_timeout"}})
        return params

    def _job_params(self) -> Dict[str, Any]:
        """The jobs' resources, as the plugin's ``launch`` passes them to ``update_parameters``."""
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        return {k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in self.params.items()
                if k not in {"max_num_timeout", "submitit_folder"}}

    def __call__(self, group_overrides: List[List[str]], job_nums: List[int],  # type: ignore[override]
                 singleton_state: Dict[type, Singleton]) -> List[JobReturn]:
        """The submitit job of one replica group: every job of the group through Hydra (each one deferred
        when ``train.replicas`` > 1, else an ordinary run), then the group's training."""
        import submitit

        from sbn_train import groups
        from sbn_train.launcher import resume_when_requeued

        assert self.hydra_context is not None and self.config is not None and self.task_function is not None
        Singleton.set_state(singleton_state)
        setup_globals()
        resume_when_requeued()                    # a later attempt resumes every run of the group
        job_id = submitit.JobEnvironment().job_id
        returns = []
        for overrides, num in zip(group_overrides, job_nums):
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config.hydra.job) as job:
                job.id = job_id
                sweep_config.hydra.job.num = num
            returns.append(run_job(hydra_context=self.hydra_context, task_function=self.task_function,
                                   config=sweep_config, job_dir_key="hydra.sweep.dir",
                                   job_subdir_key="hydra.sweep.subdir"))
        outcomes = groups.run_deferred(resume_args=self.resume_args)
        for ret in returns:                       # the deferred jobs' outcomes, as Hydra reports a run's
            if ret.status != JobStatus.COMPLETED or ret.hydra_cfg is None:
                continue
            outcome = outcomes.get(Path(str(ret.hydra_cfg.hydra.runtime.output_dir)))
            if isinstance(outcome, BaseException):
                ret.status, ret.return_value = JobStatus.FAILED, outcome
            elif outcome is not None:
                ret.return_value = float(outcome.metrics["best/valid"])
        return returns


class GroupLocalLauncher(GroupSubmititLauncher):
    _EXECUTOR = "local"


class GroupSlurmLauncher(GroupSubmititLauncher):
    _EXECUTOR = "slurm"


@dataclass
class LocalGroupsConf(LocalQueueConf):
    _target_: str = "hydra_plugins.sbn_train_submitit.group_launcher.GroupLocalLauncher"


@dataclass
class SlurmGroupsConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.sbn_train_submitit.group_launcher.GroupSlurmLauncher"


def register(shadow: bool = False) -> None:
    """Store the launchers' configs: ``hydra/launcher=submitit_local_groups`` and ``submitit_slurm_groups``
    (every Hydra app of the environment sees these), and with ``shadow`` also under the plugin's own names
    ``submitit_local`` and ``submitit_slurm``: sbn-train does that in its own process, after Hydra's plugin
    scan (sbn_train.launcher.register_launchers), so that other apps keep the plugin's launchers."""
    for name, node in (("submitit_local", LocalGroupsConf), ("submitit_slurm", SlurmGroupsConf)):
        for stored in (f"{name}_groups", name) if shadow else (f"{name}_groups",):
            ConfigStore.instance().store(group="hydra/launcher", name=stored, node=node(), provider="sbn_train")


register()
