"""Hydra schemas of ``configs/dataset/<name>.yaml``.

Each dataset's options dataclass is stored as ``schema/dataset/<name>`` in Hydra's ConfigStore, and
each yaml file lists ``/schema/dataset/<name>@_here_`` first in its defaults list, so composing it
checks its keys and types: ``dataset.n_vaild=5`` or ``dataset.n_valid=abc`` fail before a run starts.
The schemas live in their own group so that they never appear as ``dataset=`` choices.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from .registry import DATASETS

SCHEMA_GROUP = "schema/dataset"


def register_dataset_configs() -> None:
    cs = ConfigStore.instance()
    for name, spec in DATASETS.items():
        cs.store(group=SCHEMA_GROUP, name=name, node=spec.config)
