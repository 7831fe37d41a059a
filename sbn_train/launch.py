"""What the CLI does around Hydra's jobs: checks before anything is written, the summary of a multirun,
one-line error messages, and the lists of the help text.

:class:`Checks` is a Hydra callback (``hydra.callbacks`` in configs/config.yaml). Before a single run,
Hydra calls it with the composed config before it creates the run folder: a key the schema lacks, a bad
value, or a folder that already holds a run stop the command there, so nothing is written. Before a
multirun it checks the keys of the base config and notes the sweep folder, so that :func:`sweep_summary`
can list each job's outcome (from the files the jobs leave: results.json, failed.json) when it ends.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from .config import ConfigError, check_keys, validate
from .paths import config_dir

#: the sweep this process started (its folder and start time), for the summary at its end
SWEEP: dict[str, Any] = {}


def task_config(cfg: DictConfig) -> DictConfig:
    """The job's config: the composed config without its ``hydra`` node (as Hydra hands it to the task)."""
    task = copy.deepcopy(cfg)
    with read_write(task), open_dict(task):
        task.pop("hydra", None)
    return task


def check_options(task: DictConfig) -> None:
    """Keys of the typed sections, of the dataset (its options dataclass) and of the estimator (its
    constructor's arguments): an unknown one is a :class:`ConfigError` naming it."""
    check_keys(OmegaConf.to_container(task, resolve=False))
    from .data import DATASETS
    name = OmegaConf.select(task, "dataset.name")
    if name in DATASETS:
        known = [f.name for f in dataclasses.fields(DATASETS[name].config)]
        extra = [k for k in task.dataset if k not in known]
        if extra:
            raise ConfigError(f"dataset.{extra[0]} is not an option of dataset {name} (it has: {', '.join(known)})")
    target = OmegaConf.select(task, "estimator._target_")
    if target:
        from hydra.utils import get_class
        try:
            params = inspect.signature(get_class(target).__init__).parameters
        except Exception as e:  # noqa: BLE001 - a bad _target_ is reported as the config error it is
            raise ConfigError(f"estimator._target_={target} cannot be imported: {e}") from None
        known = [p for p in params if p not in ("self", "model")]
        extra = [k for k in task.estimator if k != "_target_" and k not in known]
        if extra:
            raise ConfigError(f"estimator.{extra[0]} is not an option of {target.rsplit('.', 1)[-1]} "
                              f"(it has: {', '.join(known)})")


def check_device(name: str) -> None:
    import torch
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} requested but CUDA is not available; use device=cpu or device=auto")


def estimator_families(options: dict) -> tuple[str, ...]:
    """The latent families the estimator config ``options`` (with ``_target_``) works on."""
    from hydra.utils import get_class
    options = dict(options)
    cls = get_class(options.pop("_target_"))
    return tuple(cls.supported_families(options)) if hasattr(cls, "supported_families") else ("bernoulli",)


def check_model_fits_estimator(task: DictConfig) -> None:
    """A :class:`ConfigError` for an estimator defined for binary latents only with a categorical model
    (listing the estimators that work on it), and for an enumerating estimator on a model too large for it."""
    family = OmegaConf.select(task, "model.family") or "bernoulli"
    options = OmegaConf.to_container(task.estimator, resolve=True) if "estimator" in task else None
    if not options or "_target_" not in options:
        return
    from hydra.utils import get_class
    if getattr(get_class(options["_target_"]), "enumerates", False):
        from .diagnostics import exact_size_error
        error = exact_size_error(list(task.model.latent_sizes), family, int(task.model.classes))
        if error:
            raise ConfigError(error)
    if family in estimator_families(options):
        return
    from .estimators import available_estimators
    from .paths import config_dir
    fit = []
    for name in available_estimators():
        other = OmegaConf.to_container(OmegaConf.load(config_dir() / "estimator" / f"{name}.yaml"), resolve=True)
        if family in estimator_families(other):
            fit.append(name)
    name = options["_target_"].rsplit(".", 1)[-1]
    raise ConfigError(f"estimator {name} is defined for binary latents only, and model.family={family}; "
                      f"estimators for {family} models: {', '.join(fit)}")


def check_run(task: DictConfig) -> None:
    """Every check a config can fail before the run starts: keys, then values, then the device."""
    check_options(task)
    typed = OmegaConf.to_object(task)
    validate(typed)
    check_model_fits_estimator(task)
    check_device(typed.device)


def holds_run(folder: Path) -> bool:
    """True if ``folder`` holds (part of) a previous run: checkpoint, best model, results or TensorBoard events."""
    from .train import holds_run as held
    return held(folder)


def run_state(folder: Path) -> str:
    """`` (finished at step N)`` or `` (saved at step N)`` for the run in ``folder``, else ``""``."""
    from .train import CHECKPOINT, RESULTS, _saved_step
    try:
        results = json.loads((folder / RESULTS).read_text())
        if results.get("status") == "finished":
            return f" (finished at step {int(results['step'])})"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return _saved_step(folder / CHECKPOINT)


class Refused(BaseException):
    """A check before the run failed (``error`` says why). A BaseException: Hydra turns the Exceptions of
    callbacks into warnings and goes on; this one stops the command, and the CLI reports ``error``."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


class Checks(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            task = task_config(config)
            check_run(task)
            folder = Path(str(config.hydra.run.dir))
            if holds_run(folder) and not (task.train.resume or task.train.overwrite):
                # before Hydra writes its .hydra/ record there, which would no longer describe that run
                raise ConfigError(f"{folder} already holds a run{run_state(folder)}. Continue it with "
                                  f"train.resume=true, discard it with train.overwrite=true, or set "
                                  f"hydra.run.dir=<another folder>")
        except expected_errors() as e:
            raise Refused(e) from None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # the typed sections' keys only: values, and the options of a dataset or estimator (which a sweep
        # may choose per job), are checked job by job
        try:
            task = task_config(config)
            check_keys(OmegaConf.to_container(task, resolve=False))
            replicas = task.train.get("replicas", 1)
            if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
                # the cap shapes the whole sweep: refused before any job starts
                raise ConfigError(f"train.replicas must be a positive integer (the largest replica group), "
                                  f"got {replicas}")
            from .groups import launcher_groups
            if replicas > 1 and not launcher_groups(str(config.hydra.launcher.get("_target_", ""))):
                print(f"sbn-train: warning: train.replicas={replicas}: replica groups need Hydra's basic launcher "
                      f"or hydra/launcher=slurm, submitit_slurm or submitit_local (this sweep's launcher starts "
                      f"each job on its own); the jobs run one by one", file=sys.stderr)
        except expected_errors() as e:
            raise Refused(e) from None
        SWEEP.update(dir=Path(str(config.hydra.sweep.dir)), start=time.time())


@dataclasses.dataclass
class Outcome:
    name: str
    status: str          # finished | failed | stopped
    error: str = ""


def sweep_outcomes(sweep_dir: Path, since: float) -> list[Outcome]:
    """The jobs of the sweep started at ``since``: the runs that wrote their ``.hydra/`` record after it, and
    the jobs that failed before their run started (a failed.json after it). A job refused before its folder
    was its own (busy, a changed config) writes nothing there; its error line is all it leaves."""
    out = []
    records = [p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml") if p.stat().st_mtime >= since - 1]
    failures = [p.parent for p in sweep_dir.rglob("failed.json") if p.stat().st_mtime >= since - 1]
    for folder in sorted(set(records) | set(failures)):
        failed, results = folder / "failed.json", folder / "results.json"
        if failed.exists() and failed.stat().st_mtime >= since - 1:
            try:
                error = json.loads(failed.read_text()).get("error", "")
            except (OSError, ValueError):
                error = "(failed.json unreadable)"
            out.append(Outcome(folder.name, "failed", (str(error).strip().splitlines() or [""])[0]))
            continue
        try:
            finished = json.loads(results.read_text()).get("status") == "finished"
        except (OSError, ValueError):
            finished = False
        out.append(Outcome(folder.name, "finished" if finished else "stopped"))
    return out


def sweep_summary(outcomes: list[Outcome], sweep_dir: Path) -> str:
    counts = {s: sum(o.status == s for o in outcomes) for s in ("finished", "failed", "stopped")}
    head = f"sbn-train: {counts['finished']} finished, {counts['failed']} failed"
    head += f", {counts['stopped']} stopped" if counts["stopped"] else ""
    lines = [f"{head} ({sweep_dir})"]
    lines += [f"  failed: {o.name}: {o.error}" for o in outcomes if o.status == "failed"]
    lines += [f"  stopped: {o.name}" for o in outcomes if o.status == "stopped"]
    return "\n".join(lines)


def one_line(e: BaseException) -> str:
    """A compose-time or run-time error as one line: its first line, plus the first line of its cause
    (Hydra wraps OmegaConf's type errors) or the options of a missing group choice."""
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError
    cause = e.__cause__
    if (isinstance(e, ConfigCompositionException) and isinstance(cause, (ConfigKeyError, ConfigAttributeError))
            and cause.full_key):
        try:                     # a misspelt key: the same message as +key (the closest key, the section's keys)
            check_keys(_nested(cause.full_key))
        except ConfigError as err:
            return str(err)
    first = (str(e).strip().splitlines() or [type(e).__name__])[0].removeprefix("In 'config': ").rstrip(".")
    if first.startswith("Unable to configure handler") and isinstance(cause, OSError):
        # Hydra's log file in the run folder (a read-only or full folder): say which file, and why
        return (f"cannot write the log file {cause.filename}: {cause.strerror or cause}. Make the folder "
                f"writable, or set hydra.run.dir=<another folder>")
    if isinstance(e, MissingConfigException) and e.options:
        import difflib
        name = str(e.missing_cfg_file or "").rsplit("/", 1)[-1]
        close = difflib.get_close_matches(name, [str(o) for o in e.options], n=1) if name else []
        hint = f"; did you mean {close[0]}?" if close else ""
        return f"{first}{hint} (options: {', '.join(sorted(e.options))})"
    if isinstance(e, ConfigCompositionException) and cause is not None and str(cause).strip():
        return f"{first}: {str(cause).strip().splitlines()[0]}"
    return first


def _nested(dotted: str) -> dict:
    out: dict = {}
    node = out
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = None
    return out


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's input or environment, reported in one line (others show a traceback)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    from .data import DataError
    from .state import RunError
    return (ConfigError, DataError, RunError, ValueError, OSError, HydraException, OmegaConfBaseException)


def group_options() -> str:
    """The user-facing config groups and their options, one line each (the ``sbn_groups`` resolver of the
    help template): the files of configs/<group>/, so new files show up without edits."""
    root = config_dir()
    lines = []
    for group in ("dataset", "model", "estimator", "optim", "experiment", "hydra/launcher", "hydra/sweeper"):
        names = sorted(p.stem for p in (root / group).glob("*.yaml"))
        if group == "hydra/launcher":
            names = sorted({*names, "joblib", "submitit_local", "submitit_slurm"})
        lines += textwrap.wrap(", ".join(names), width=100, initial_indent=f"  {group + '=':<17}",
                               subsequent_indent=" " * 19, break_on_hyphens=False)
    return "\n".join(lines)
