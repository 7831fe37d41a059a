"""Synthetic data: samples from a small random linear sigmoid belief network.

Generated on the fly from a fixed seed (see :func:`_synthetic_sbn_parameters`), never cached;
``data_dir`` is unused.  ``image_shape`` is ``(s, s)`` when ``x_dim == s * s`` (so the default
``x_dim=64`` gives 8 x 8 images for TensorBoard), else ``None``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .common import DatasetConfig, DataError, Splits, int_option


@dataclass
class SyntheticConfig(DatasetConfig):
    """Schema of ``configs/dataset/synthetic.yaml``."""

    name: str = "synthetic"
    x_dim: int = 64  # visible units
    latent_sizes: list[int] = field(default_factory=lambda: [8, 8])  # bottom (next to x) to top
    n_train: int = 2000
    n_valid: int = 500
    n_test: int = 500
    seed: int = 0  # seeds both the network's parameters and the samples
    weight_scale: float = 2.0  # weights ~ N(0, weight_scale^2 / fan_in)


def load(
    data_dir: Any,
    x_dim: Any,
    latent_sizes: Any,
    n_train: Any,
    n_valid: Any,
    n_test: Any,
    seed: Any,
    weight_scale: Any,
) -> Splits:
    del data_dir  # nothing is read or written
    x_dim = int_option("x_dim", x_dim, minimum=1)
    if isinstance(latent_sizes, (str, bytes)) or not hasattr(latent_sizes, "__iter__"):
        raise DataError(f"dataset option latent_sizes must be a list of positive integers, got {latent_sizes!r}")
    latent_sizes = [int_option("latent_sizes[]", h, minimum=1) for h in latent_sizes]
    if not latent_sizes:
        raise DataError("dataset option latent_sizes must list at least one layer size")
    counts = [int_option(k, v, minimum=1) for k, v in (("n_train", n_train), ("n_valid", n_valid), ("n_test", n_test))]
    seed = int_option("seed", seed, minimum=0)
    if isinstance(weight_scale, bool) or not isinstance(weight_scale, (int, float)) or weight_scale < 0:
        raise DataError(f"dataset option weight_scale must be a non-negative number, got {weight_scale!r}")

    generator = torch.Generator().manual_seed(seed)
    params = _synthetic_sbn_parameters(x_dim, latent_sizes, float(weight_scale), generator)
    x = _sample_sbn(params, sum(counts), generator)  # [n_train + n_valid + n_test, x_dim]
    train, valid, test = torch.split(x, counts)
    side = math.isqrt(x_dim)
    return Splits(
        train=train.contiguous(),
        valid=valid.contiguous(),
        test=test.contiguous(),
        name="synthetic",
        image_shape=(side, side) if side * side == x_dim else None,
    )


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
    """Ancestral sampling top-down; returns ``x = z_0`` as float32 0/1, ``[n, x_dim]``."""
    def bernoulli(logits: torch.Tensor) -> torch.Tensor:
        return (torch.rand(logits.shape, generator=generator) < torch.sigmoid(logits)).float()

    z = bernoulli(params["top_bias"].expand(n, -1))
    for weight, bias in zip(reversed(params["weights"]), reversed(params["biases"])):
        z = bernoulli(z @ weight.T + bias)
    return z
