"""A guard for tests: code that reads a tensor's value back to the host raises :class:`HostSyncError`.

    with no_host_sync():
        out = estimator(model, x, generator)
        out.surrogate.backward()

On a GPU such a read waits for every queued kernel (a full synchronization in eager mode) and makes a
step impossible to capture in a CUDA graph; on a CPU it costs nothing, so it goes unnoticed there. The
guard catches, on any device:

  * aten ops that copy a value to the host or whose output shape depends on the data (seen through a
    TorchDispatchMode): ``_local_scalar_dense`` (behind ``.item()``, ``float()``, ``int()``, ``bool()``,
    ``if tensor:``), ``is_nonzero``, ``nonzero`` (``torch.where(cond)``, ``argwhere``), ``masked_select``,
    ``unique``, ``equal``, ``allclose``, indexing with a boolean mask, ``repeat_interleave`` without an
    output size, copies from a device to the CPU;
  * Python-level reads that dispatch no aten op on a CPU tensor, patched for the duration:
    ``Tensor.tolist``, ``.numpy``, ``.cpu``, ``.item`` and ``torch.tensor`` given tensors.

The error names the operation and the first caller outside torch (file:line).
"""
from __future__ import annotations

import contextlib
import os
import traceback
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncError", "no_host_sync"]

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_THIS_FILE = os.path.abspath(__file__)


class HostSyncError(RuntimeError):
    """A tensor value was read back to the host inside :func:`no_host_sync`."""


def _caller() -> str:
    """file:line (function) of the innermost frame outside torch and this module."""
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if not path.startswith(_TORCH_DIR) and path != _THIS_FILE:
            return f"{frame.filename}:{frame.lineno} ({frame.name})"
    return "<unknown caller>"


def _fail(op: str) -> None:
    raise HostSyncError(f"host synchronization: {op} at {_caller()}")


def _packets(*names: str) -> frozenset:
    """The aten overload packets of these names that this torch build has."""
    return frozenset(getattr(torch.ops.aten, n) for n in names if hasattr(torch.ops.aten, n))


# ops whose result is a host value or has a data-dependent shape, whatever their arguments
_ALWAYS = _packets("_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "_unique", "_unique2",
                   "unique_dim", "unique_consecutive", "unique_dim_consecutive", "equal", "allclose")
# ops that sync only with boolean-mask indices
_INDEXING = _packets("index", "index_put", "index_put_", "_index_put_impl_")


def _is_mask(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


def _sync_reason(func, args, kwargs) -> str | None:
    """Why this aten call reads a value back to the host, or None."""
    packet = func.overloadpacket
    if packet in _ALWAYS:
        return f"aten.{packet.__name__}"
    if packet in _INDEXING and len(args) > 1 and any(_is_mask(i) for i in (args[1] or ())):
        return f"aten.{packet.__name__} with a boolean mask"
    if packet is torch.ops.aten.repeat_interleave and kwargs.get("output_size") is None \
            and isinstance(args[0], torch.Tensor) and func is torch.ops.aten.repeat_interleave.Tensor:
        return "aten.repeat_interleave without output_size"
    if packet is torch.ops.aten._to_copy and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu" \
            and torch.device(kwargs.get("device") or args[0].device).type == "cpu":
        return "aten._to_copy to the CPU"
    if packet is torch.ops.aten.copy_ and args[0].device.type == "cpu" and args[1].device.type != "cpu":
        return "aten.copy_ to the CPU"
    return None


class _NoHostSyncMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = _sync_reason(func, args, kwargs)
        if reason is not None:
            _fail(reason)
        return func(*args, **kwargs)


def _has_tensor(data) -> bool:
    if isinstance(data, torch.Tensor):
        return True
    return isinstance(data, (list, tuple)) and any(_has_tensor(d) for d in data)


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Raise :class:`HostSyncError` on any read of a tensor value back to the host inside the block."""
    methods = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "cpu", "item")}
    tensor = torch.tensor

    def reader(name):
        def read(self, *args, **kwargs):
            _fail(f"Tensor.{name}")
        return read

    def guarded_tensor(data, *args, **kwargs):
        if _has_tensor(data):
            _fail("torch.tensor of tensors")
        return tensor(data, *args, **kwargs)

    try:
        for name in methods:
            setattr(torch.Tensor, name, reader(name))
        torch.tensor = guarded_tensor
        with _NoHostSyncMode():
            yield
    finally:
        for name, method in methods.items():
            setattr(torch.Tensor, name, method)
        torch.tensor = tensor
