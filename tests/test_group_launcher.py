"""One submitit job per replica group (hydra_plugins/sbn_train_submitit): found by Hydra's plugin scan,
selected by hydra/launcher=slurm, submitit_slurm and submitit_local; a sweep of 4 jobs with
train.replicas=2 under submitit_local submits 2 jobs whose runs equal the basic launcher's replica sweep
exactly; a group preempted with SIGUSR2 is requeued and resumes every run exactly."""
import json
import re
import tomllib
from pathlib import Path

import pytest

from test_cli import sbn_train
from test_replica_cli import RUN, SWEEP, runs
from test_resume_faults import assert_same, record

ROOT = Path(__file__).resolve().parents[1]
MODULE = "hydra_plugins.sbn_train_submitit.group_launcher"


def test_the_plugin_ships_in_hydras_namespace_and_is_found():
    """hydra_plugins is a namespace package (an __init__.py there would hide every other plugin) listed in
    pyproject.toml with this project's launcher package (an editable install then maps the namespace to this
    checkout); Hydra's scan finds the launchers."""
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert "hydra_plugins" in packages and "hydra_plugins.sbn_train_submitit" in packages
    assert not (ROOT / "hydra_plugins" / "__init__.py").exists()
    from hydra.core.plugins import Plugins
    found = Plugins.instance().class_name_to_class
    assert f"{MODULE}.GroupSlurmLauncher" in found and f"{MODULE}.GroupLocalLauncher" in found


@pytest.mark.parametrize("launcher,cls", [("slurm", "GroupSlurmLauncher"), ("submitit_slurm", "GroupSlurmLauncher"),
                                          ("submitit_local", "GroupLocalLauncher"),
                                          ("submitit_local_groups", "GroupLocalLauncher")])
def test_the_submitit_launchers_are_the_group_launchers(launcher, cls):
    from hydra import compose, initialize_config_dir
    from sbn_train.launcher import register_launchers
    from sbn_train.paths import config_dir
    register_launchers()
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == f"{MODULE}.{cls}"
    if launcher == "slurm":
        assert cfg.hydra.launcher.timeout_min == 4320 and cfg.hydra.launcher.max_num_timeout == 10


def test_the_slurm_jobs_get_the_configured_resources(tmp_path, monkeypatch):
    """hydra/launcher=slurm's resources reach each group's sbatch script as they reach the plugin's jobs
    (submitit needs an srun on PATH to build a SLURM executor: a stand-in here)."""
    import os
    import submitit
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from hydra_plugins.sbn_train_submitit.group_launcher import GroupSlurmLauncher
    from sbn_train.launcher import register_launchers
    from sbn_train.paths import config_dir
    (tmp_path / "srun").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    register_launchers()
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                           f"hydra.sweep.dir={tmp_path}"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    params.pop("_target_")
    launcher = GroupSlurmLauncher(**params)
    executor = submitit.AutoExecutor(cluster="slurm", **launcher._init_params())
    executor.update_parameters(**launcher._job_params())
    assert executor._executor.max_num_timeout == 10
    script = executor._executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid")
    for line in ["--time=4320", "--gpus-per-node=1", "--cpus-per-task=4", "--mem=32GB", "--partition=gpu",
                 "--signal=USR2@120", "--job-name=sbn-train"]:
        assert f"#SBATCH {line}\n" in script, line


def test_partition_keeps_sweep_order_and_caps_groups():
    from sbn_train.groups import partition
    keys = [("a", 2), ("b", 3), ("a", 9), ("a", 1), ("b", 1), ("c", 1)]
    assert partition(keys) == [[0, 2], [3], [1, 4], [5]]


def sweep(folder: Path, *extra: str, env=None):
    return sbn_train("-m", *RUN, *SWEEP, "train.replicas=2", f"hydra.sweep.dir={folder}", *extra, env=env)


@pytest.fixture(scope="module")
def basic(tmp_path_factory):
    """The basic launcher's replica sweep: 4 jobs in 2 groups, one process."""
    folder = tmp_path_factory.mktemp("basic")
    out = sweep(folder)
    assert out.returncode == 0, out.stderr
    assert "4 finished, 0 failed" in out.stderr and "replica group 2 of 2: 2 runs" in out.stdout
    return folder


def submissions(folder: Path) -> list[list[list[str]]]:
    """Each submitit job's call: the overrides of every job of its group."""
    from submitit.core.utils import DelayedSubmission
    return [DelayedSubmission.load(p).args[0] for p in sorted((folder / ".submitit").glob("*/*_submitted.pkl"))]


def job_logs(folder: Path) -> list[str]:
    return ["".join(p.read_text() for p in d.glob("*_0_log.*"))
            for d in sorted((folder / ".submitit").iterdir()) if list(d.glob("*_submitted.pkl"))]


def test_submitit_local_submits_one_job_per_group(basic, tmp_path):
    folder = tmp_path / "sweep"
    out = sweep(folder, "hydra/launcher=submitit_local")
    assert out.returncode == 0, out.stderr
    assert "4 finished, 0 failed" in out.stderr and "4 jobs in 2 replica groups" in out.stdout
    calls = submissions(folder)
    assert sorted(len(call) for call in calls) == [2, 2], calls
    assert all("train.replicas=2" in job for call in calls for job in call)
    logs = job_logs(folder)
    assert len(logs) == 2 and all("replica group 1 of 1: 2 runs" in log for log in logs)
    assert [p.name for p in runs(folder)] == [p.name for p in runs(basic)]
    for a, b in zip(runs(basic), runs(folder)):
        assert_same(record(a), record(b), a.name)


def test_a_preempted_group_is_requeued_and_resumes_every_run_exactly(basic, tmp_path):
    """SIGUSR2 (SLURM's preemption signal) during step 17 of each group: every run saves at step 17, submitit
    requeues the job, and the new attempt resumes both runs with train.resume=true. The runs then equal the
    uninterrupted basic launcher's; the jobs' pickles (what SLURM reloads on a requeue of its own) resume."""
    folder = tmp_path / "sweep"
    out = sweep(folder, "hydra/launcher=submitit_local", env={"SBN_TRAIN_KILL_AT": "step:17:SIGUSR2"})
    assert out.returncode == 0, out.stderr
    assert "4 finished, 0 failed" in out.stderr
    logs = job_logs(folder)
    assert len(logs) == 2
    for log in logs:
        assert "Requeued job" in log, log[-3000:]
        resumed = re.findall(r"resumed from (\S+)/checkpoint.pt at step (\d+)", log)
        assert len(resumed) == 2 and {step for _, step in resumed} == {"17"}, log[-3000:]
    for call in submissions(folder):
        assert all(job[-1] == "train.resume=true" and job.count("train.resume=true") == 1 for job in call), call
    for a, b in zip(runs(basic), runs(folder)):
        assert json.loads((b / "results.json").read_text())["step"] == 30
        assert_same(record(a), record(b), a.name)


def test_cli_task_function_pickles_by_value():
    """joblib's and submitit's workers receive the CLI's task function pickled by value (the CLI runs as
    ``__main__``): every function of sbn_train.cli must pickle that way (an attribute named like a submodule of
    a module the code uses, e.g. ``.classes`` with torch, makes cloudpickle try to pickle ``torch.classes``)."""
    import inspect
    import cloudpickle
    import sbn_train.cli as cli
    cloudpickle.register_pickle_by_value(cli)
    try:
        for name, f in inspect.getmembers(cli, inspect.isfunction):
            if f.__module__ == cli.__name__:
                cloudpickle.dumps(f)
    finally:
        cloudpickle.unregister_pickle_by_value(cli)
