"""The datasets by name: each maps to its loader and its typed options (the schema of its yaml file).

Adding a dataset: a module with a ``DatasetConfig`` subclass and a ``load(data_dir, **options)``
function, one entry in :data:`DATASETS`, and ``configs/dataset/<name>.yaml``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from . import fashion_mnist, mnist, omniglot, synthetic
from .common import COMMON_KEYS, DatasetConfig, DataError, Splits


@dataclass(frozen=True)
class DatasetSpec:
    loader: Callable[..., Splits]  # loader(data_dir, **options) -> Splits
    config: type[DatasetConfig]  # name, data_dir and the options with their types and defaults


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(mnist.load, mnist.MnistConfig),
    "fashion_mnist": DatasetSpec(fashion_mnist.load, fashion_mnist.FashionMnistConfig),
    "omniglot": DatasetSpec(omniglot.load, omniglot.OmniglotConfig),
    "synthetic": DatasetSpec(synthetic.load, synthetic.SyntheticConfig),
}

DATASET_NAMES = tuple(DATASETS)


def option_defaults(name: str) -> dict[str, Any]:
    """Every option dataset ``name`` accepts (its config keys but ``name`` and ``data_dir``), with defaults."""
    values = dataclasses.asdict(DATASETS[name].config())
    return {key: value for key, value in values.items() if key not in COMMON_KEYS}


def load_dataset(name: str, data_dir: str, **options: Any) -> Splits:
    """Load dataset ``name``, using (and filling) the cache under ``data_dir``.

    ``data_dir`` has ``~`` expanded and is created if missing (the synthetic
    dataset does not touch it).  ``options`` are the dataset's keys from
    ``configs/dataset/<name>.yaml``; omitted ones take their defaults.  An
    unknown name or option raises :class:`DataError` before anything is created.
    """
    if name not in DATASETS:
        raise DataError(
            f"unknown dataset {name!r}; valid names are: {', '.join(DATASET_NAMES)}"
        )
    defaults = option_defaults(name)
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise DataError(
            f"unknown option(s) for dataset {name!r}: {', '.join(unknown)}; "
            f"valid options are: {', '.join(defaults)}"
        )
    return DATASETS[name].loader(data_dir, **{**defaults, **options})
