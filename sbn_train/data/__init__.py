"""Datasets for sbn-train: loading, caching, dynamic binarization and batching.

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
``TrainSampler(data, batch_size, generator)``
    The training stream: reshuffled every epoch, freshly binarized batches,
    with a checkpointable position (``train_batches`` iterates over it).
``eval_batches(data, batch_size, seed, limit=None)``
    One ordered pass with fixed-seed binarization, for evaluation.

Layout
------
``registry``  name -> (loader, typed options dataclass); ``load_dataset``.
``config``    registers those dataclasses as Hydra schemas of the yaml files.
``mnist``, ``fashion_mnist``, ``omniglot``, ``synthetic``  one module per dataset
              (sources, splits and options are documented there).
``cache``     the verified tensor cache (manifest, sha256, atomic writes).
``download``  source files under ``<data_dir>/<name>/raw/``: used if present, else downloaded.
``idx``       the IDX format of MNIST and Fashion-MNIST.
``batching``  binarization, ``TrainSampler``, ``eval_batches``.

Every image dataset keeps its files under ``<data_dir>/<name>/``: the tensor
cache ``<name>.pt`` with its manifest ``<name>.json`` (the official training
and test sets, checked on every load and rebuilt when a check fails), and
``raw/`` for source files.  The validation split is always the *last*
``n_valid`` rows of the official training set (for Omniglot: after a fixed
permutation), the training split the rows before it, and the test split the
official test set.

Importing this package has no side effects: nothing is downloaded or created
until :func:`load_dataset` is called, and torchvision and scipy are imported
only on the paths that need them.
"""

from .batching import TrainSampler, binarize, eval_batches, train_batches
from .common import DataError, DatasetConfig, Splits
from .fashion_mnist import FashionMnistConfig
from .idx import parse_idx, read_idx_file
from .mnist import MnistConfig
from .omniglot import OmniglotConfig
from .registry import DATASET_NAMES, DATASETS, load_dataset, option_defaults
from .synthetic import SyntheticConfig

__all__ = [
    "DATASETS",
    "DATASET_NAMES",
    "DataError",
    "DatasetConfig",
    "FashionMnistConfig",
    "MnistConfig",
    "OmniglotConfig",
    "Splits",
    "SyntheticConfig",
    "TrainSampler",
    "binarize",
    "eval_batches",
    "load_dataset",
    "option_defaults",
    "parse_idx",
    "read_idx_file",
    "train_batches",
]
