"""Pieces every dataset module shares: the error type, the split container, the config base class,
option checks and the train / valid / test split of an official train + test pair."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

IMAGE_SIDE = 28
IMAGE_DIM = IMAGE_SIDE * IMAGE_SIDE

#: default of every dataset's ``data_dir`` (resolved by OmegaConf when the config is composed)
DATA_DIR_DEFAULT = "${oc.env:SBN_TRAIN_DATA,'~/.cache/sbn-train'}"

#: config keys that every dataset has and that are not options of its loader
COMMON_KEYS = ("name", "data_dir")


class DataError(RuntimeError):
    """A dataset cannot be loaded or used; the message says what to do about it."""


@dataclass
class Splits:
    """A dataset split three ways; each tensor is ``[N, D]`` float32 on the CPU."""

    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    name: str
    image_shape: tuple[int, int] | None


@dataclass
class DatasetConfig:
    """Keys shared by every ``configs/dataset/<name>.yaml``; each dataset subclasses it with its options.

    A subclass redefines ``name`` with its own default; the field keeps its place, so every schema
    starts with ``name, data_dir`` like the yaml files.
    """

    name: str = "?"
    data_dir: str = DATA_DIR_DEFAULT


# ---------------------------------------------------------------------------
# Option checking (library callers bypass the typed configs, so loaders check values themselves)
# ---------------------------------------------------------------------------


def int_option(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"dataset option {key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def positive_float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise DataError(f"dataset option {key} must be a positive number, got {value!r}")
    return float(value)


def prepare_data_dir(data_dir: Any) -> str:
    """``data_dir`` with ``~`` expanded, created if missing; a :class:`DataError` if that is impossible."""
    if data_dir is None or str(data_dir).strip() == "":
        raise DataError(
            "dataset.data_dir is empty; set it (or the SBN_TRAIN_DATA environment "
            "variable) to a writable directory"
        )
    root = os.path.expanduser(str(data_dir))
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"cannot create data directory {root!r} ({exc}); set dataset.data_dir "
            "(or SBN_TRAIN_DATA) to a writable directory"
        ) from exc
    return root


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else repr(exc)


# ---------------------------------------------------------------------------
# Splitting an official (train, test) pair of image tensors
# ---------------------------------------------------------------------------


def make_splits(
    name: str,
    train_full: torch.Tensor,
    test: torch.Tensor,
    n_valid: int,
    permutation: np.ndarray | None = None,
) -> Splits:
    """Valid = the last ``n_valid`` rows of ``train_full`` (after ``permutation``), train = the rest.

    ``train_full`` ``[N, 784]`` and ``test`` ``[M, 784]`` hold uint8 pixel values or float32
    intensities; the splits hold float32 intensities in [0, 1].
    """
    n = train_full.shape[0]
    if not 1 <= n_valid < n:
        raise DataError(
            f"{name}: n_valid={n_valid} must be between 1 and {n - 1} (the official "
            f"training set has {n} rows)"
        )
    if permutation is not None:
        train_full = train_full[torch.from_numpy(permutation)]
    train_full = _to_intensity(train_full)
    test = _to_intensity(test)
    cut = n - n_valid
    return Splits(
        train=train_full[:cut].contiguous(),
        valid=train_full[cut:].contiguous(),
        test=test.contiguous(),
        name=name,
        image_shape=(IMAGE_SIDE, IMAGE_SIDE),
    )


def _to_intensity(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.uint8:
        return t.to(torch.float32).div_(255.0)
    return t.to(torch.float32)
