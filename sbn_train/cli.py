"""``sbn-train``: the only place that sees a DictConfig. It builds typed objects and calls train.run."""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path


def _interrupted_at_start(signum, frame) -> None:
    """Ctrl-C while the modules load (seconds, before any handler of the run exists): one line, no traceback.
    Nothing has been written yet."""
    sys.stderr.write(f"sbn-train: interrupted ({signal.Signals(signum).name}) during start-up, before "
                     f"training began\n")
    os._exit(128 + signum)


_previous_sigint = signal.getsignal(signal.SIGINT)
if Path(sys.argv[0]).name in ("sbn-train", "cli.py") and _previous_sigint is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted_at_start)

# The 2.14 CPU build's AVX-512 log1p (softplus, logsigmoid) is several times slower than its AVX2 one;
# must be set before torch is imported. An explicit setting by the user wins.
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
# OpenMP threads that wait for work sleep instead of spinning: on cores shared with other processes a spinning
# team waits for whichever of its threads the kernel has descheduled (scripts/bench_threads.py measures it;
# README: CPU threads on shared machines). Read when torch starts; an explicit setting by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra  # noqa: E402
import torch  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from . import groups, launch  # noqa: E402
from .config import Config, register_configs, validate  # noqa: E402
from .launcher import MAIN_PID_ENV, register_launchers  # noqa: E402
from .paths import config_dir  # noqa: E402
from .run_names import NAME_EXCLUDE, SWEPT_ENV, run_name, swept_keys  # noqa: E402,F401  (re-exported)

log = logging.getLogger("sbn_train")


# In the process the user started (not in a sweep's worker processes, which inherit these variables): its
# pid, and the keys swept on its command line, which name the runs of a multirun.
if Path(sys.argv[0]).name in ("sbn-train", "cli.py"):
    if os.environ.get(MAIN_PID_ENV) != str(os.getppid()):   # a loky worker runs this with its sweep's argv
        os.environ[MAIN_PID_ENV] = str(os.getpid())
    if "-m" in sys.argv or "--multirun" in sys.argv:
        os.environ[SWEPT_ENV] = ",".join(sorted(swept_keys(sys.argv[1:])))

OmegaConf.register_new_resolver("run_name", run_name, replace=True)
OmegaConf.register_new_resolver("sbn_groups", lambda: launch.group_options(), replace=True)
register_configs()
register_launchers()   # hydra/launcher=submitit_slurm, submitit_local: one job per replica group
if signal.getsignal(signal.SIGINT) is _interrupted_at_start:
    signal.signal(signal.SIGINT, _previous_sigint)   # from here on: KeyboardInterrupt, reported by main()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    launch.check_device(name)
    return torch.device(name)


#: whether this process's current job has taken its run folder (``train.run``'s ``on_start``)
_accepted: list[bool] = [False]


#: the config of this process's current job (recorded with its failure, in a folder that holds no run)
_task: list[DictConfig | None] = [None]


def job_spec(cfg: DictConfig, data_cache: dict | None = None):
    """The :class:`~sbn_train.train.RunSpec` of the job Hydra is running (typed settings, data, model and
    estimator, and the record of its config that the run writes once its folder is its own); ``data_cache``
    shares the loaded splits between the jobs of a replica group."""
    from .estimators import estimator_from_config
    from .models import build_model, family_hparams
    from .train import RunSettings, RunSpec

    typed: Config = OmegaConf.to_object(cfg)
    validate(typed)
    device = resolve_device(typed.device)
    set_threads(typed.threads)
    choices = HydraConfig.get().runtime.choices
    out_dir = HydraConfig.get().runtime.output_dir
    options = OmegaConf.to_container(cfg.dataset, resolve=True)
    key = (json.dumps(options, sort_keys=True, default=str), str(device))
    if data_cache is not None and key in data_cache:
        splits = data_cache[key]
    else:
        splits = load_data(options)
        from . import faults
        faults.point("start", 0)
        splits.train, splits.valid, splits.test = (splits.train.to(device), splits.valid.to(device),
                                                   splits.test.to(device))
        if data_cache is not None:
            data_cache[key] = splits
    torch.manual_seed(typed.seed)
    train = splits.train
    model = build_model(typed.model, train.shape[1], x_mean=train.mean(0)).to(device)
    estimator = estimator_from_config(OmegaConf.to_container(cfg.estimator, resolve=True), model).to(device)
    hparams = {"estimator": choices.get("estimator"), "model": choices.get("model"),
               "dataset": choices.get("dataset"), "experiment": choices.get("experiment") or "",
               "optim": typed.optim.name, "lr": typed.optim.lr,
               "weight_decay": typed.optim.weight_decay, "batch_size": typed.train.batch_size,
               "max_steps": typed.train.max_steps, "latent_sizes": str(typed.model.latent_sizes),
               "n_hidden": typed.model.n_hidden, "seed": typed.seed}
    hparams.update(family_hparams(typed.model))
    log_test_cost(typed, splits)
    settings = RunSettings(train=typed.train, optim=typed.optim, eval=typed.eval, variance=typed.variance,
                           test=typed.test, seed=typed.seed)
    config = groups.run_config(cfg, choices)
    record = record_texts(cfg)
    return RunSpec(model, estimator, splits, settings, Path(out_dir), hparams, config,
                   on_start=lambda: _write_record(record, Path(out_dir)))


def main_task(cfg: DictConfig) -> dict:
    _accepted[0], _task[0] = False, cfg
    from .launcher import setup_job
    setup_job()   # a sweep worker stops when the sweep's process dies; a requeued submitit job resumes
    from .train import RESULTS, run

    spec = job_spec(cfg)
    log.info("run folder: %s", spec.out_dir)
    result = run(spec.model, spec.estimator, spec.splits, spec.settings, spec.out_dir, spec.hparams,
                 config=spec.config, on_start=spec.on_start)
    log.info("finished at step %d: %s", result.step,
             ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items() if isinstance(v, float)))
    folder = Path(spec.out_dir).resolve()
    log.info("run folder: %s", folder)
    log.info("results: %s", folder / RESULTS)
    log.info("TensorBoard (this run is %s there): %s --logdir %s", folder.name, tool("tensorboard"),
             _quote(str(folder.parent)))
    return result.metrics


def log_test_cost(typed: Config, splits) -> None:
    """One line saying what the final test costs next to the run's evaluations (both in rows times samples
    drawn per row), and how to make it smaller."""
    t, e, tr = typed.test, typed.eval, typed.train
    if not t.enabled:
        return
    test_rows = _rows(splits.test.shape[0], t.limit)
    test_cost = test_rows * (t.elbo_samples + t.iwae_k)
    per_eval = (_rows(splits.valid.shape[0], e.limit)
                + (_rows(splits.train.shape[0], e.train_limit) if e.train_split else 0)) * (1 + e.iwae_k)
    evals = -(-tr.max_steps // tr.eval_every)
    ratio = test_cost / max(per_eval, 1)
    log.info("the final test (test.*): %s rows x (%s ELBO samples + K = %s) = %s samples, %.1fx one evaluation "
             "(%.1fx all %d of this run); test.limit, test.elbo_samples and test.iwae_k make it smaller, "
             "test.enabled=false skips it", f"{test_rows:,}", f"{t.elbo_samples:,}", f"{t.iwae_k:,}",
             _count(test_cost), ratio, ratio / evals, evals)


def _rows(n: int, limit: int | None) -> int:
    return n if limit is None else min(n, limit)


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def launcher_command() -> str:
    """How to start sbn-train again the way this process was started: ``make run ARGS="..."`` under make,
    ``sbn-train`` when that name on PATH is this program, else the path it was started by (works without
    an active virtual environment)."""
    argv0 = Path(sys.argv[0])
    if argv0.name != "sbn-train":
        return f"{_quote(sys.executable)} -m sbn_train.cli"
    if os.environ.get("MAKELEVEL") and Path("Makefile").is_file():
        return "make run"
    import shutil
    found = shutil.which("sbn-train")
    try:
        if found and Path(found).samefile(argv0):
            return "sbn-train"
    except OSError:
        pass
    return _quote(str(argv0))


def command_line(args: list[str]) -> str:
    """The command that runs sbn-train with ``args``, as :func:`launcher_command` starts it."""
    start = launcher_command()
    quoted = " ".join(map(_quote, args))
    if start == "make run":
        return f"make run ARGS={_quote(quoted)}" if quoted else "make run"
    return " ".join([start, quoted]) if quoted else start


def tool(name: str) -> str:
    """A command of this environment (e.g. ``tensorboard``) as it can be typed here: its name if the one on
    PATH is this environment's, else its path next to this Python."""
    import shutil
    here = Path(sys.executable).parent / name
    found = shutil.which(name)
    if not here.exists():
        return name
    try:
        if found and Path(found).samefile(here):
            return name
    except OSError:
        pass
    return _quote(str(here))


def set_threads(setting: str) -> int:
    """torch's CPU thread count by the ``threads`` key (:mod:`sbn_train.threads`), said in one log line."""
    from .threads import choose_threads
    launcher = OmegaConf.to_container(HydraConfig.get().launcher, resolve=False) if HydraConfig.initialized() else None
    n, why = choose_threads(setting, launcher)
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    log.info("CPU threads: %d (%s; torch's default in this process: %d; OMP_WAIT_POLICY=%s)", n, why, before,
             os.environ.get("OMP_WAIT_POLICY", "(unset)"))
    return n


def load_data(options: dict):
    """The dataset's splits; a data folder that cannot be created or written (read-only, a file in the
    way) is a one-line :class:`DataError` naming ``dataset.data_dir`` and the path that failed."""
    from .data import DataError, load_dataset
    try:
        return load_dataset(**options)
    except OSError as e:
        where = e.filename or options.get("data_dir")
        raise DataError(f"cannot use the data folder (dataset.data_dir={options.get('data_dir')}): "
                        f"{where}: {e.strerror or e}") from None


def _expected_errors() -> tuple[type[BaseException], ...]:
    return launch.expected_errors()


def main() -> None:
    """The ``sbn-train`` command: Hydra's app (:func:`hydra_main`) with one-line errors (``sbn-train:
    error: ...``, exit 2) for bad input, and for a multirun a summary of its jobs at the end (exit 1 if
    any failed). ``HYDRA_FULL_ERROR=1`` set by the user shows Hydra's own reports and tracebacks instead."""
    user_full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"          # Hydra re-raises errors; they are reported here
    code: int | str | None = 0
    error: BaseException | None = None
    try:
        hydra_main()
        groups.run_deferred(resume_args=sys.argv[1:])   # the jobs of a sweep with train.replicas > 1
    except BrokenPipeError:                       # e.g. ``sbn-train --help | head``: the reader has gone
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())     # nothing left to flush at exit
        sys.exit(0)
    except launch.Refused as e:                   # a check before the run: nothing was written
        error, code = e.error, 2
    except KeyboardInterrupt:                     # Ctrl-C before the run's own handlers (start-up)
        _sweep_summary()
        print("sbn-train: sweep interrupted (SIGINT); runs that had started saved their step: continue it with "
              "train.resume=true" if launch.SWEEP else
              "sbn-train: interrupted (SIGINT) during start-up, before training began", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except SystemExit as e:
        code = e.code
    except Exception as e:
        if user_full_error or not isinstance(e, _expected_errors()):
            _sweep_summary()                      # then the traceback
            raise
        error, code = e, 2
    outcomes = _sweep_summary()
    if error is not None and not any(o.status == "failed" for o in outcomes):
        print(f"sbn-train: error: {launch.one_line(error)}", file=sys.stderr)   # not a job's error
    elif any(o.status != "finished" for o in outcomes) and code in (0, None, 2):
        code = 1                                  # jobs failed (each one's error is in the summary)
    sys.exit(code)


def _sweep_summary() -> list:
    """How each job of this process's sweep ended, printed (nothing without a sweep, or before any job)."""
    if not launch.SWEEP:
        return []
    outcomes = launch.sweep_outcomes(launch.SWEEP["dir"], launch.SWEEP["start"])
    if outcomes:
        print(launch.sweep_summary(outcomes, launch.SWEEP["dir"]), file=sys.stderr)
    return outcomes


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def hydra_main(cfg: DictConfig) -> float:
    """Returns the run's best validation bound (the objective of the lr_search sweeper)."""
    from .train import Stopped
    if groups.grouping(cfg):
        _accepted[0], _task[0] = False, cfg
        try:
            groups.defer(cfg)
        except Exception as e:
            _record_failure(e)
            if not isinstance(e, _expected_errors()):
                raise
            print(f"sbn-train: error: {e}", file=sys.stderr)
            raise
        return float("nan")
    try:
        return float(main_task(cfg)["best/valid"])
    except Stopped as e:
        print(f"sbn-train: {e}; continue with: {resume_command()}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except Exception as e:
        if isinstance(e, OSError) and not e.filename:
            e = _in_run_folder(e)
        _record_failure(e)
        if not isinstance(e, _expected_errors()):
            raise
        # short, actionable message instead of a traceback
        print(f"sbn-train: error: {e}", file=sys.stderr)
        if HydraConfig.get().mode.name == "MULTIRUN":
            raise   # Hydra records the failed job and goes on with the sweep
        sys.exit(2)


def _in_run_folder(e: OSError) -> Exception:
    """An error of a write with no file name (TensorBoard's event writer, a full disk) with the run folder
    named, and what to do for a full disk or a file-size limit."""
    import errno
    folder = HydraConfig.get().runtime.output_dir
    hint = ("; free space there, or set hydra.run.dir=<another folder>"
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "")
    from .state import RunError
    return RunError(f"cannot write in the run folder {folder}: {e.strerror or e}{hint}")


def resume_command() -> str:
    """The command line that continues this run (or sweep) from its checkpoint."""
    args = [a for a in sys.argv[1:] if not a.split("=", 1)[0].lstrip("+~") in ("train.resume", "train.overwrite")]
    hc = HydraConfig.get()
    if hc.mode.name == "MULTIRUN" and not any(a.startswith("hydra.sweep.dir=") for a in args):
        args.append(f"hydra.sweep.dir={hc.sweep.dir}")
    return command_line([*args, "train.resume=true"])


def _quote(arg: str) -> str:
    import shlex
    return shlex.quote(arg)


#: Hydra's record of a run's composed config, in the run folder (``hydra.output_subdir`` is null in
#: configs/config.yaml: Hydra itself would write it before the run is checked, relabelling the run of a
#: folder that a refused command names)
RECORD = ".hydra"


def record_texts(task: DictConfig) -> dict[str, bytes]:
    """The job's ``.hydra`` record as Hydra writes it (``config.yaml``, ``hydra.yaml``, ``overrides.yaml``),
    rendered while its job runs (a replica group writes it later)."""
    return {name: OmegaConf.to_yaml(node).encode()
            for name, node in (("config.yaml", task), ("hydra.yaml", HydraConfig.instance().cfg),
                               ("overrides.yaml", HydraConfig.get().overrides.task))}


def _write_record(texts: dict[str, bytes], out_dir: Path) -> None:
    """The ``.hydra`` record, once the run has taken its folder: a refused command never writes it."""
    from .state import write_atomic
    _accepted[0] = True
    record = out_dir / RECORD
    try:
        record.mkdir(exist_ok=True)
    except OSError as e:
        from .state import RunError
        raise RunError(f"cannot write {record}: {e.strerror or e}") from None
    for name, text in texts.items():
        write_atomic(record / name, lambda f, text=text: f.write(text))


def _record_failure(e: Exception) -> None:
    """``failed.json`` in the run folder (written atomically: always valid JSON), so that reports list the run
    as failed and say why. If the folder cannot be written either, one warning line says so. A command
    refused before the folder was its own (busy, another run there, a changed config) writes nothing: the
    folder belongs to the run that is there."""
    from .state import RunRefused, write_atomic
    from .train import FAILED, holds_run
    try:
        out = Path(HydraConfig.get().runtime.output_dir)
        if isinstance(e, RunRefused) or (not _accepted[0] and holds_run(out)):
            return
        out.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"error": f"{type(e).__name__}: {e}"}, indent=2).encode()
        write_atomic(out / FAILED, lambda f: f.write(text))
        if not _accepted[0] and _task[0] is not None:
            _write_record(record_texts(_task[0]), out)   # the folder holds no other run: this one's record
    except Exception as err:  # noqa: BLE001 - reporting a failure must not hide it
        print(f"sbn-train: warning: could not record the failure in the run folder ({err})", file=sys.stderr)


if __name__ == "__main__":
    main()
