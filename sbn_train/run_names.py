"""Run folder names (also the run names TensorBoard shows): the overrides that define a run, readable and
stable, e.g. ``estimator=nvil,model=sbn_2layer,optim.lr=0.001``.

- A single run is named by its config-group choices ``estimator`` and ``model`` (always, defaults too) and
  its other overrides; in a sweep only the swept keys name a run (``estimator=nvil,seed=1``).
- Group choices come first (estimator, model, dataset, optim, experiment), then the other keys in sorted
  order. Overrides that change nothing a run computes or that name places (``train.resume``,
  ``train.overwrite``, ``train.progress``, ``train.checkpoint_minutes``, ``device``, ``threads``, ``dataset.data_dir``,
  any ``*_dir`` or ``*path`` key) are left out; ``/`` in a value becomes ``_``.
- A name longer than :data:`MAX_NAME` characters keeps its first items and ends with the number of items
  left out and a hash of the full name: ``estimator=nvil,model=sbn_2layer,...,+9_more-1f3a9c2e``. The full
  list is always in the run's ``.hydra/overrides.yaml``.

The same command always maps to the same folder (see ``train.resume``).
"""
from __future__ import annotations

import hashlib
import os

from omegaconf import OmegaConf

#: overrides that do not change what a run computes (or are places), never part of its name
NAME_EXCLUDE = ("train.resume", "train.overwrite", "train.progress", "train.checkpoint_minutes", "train.replicas",
                "device", "threads", "dataset.data_dir", "dataset.download_timeout")
#: config groups named first, in this order; estimator and model name every single run
GROUP_ORDER = ("estimator", "model", "dataset", "optim", "experiment")
ALWAYS_NAMED = ("estimator", "model")
#: longest folder name (file systems allow 255 bytes; TensorBoard's run list shows about this much)
MAX_NAME = 120
#: the keys swept on the command line of the process that started a multirun, for the run names of its jobs
#: (set by the CLI in that process; launchers that run jobs in other processes, e.g. joblib, inherit it)
SWEPT_ENV = "SBN_TRAIN_SWEPT_KEYS"
_SWEEP_FUNCTIONS = ("range(", "choice(", "glob(", "interval(", "tag(", "sort(", "shuffle(")


def is_sweep(value: str) -> bool:
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
            if is_sweep(value):
                keys.add(key.lstrip("+~"))
    return keys


def excluded(key: str) -> bool:
    last = key.rsplit(".", 1)[-1]
    return key in NAME_EXCLUDE or last.endswith("dir") or last.endswith("path")


def _order(key: str) -> tuple:
    return (GROUP_ORDER.index(key), "") if key in GROUP_ORDER else (len(GROUP_ORDER), key)


def shorten(items: list[str], limit: int = MAX_NAME) -> str:
    """``items`` joined by commas; past ``limit`` characters, the leading items that fit, the count of the
    others and a hash of the full name (so distinct lists keep distinct names)."""
    full = ",".join(items)
    if len(full) <= limit:
        return full
    digest = hashlib.sha1(full.encode()).hexdigest()[:8]
    kept: list[str] = []
    for item in items:
        tail = f"+{len(items) - len(kept) - 1}_more-{digest}"
        if len(",".join([*kept, item, tail])) > limit:
            break
        kept.append(item)
    if not kept:                              # one very long item: its first characters
        head = items[0][:limit - 20]
        return f"{head}...+{len(items) - 1}_more-{digest}"
    return ",".join([*kept, f"+{len(items) - len(kept)}_more-{digest}"])


def run_name(task_overrides, _root_=None) -> str:
    """The folder name of a run (the ``run_name`` resolver of configs/config.yaml)."""
    pairs = {}
    for item in map(str, task_overrides):
        if "=" in item:
            key = item.split("=", 1)[0].lstrip("+~")
            if not excluded(key):
                pairs[key] = item.lstrip("+~")
    if _root_ is not None:
        multirun = str(OmegaConf.select(_root_, "hydra.mode", default=None)) == "RunMode.MULTIRUN"
    else:
        multirun = SWEPT_ENV in os.environ
    if multirun:
        swept = {k for k in os.environ.get(SWEPT_ENV, "").split(",") if k} | _config_swept_keys(_root_)
        pairs = {k: v for k, v in pairs.items() if k in swept} or pairs
    elif _root_ is not None:
        for group in ALWAYS_NAMED:
            choice = OmegaConf.select(_root_, f"hydra.runtime.choices.{group}", default=None)
            if choice is not None and group not in pairs:
                pairs[group] = f"{group}={choice}"
    items = [pairs[k].replace("/", "_") for k in sorted(pairs, key=_order)]
    return shorten(items) or "default"


def _config_swept_keys(root) -> set[str]:
    params = OmegaConf.select(root, "hydra.sweeper.params", default=None) if root is not None else None
    return {str(k).lstrip("+~") for k in params} if params else set()
