"""``sbn-train``: the only place that sees a DictConfig. It builds typed objects and calls train.run."""
from __future__ import annotations

import logging
import os
import sys

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


def run_name(task_overrides) -> str:
    """Folder (and TensorBoard run) name: the run's overrides, e.g. ``estimator=marginal,optim.lr=0.001``.

    In a sweep started from this process's command line only the swept keys name the run; a run with
    no overrides is ``default``. The same command always maps to the same folder (see train.resume).
    """
    items = [str(o) for o in task_overrides]
    pairs = [(o.split("=", 1)[0].lstrip("+~"), o) for o in items if "=" in o]
    pairs = [(k, o) for k, o in pairs if k not in NAME_EXCLUDE]
    swept = swept_keys(sys.argv[1:]) if ("-m" in sys.argv or "--multirun" in sys.argv) else set()
    if swept:
        pairs = [(k, o) for k, o in pairs if k in swept] or pairs
    name = ",".join(o.lstrip("+~") for _, o in sorted(pairs)).replace("/", "_")
    return name or "default"


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
    from .train import run

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
               "dataset": choices.get("dataset"), "optim": typed.optim.name, "lr": typed.optim.lr,
               "weight_decay": typed.optim.weight_decay, "batch_size": typed.train.batch_size,
               "latent_sizes": str(typed.model.latent_sizes), "seed": typed.seed}
    log.info("run folder: %s", out_dir)
    result = run(model, estimator, splits, typed.train, typed.optim, typed.eval, typed.variance, out_dir,
                 typed.seed, hparams)
    log.info("finished at step %d: %s", result.step,
             ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items() if isinstance(v, float)))
    return result.metrics


def _expected_errors() -> tuple[type[BaseException], ...]:
    from .data import DataError
    from .train import RunError
    return (ConfigError, DataError, RunError, ValueError)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def main(cfg: DictConfig):
    try:
        return main_task(cfg)
    except _expected_errors() as e:
        # short, actionable message instead of a traceback
        print(f"sbn-train: error: {e}", file=sys.stderr)
        if HydraConfig.get().mode.name == "MULTIRUN":
            raise   # Hydra records the failed job and goes on with the sweep
        sys.exit(2)


if __name__ == "__main__":
    main()
