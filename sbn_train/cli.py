"""``sbn-train``: the only place that sees a DictConfig. It builds typed objects and calls train.run."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

# The 2.14 CPU build's AVX-512 log1p (softplus, logsigmoid) is several times slower than its AVX2 one;
# must be set before torch is imported. An explicit setting by the user wins.
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")

import hydra  # noqa: E402
import torch  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from .config import Config, ConfigError, register_configs, validate  # noqa: E402
from .paths import config_dir  # noqa: E402

log = logging.getLogger("sbn_train")


#: overrides that do not change what a run computes, left out of its folder name
NAME_EXCLUDE = ("train.resume", "train.overwrite", "train.progress", "device")
_SWEEP_FUNCTIONS = ("range(", "choice(", "glob(", "interval(", "tag(", "sort(", "shuffle(")


def _is_sweep(value: str) -> bool:
    """True for Hydra sweep syntax: a top-level comma (``a,b``) or a sweep function (``range(1,3)``)."""
    if value.startswith(_SWEEP_FUNCTIONS):
        return True
    depth, quote = 0, None
    for ch in value:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[({":
            depth += 1
        elif ch in "])}":
            depth -= 1
        elif ch == "," and depth == 0:
            return True
    return False


def swept_keys(argv: list[str]) -> set[str]:
    keys = set()
    for arg in argv:
        if "=" in arg and not arg.startswith("-"):
            key, value = arg.split("=", 1)
            if _is_sweep(value):
                keys.add(key.lstrip("+~"))
    return keys


def run_name(task_overrides, _root_=None) -> str:
    """Folder (and TensorBoard run) name: the run's overrides, e.g. ``estimator=marginal,optim.lr=0.001``.

    In a sweep only the swept keys name the run: those swept on this process's command line and those of
    ``hydra.sweeper.params`` (e.g. set by an ``experiment=`` file); a run with no overrides is ``default``.
    The same command always maps to the same folder (see train.resume).
    """
    items = [str(o) for o in task_overrides]
    pairs = [(o.split("=", 1)[0].lstrip("+~"), o) for o in items if "=" in o]
    pairs = [(k, o) for k, o in pairs if k not in NAME_EXCLUDE]
    swept: set[str] = set()
    if _root_ is not None:
        multirun = str(OmegaConf.select(_root_, "hydra.mode", default=None)) == "RunMode.MULTIRUN"
    else:
        multirun = SWEPT_ENV in os.environ
    if multirun:
        swept = {k for k in os.environ.get(SWEPT_ENV, "").split(",") if k} | _config_swept_keys(_root_)
    if swept:
        pairs = [(k, o) for k, o in pairs if k in swept] or pairs
    name = ",".join(o.lstrip("+~") for _, o in sorted(pairs)).replace("/", "_")
    return name or "default"


def _config_swept_keys(root) -> set[str]:
    params = OmegaConf.select(root, "hydra.sweeper.params", default=None) if root is not None else None
    return {str(k).lstrip("+~") for k in params} if params else set()


#: the keys swept on the command line of the process that started a multirun, for the run names of its jobs
#: (set here, in that process; launchers that run jobs in other processes, e.g. joblib, inherit it)
SWEPT_ENV = "SBN_TRAIN_SWEPT_KEYS"
if Path(sys.argv[0]).name in ("sbn-train", "cli.py") and ("-m" in sys.argv or "--multirun" in sys.argv):
    os.environ[SWEPT_ENV] = ",".join(sorted(swept_keys(sys.argv[1:])))

OmegaConf.register_new_resolver("run_name", run_name, replace=True)
register_configs()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} requested but CUDA is not available; use device=cpu or device=auto")
    return torch.device(name)


def main_task(cfg: DictConfig) -> dict:
    from .data import load_dataset
    from .estimators import estimator_from_config
    from .models import SBN
    from .train import RunSettings, run

    typed: Config = OmegaConf.to_object(cfg)
    validate(typed)
    device = resolve_device(typed.device)
    choices = HydraConfig.get().runtime.choices
    out_dir = HydraConfig.get().runtime.output_dir
    torch.manual_seed(typed.seed)
    splits = load_dataset(**OmegaConf.to_container(cfg.dataset, resolve=True))
    train = splits.train.to(device)
    splits.train, splits.valid, splits.test = train, splits.valid.to(device), splits.test.to(device)
    model = SBN(train.shape[1], typed.model.latent_sizes, typed.model.n_hidden, x_mean=train.mean(0)).to(device)
    estimator = estimator_from_config(OmegaConf.to_container(cfg.estimator, resolve=True), model).to(device)
    hparams = {"estimator": choices.get("estimator"), "model": choices.get("model"),
               "dataset": choices.get("dataset"), "experiment": choices.get("experiment") or "",
               "optim": typed.optim.name, "lr": typed.optim.lr,
               "weight_decay": typed.optim.weight_decay, "batch_size": typed.train.batch_size,
               "max_steps": typed.train.max_steps, "latent_sizes": str(typed.model.latent_sizes),
               "n_hidden": typed.model.n_hidden, "seed": typed.seed}
    log.info("run folder: %s", out_dir)
    settings = RunSettings(train=typed.train, optim=typed.optim, eval=typed.eval, variance=typed.variance,
                           test=typed.test, seed=typed.seed)
    config = {**OmegaConf.to_container(cfg, resolve=True), "estimator_choice": choices.get("estimator")}
    result = run(model, estimator, splits, settings, out_dir, hparams, config=config)
    log.info("finished at step %d: %s", result.step,
             ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items() if isinstance(v, float)))
    return result.metrics


def _expected_errors() -> tuple[type[BaseException], ...]:
    from .data import DataError
    from .train import RunError
    return (ConfigError, DataError, RunError, ValueError)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def main(cfg: DictConfig) -> float:
    """Returns the run's best validation bound (the objective of the lr_search sweeper)."""
    from .train import Stopped
    try:
        return float(main_task(cfg)["best/valid"])
    except Stopped as e:
        print(f"sbn-train: {e}; continue with: {resume_command()}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except Exception as e:
        _record_failure(e)
        if not isinstance(e, _expected_errors()):
            raise
        # short, actionable message instead of a traceback
        print(f"sbn-train: error: {e}", file=sys.stderr)
        if HydraConfig.get().mode.name == "MULTIRUN":
            raise   # Hydra records the failed job and goes on with the sweep
        sys.exit(2)


def resume_command() -> str:
    """The command line that continues this run (or sweep) from its checkpoint."""
    args = [a for a in sys.argv[1:] if not a.split("=", 1)[0].lstrip("+~") in ("train.resume", "train.overwrite")]
    hc = HydraConfig.get()
    if hc.mode.name == "MULTIRUN" and not any(a.startswith("hydra.sweep.dir=") for a in args):
        args.append(f"hydra.sweep.dir={hc.sweep.dir}")
    return " ".join(["sbn-train", *map(_quote, args), "train.resume=true"])


def _quote(arg: str) -> str:
    import shlex
    return shlex.quote(arg)


def _record_failure(e: Exception) -> None:
    """``failed.json`` in the run folder (written atomically: always valid JSON), so that reports list the run
    as failed and say why. If the folder cannot be written either, one warning line says so."""
    from .train import FAILED
    try:
        out = Path(HydraConfig.get().runtime.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (FAILED + ".tmp")
        tmp.write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}, indent=2))
        os.replace(tmp, out / FAILED)
    except Exception as err:  # noqa: BLE001 - reporting a failure must not hide it
        print(f"sbn-train: warning: could not record the failure in the run folder ({err})", file=sys.stderr)


if __name__ == "__main__":
    main()
