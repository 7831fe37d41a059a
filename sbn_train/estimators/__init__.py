"""Gradient estimators for SBNs. Each is a file of ``configs/estimator/`` naming its class in ``_target_``.

    est = build_estimator("marginal", model)       # or build_estimator("nvil", model, ma_rate=0.1)
    out = est(model, x)                            # out.surrogate.backward(); out.elbo: [B]
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping

from hydra.utils import get_class
from omegaconf import OmegaConf

from ..models import SBN
from ..paths import config_dir
from .base import Estimate, Estimator

__all__ = ["Estimate", "Estimator", "build_estimator", "estimator_from_config", "available_estimators"]


def available_estimators() -> list[str]:
    return sorted(p.stem for p in (config_dir() / "estimator").glob("*.yaml"))


def estimator_from_config(cfg: Mapping[str, Any], model: SBN) -> Estimator:
    """Build from a mapping with ``_target_`` (a class path) and constructor keyword arguments."""
    cfg = dict(cfg)
    if "_target_" not in cfg:
        raise ValueError("estimator config needs a _target_ naming the estimator class")
    cls = get_class(cfg.pop("_target_"))
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "model"}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for estimator {cls.__name__}; allowed: {sorted(allowed)}")
    return cls(model=model, **cfg)


def build_estimator(name: str, model: SBN, **overrides: Any) -> Estimator:
    """Build the estimator described by ``configs/estimator/<name>.yaml``, with keyword overrides."""
    path = config_dir() / "estimator" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown estimator {name!r}; available: {', '.join(available_estimators())}")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    cfg.update(overrides)
    return estimator_from_config(cfg, model)
