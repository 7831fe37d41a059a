"""Fashion-MNIST (50,000 / 10,000 / 10,000 with the default ``n_valid=10000``).

The four official IDX files, read from ``<data_dir>/fashion_mnist/raw/`` (downloaded there if
missing), verified against their published md5 sums and parsed by :func:`parse_idx`.  The
validation split is the last ``n_valid`` rows of the official training set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

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
from .idx import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, read_idx_file

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# Published md5 sums of the official gzip'd IDX files.
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}


@dataclass
class FashionMnistConfig(DatasetConfig):
    """Schema of ``configs/dataset/fashion_mnist.yaml``."""

    name: str = "fashion_mnist"
    n_valid: int = 10000  # validation rows taken from the end of the official training set
    download_timeout: float = 10.0  # seconds per network operation


def load(data_dir: Any, n_valid: Any, download_timeout: Any) -> Splits:
    root = prepare_data_dir(data_dir)
    timeout = positive_float("download_timeout", download_timeout)
    n_valid = int_option("n_valid", n_valid, minimum=1)
    return _load_fashion_mnist(root, n_valid, timeout)


def _load_fashion_mnist(root_dir: str, n_valid: int, timeout: float) -> Splits:
    root = os.path.join(root_dir, "fashion_mnist")
    os.makedirs(root, exist_ok=True)
    tensors = cached(root, "fashion_mnist", torch.uint8, lambda: _build(root, timeout))
    return make_splits("fashion_mnist", tensors["train"], tensors["test"], n_valid)


def _build(root: str, timeout: float) -> tuple[dict[str, torch.Tensor], str]:
    files = {f: (FASHION_MNIST_URL + f, md5) for f, md5 in FASHION_MNIST_MD5.items()}
    paths = ensure_raw_files("fashion_mnist", os.path.join(root, "raw"), files, "md5", timeout)
    tensors = {
        "train": _idx_images(paths["train-images-idx3-ubyte.gz"], paths["train-labels-idx1-ubyte.gz"]),
        "test": _idx_images(paths["t10k-images-idx3-ubyte.gz"], paths["t10k-labels-idx1-ubyte.gz"]),
    }
    return tensors, "official IDX files"


def _idx_images(images_path: str, labels_path: str) -> torch.Tensor:
    """uint8 images ``[N, 784]`` of an IDX image file, checked against its label file."""
    images = read_idx_file(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx_file(labels_path, IDX_LABELS_MAGIC)
    if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE) or images.shape[0] < 1:
        raise DataError(f"{images_path}: images have shape {images.shape}, expected [N, 28, 28]")
    if labels.shape != images.shape[:1]:
        raise DataError(
            f"{labels_path}: {labels.shape[0]} labels for {images.shape[0]} images in {images_path}"
        )
    return torch.from_numpy(images.reshape(-1, IMAGE_DIM))
