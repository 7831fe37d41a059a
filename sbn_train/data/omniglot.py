"""Omniglot 28 x 28, IWAE version (23,000 / 1,345 / 8,070 with the default ``n_valid=1345``).

``chardata.mat`` from the IWAE repository (Burda et al.), read from ``<data_dir>/omniglot/raw/``
(downloaded there if missing): keys ``data`` (784 x 24,345) and ``testdata`` (784 x 8,070), one
image per column in MATLAB (column-major) pixel order.  Images are returned row-major.  Before the
validation rows are taken from the end, the training images are permuted with
``numpy.random.RandomState(shuffle_seed).permutation`` (default seed 123, as in the IWAE code, so
the default split is the IWAE split); ``shuffle_seed=None`` keeps file order.  No checksum of this
file is published, so it is checked by its keys, shapes and value range.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from .cache import cached
from .common import (
    IMAGE_DIM,
    IMAGE_SIDE,
    DataError,
    DatasetConfig,
    Splits,
    int_option,
    make_splits,
    positive_float,
    prepare_data_dir,
)
from .download import ensure_raw_files

OMNIGLOT_URL = "https://raw.githubusercontent.com/yburda/iwae/master/datasets/OMNIGLOT/chardata.mat"
OMNIGLOT_FILE = "chardata.mat"
# Number of images (columns) expected under each key of chardata.mat.
OMNIGLOT_COLUMNS = {"data": 24345, "testdata": 8070}


@dataclass
class OmniglotConfig(DatasetConfig):
    """Schema of ``configs/dataset/omniglot.yaml``."""

    name: str = "omniglot"
    n_valid: int = 1345  # validation rows taken from the end of the (permuted) training set
    shuffle_seed: Optional[int] = 123  # seed of that permutation (123: IWAE's split); None: file order
    download_timeout: float = 10.0  # seconds per network operation


def load(data_dir: Any, n_valid: Any, shuffle_seed: Any, download_timeout: Any) -> Splits:
    root = prepare_data_dir(data_dir)
    timeout = positive_float("download_timeout", download_timeout)
    n_valid = int_option("n_valid", n_valid, minimum=1)
    if shuffle_seed is not None:
        shuffle_seed = int_option("shuffle_seed", shuffle_seed, minimum=0)
    return _load_omniglot(root, n_valid, shuffle_seed, timeout)


def _load_omniglot(root_dir: str, n_valid: int, shuffle_seed: int | None, timeout: float) -> Splits:
    root = os.path.join(root_dir, "omniglot")
    os.makedirs(root, exist_ok=True)
    tensors = cached(root, "omniglot", torch.float32, lambda: _build(root, timeout))
    permutation = None
    if shuffle_seed is not None:
        permutation = np.random.RandomState(shuffle_seed).permutation(tensors["train"].shape[0])
    return make_splits("omniglot", tensors["train"], tensors["test"], n_valid, permutation)


def _build(root: str, timeout: float) -> tuple[dict[str, torch.Tensor], str]:
    # No checksum of chardata.mat is published; it is checked structurally.
    paths = ensure_raw_files(
        "omniglot", os.path.join(root, "raw"), {OMNIGLOT_FILE: (OMNIGLOT_URL, None)}, "sha256", timeout
    )
    return _read_chardata(paths[OMNIGLOT_FILE]), "IWAE chardata.mat"


def _read_chardata(path: str) -> dict[str, torch.Tensor]:
    """float32 ``{"train": [24345, 784], "test": [8070, 784]}``, images row-major."""
    import scipy.io  # imported here: only this path needs it

    try:
        mat = scipy.io.loadmat(path)
    except Exception as exc:
        raise DataError(
            f"{path} is not a readable MATLAB file ({exc}); delete it and retry, or replace "
            f"it with chardata.mat from {OMNIGLOT_URL}"
        ) from exc
    tensors = {}
    for key, out in (("data", "train"), ("testdata", "test")):
        if key not in mat:
            found = sorted(k for k in mat if not k.startswith("__"))
            raise DataError(f"{path} has no variable {key!r} (found: {found}); it is not the IWAE chardata.mat")
        array = np.asarray(mat[key])
        expected = (IMAGE_DIM, OMNIGLOT_COLUMNS[key])
        if array.shape != expected:
            raise DataError(f"{path}: {key!r} has shape {array.shape}, expected {expected}")
        array = array.astype(np.float32)
        if not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1):
            raise DataError(f"{path}: {key!r} has values outside [0, 1]")
        # Column n is image n in MATLAB's column-major pixel order: pixel (r, c)
        # sits at row r + 28 c.  Reading it back in that order and flattening
        # in C order gives row-major images (pixel (r, c) at 28 r + c).
        images = array.T.reshape((-1, IMAGE_SIDE, IMAGE_SIDE), order="F")
        tensors[out] = torch.from_numpy(np.ascontiguousarray(images.reshape(-1, IMAGE_DIM)))
    return tensors
