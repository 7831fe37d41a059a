"""Where the Hydra configs live: ``configs/`` beside the package in a checkout or editable install,
``sbn_train/configs/`` inside a built wheel."""
from __future__ import annotations

from pathlib import Path


def config_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "configs", here / "configs"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"sbn-train configs not found next to {here}")
