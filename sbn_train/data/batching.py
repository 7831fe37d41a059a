"""Dynamic binarization and the two ways data is batched: the training stream and evaluation passes.

:class:`TrainSampler` is the one training batcher: the training loop checkpoints it, and
:func:`train_batches` is only an iterator over it.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from .common import DataError


def binarize(x: Tensor, generator: torch.Generator) -> Tensor:
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


class TrainSampler:
    """Epoch-wise shuffled minibatches with dynamic binarization; its position is checkpointed.

    Each epoch draws one ``torch.randperm(N)`` on the generator's device and hands out its
    consecutive slices of exactly ``batch_size`` rows; the ``N % batch_size`` rows left at the end
    of a permutation are skipped that epoch (a fresh permutation starts the next batch), so no row
    appears twice within an epoch.  Each batch ``[batch_size, D]`` is binarized afresh from the same
    generator, which must live on ``data.device``.  Arguments are checked on construction.
    """

    def __init__(self, data: Tensor, batch_size: int, generator: torch.Generator):
        n = _check_data(data)
        batch_size = _batch_size(batch_size)
        if batch_size > n:
            raise DataError(f"train.batch_size={batch_size} exceeds the {n} training examples")
        _check_generator_device(generator, data.device)
        self.data, self.batch_size, self.generator = data, batch_size, generator
        self.perm: Tensor | None = None  # [N] row order of the current epoch
        self.pos = 0

    def next(self) -> Tensor:
        n = self.data.shape[0]
        if self.perm is None or self.pos + self.batch_size > n:
            self.perm = torch.randperm(n, generator=self.generator, device=self.generator.device)
            self.pos = 0
        idx = self.perm[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return binarize(self.data[idx.to(self.data.device)], self.generator)

    def state_dict(self) -> dict:
        return {"perm": None if self.perm is None else self.perm.cpu(), "pos": self.pos}

    def load_state_dict(self, s: dict) -> None:
        self.perm = None if s["perm"] is None else s["perm"].to(self.generator.device)
        self.pos = int(s["pos"])


def train_batches(data: Tensor, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless iterator over ``TrainSampler(data, batch_size, generator).next()``.

    The sampler is built (and the arguments checked) when this function is called, not when the
    first batch is requested.
    """
    sampler = TrainSampler(data, batch_size, generator)

    def stream() -> Iterator[Tensor]:
        while True:
            yield sampler.next()

    return stream()


def eval_batches(data: Tensor, batch_size: int, seed: int, limit: int | None = None) -> Iterator[Tensor]:
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

    def stream() -> Iterator[Tensor]:
        generator = torch.Generator(device=data.device)
        generator.manual_seed(seed)
        for start in range(0, n, batch_size):
            yield binarize(data[start : min(start + batch_size, n)], generator)

    return stream()


def _check_data(data: Tensor) -> int:
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
