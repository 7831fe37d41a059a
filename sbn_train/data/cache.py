"""The tensor cache of an image dataset and the file-integrity helpers it rests on.

A dataset's cache is ``<root>/<name>.pt`` (``torch.save`` of ``{"train", "test"}``) plus its manifest
``<root>/<name>.json``, which records the tensor file's size, sha256 and every tensor's shape and dtype.
A cache that fails any check (missing or unreadable manifest, size or checksum mismatch, unreadable
file, wrong keys, shapes, dtypes or value range) is logged as a warning, deleted and rebuilt; it is
never used.  Both files are written to a temporary file in the same directory and moved into place
with ``os.replace``, the manifest last, so a killed process cannot leave a cache that passes the checks.

Concurrent first loads (the runs of a sweep) build a cache once: :func:`cached` checks it under a shared
``flock`` on ``<root>/<name>.lock`` and builds it under an exclusive one, so one process downloads and writes
while the others wait, then find the cache; none sees (and deletes) a cache half written.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import uuid
from typing import Callable, Iterator, Mapping

import torch

from .common import IMAGE_DIM

log = logging.getLogger(__name__)

# Bump when the cache layout changes: older caches are then rebuilt.
CACHE_FORMAT = 1


def file_digest(path: str, algorithm: str) -> str:
    """Hex digest (``"sha256"``, ``"md5"``, ...) of a file, read in 1 MiB blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def create_temp_beside(path: str, suffix: str) -> tuple[int, str]:
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


def atomic_write(path: str, payload: bytes) -> None:
    """Write ``payload`` to ``path`` via a temporary file in the same directory."""
    fd, tmp = create_temp_beside(path, ".tmp")
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


def cache_paths(root: str, name: str) -> tuple[str, str]:
    """(tensor file, manifest) of dataset ``name`` under ``root``."""
    return os.path.join(root, f"{name}.pt"), os.path.join(root, f"{name}.json")


def cached(
    root: str,
    name: str,
    dtype: torch.dtype,
    build: Callable[[], tuple[Mapping[str, torch.Tensor], str]],
) -> dict[str, torch.Tensor]:
    """The cached ``{"train", "test"}`` tensors of ``name``; when absent or invalid, ``build()`` makes
    them (returning the tensors and their source) and they are cached, by one process at a time."""
    lock = os.path.join(root, f"{name}.lock")  # left in place: removing a lock file races with its users
    with _locked(lock, fcntl.LOCK_SH):
        tensors = load_cache(root, name, dtype)
    if tensors is not None:
        return tensors
    with _locked(lock, fcntl.LOCK_EX):
        tensors = load_cache(root, name, dtype)  # built by another process while this one waited?
        if tensors is None:
            built, source = build()
            save_cache(root, name, built, source)
            tensors = dict(built)
    return tensors


@contextlib.contextmanager
def _locked(path: str, operation: int) -> Iterator[None]:
    """``flock`` on the file ``path`` for the block. Where it can be neither created nor opened (a
    read-only directory, holding a cache made elsewhere), the block runs without the lock."""
    fd = _open_lock(path)
    if fd is None:
        yield
        return
    try:
        fcntl.flock(fd, operation)
        yield
    finally:
        os.close(fd)  # releases the lock


def _open_lock(path: str) -> int | None:
    for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):
        try:
            return os.open(path, flags, 0o666)
        except OSError:
            continue
    return None


def save_cache(root: str, name: str, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Cache ``{"train": [N, 784], "test": [M, 784]}`` with a manifest naming ``source``."""
    tensor_path, manifest_path = cache_paths(root, name)
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
    atomic_write(tensor_path, payload)
    atomic_write(manifest_path, json.dumps(manifest, indent=2).encode("utf-8"))
    log.info("cached %s (%s) in %s", name, source, tensor_path)


def load_cache(root: str, name: str, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """The cached ``{"train", "test"}`` tensors, or ``None`` if absent or invalid."""
    tensor_path, manifest_path = cache_paths(root, name)
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


def _remove_cache(root: str, name: str) -> None:
    for path in cache_paths(root, name):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


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
    digest = file_digest(tensor_path, "sha256")
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
