"""Typed schemas for the Hydra config. Composition validates types and key names against these
(a typo such as ``train.batchsize=10`` fails at compose time); ``validate`` checks values."""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from hydra.core.config_store import ConfigStore


class ConfigError(ValueError):
    """A config value that cannot work; the message says which and what to use instead."""


@dataclass
class ModelConfig:
    latent_sizes: list[int] = field(default_factory=lambda: [200, 200])   # variables per latent layer
    n_hidden: int = 0            # tanh hidden layers per conditional as wide as its input (0: linear SBN)
    family: str = "bernoulli"    # bernoulli | categorical (the latent variables' family)
    classes: int = 2             # K, the values of a categorical variable (a bit has 2)
    hidden: list[int] = field(default_factory=list)   # hidden widths of every conditional instead of n_hidden
    activation: str = "tanh"     # tanh | leaky_relu, after every hidden layer
    learn_prior: bool = True     # false: the top layer's prior fixed at uniform


@dataclass
class OptimConfig:
    name: str = "rmsprop"        # rmsprop | adam
    lr: float = 3e-4
    weight_decay: float = 0.0
    alpha: float = 0.99          # RMSprop decay
    eps: float = 1e-8
    beta1: float = 0.9
    beta2: float = 0.999


@dataclass
class TrainConfig:
    batch_size: int = 100
    max_steps: int = 10000
    eval_every: int = 1000       # evaluation + checkpoint interval (steps)
    log_every: int = 100
    resume: bool = False         # continue the run in this folder from its last checkpoint
    overwrite: bool = False      # discard an existing run in this folder and start again
    progress: bool = True        # progress bar on stderr
    checkpoint_minutes: float = 10.0   # also checkpoint by wall time (0: only every eval_every steps)
    divergence_nats: float = 1.0       # stop when bounds/train/elbo falls this many nats per data dimension below
                                       # where it started: the lower of the initial validation
                                       # ELBO and -D log 2 (0: only NaN/inf stop a run)
    cuda_graph: Optional[bool] = None  # capture the training step as a CUDA graph (None: on for CUDA)
    replicas: int = 1                  # in a sweep: train up to this many jobs that differ only in seed,
                                       # optim.lr and optim.weight_decay as one process (a replica group)


@dataclass
class EvalConfig:
    """Periodic evaluation (every ``train.eval_every`` steps) on the training and validation splits."""
    batch_size: int = 500        # data rows per chunk
    limit: Optional[int] = None  # evaluate on the first `limit` validation rows (None: all)
    train_split: bool = True     # also evaluate the training split (bounds/train/elbo_eval, bounds/train/iwae{K})
    train_limit: Optional[int] = 10000   # ... on its first `train_limit` rows (None: all)
    iwae_k: int = 50             # samples of the importance-weighted bound (0: skip)
    seed: int = 1234             # fixed binarization / sampling seed for evaluation
    max_rows: int = 65536        # bound on the rows (data x samples) processed at once
    images: int = 64             # data / sample / reconstruction images per TensorBoard grid (0: none)


@dataclass
class TestConfig:
    """The final evaluation of the best model (``best.pt``) on the test split."""
    __test__ = False             # not a pytest test class
    enabled: bool = True
    batch_size: int = 100        # data rows per chunk
    limit: Optional[int] = None  # the first `limit` test rows (None: all)
    elbo_samples: int = 100      # ELBO averaged over this many samples per example (the paper: 50,000)
    iwae_k: int = 1000           # K of the importance-weighted bound (the paper: 50,000)
    seed: int = 4321
    max_rows: int = 65536        # bound on the rows (data x samples) processed at once


#: views of the gradient-variance probe
VARIANCE_VIEWS = ("minibatch", "latent", "exact")


@dataclass
class VarianceConfig:
    every: int = 2000            # 0: never
    samples: int = 100           # M independent estimates per view (the paper: 1000)
    views: list[str] = field(default_factory=lambda: list(VARIANCE_VIEWS))
    exact_max_latents: int = 12  # the "exact" view runs only for models with at most this many latent units


@dataclass
class Config:
    dataset: Any = None
    model: ModelConfig = field(default_factory=ModelConfig)
    estimator: Any = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    test: TestConfig = field(default_factory=TestConfig)
    variance: VarianceConfig = field(default_factory=VarianceConfig)
    seed: int = 0
    device: str = "auto"         # auto | cpu | cuda | cuda:N
    threads: str = "auto"        # CPU threads of torch: auto (usable cores / runs at once) | N (sbn_train/threads.py)


def _positive(name: str, value, allow_zero: bool = False) -> None:
    bad = value is None or (value < 0 if allow_zero else value <= 0)
    if bad or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else 'positive'}"
                          f"{' and finite' if isinstance(value, float) else ''}, got {value}")


def _unit_interval(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0 <= value < 1):
        raise ConfigError(f"{name} must be in [0, 1), got {value}")


def _finite_floats(node: Any, prefix: str = "") -> None:
    """Every float of the typed config must be finite (a NaN passes every ``<`` check silently)."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            _finite_floats(value, f"{prefix}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{prefix}{f.name} must be finite, got {value}")


def validate(cfg: Config) -> None:
    """Raise :class:`ConfigError` for values that type checking cannot catch."""
    sizes = list(cfg.model.latent_sizes)
    if not sizes or any(h <= 0 for h in sizes):
        raise ConfigError(f"model.latent_sizes must be a non-empty list of positive ints, got {sizes}")
    _positive("model.n_hidden", cfg.model.n_hidden, allow_zero=True)
    from .models import ACTIVATIONS, FAMILIES
    if cfg.model.family not in FAMILIES:
        raise ConfigError(f"model.family must be one of {', '.join(FAMILIES)}, got {cfg.model.family!r}")
    if cfg.model.family == "categorical" and cfg.model.classes < 2:
        raise ConfigError(f"model.classes must be >= 2 (the values of a categorical variable), "
                          f"got {cfg.model.classes}")
    if any(w <= 0 for w in cfg.model.hidden):
        raise ConfigError(f"model.hidden must list positive widths, got {list(cfg.model.hidden)}")
    if cfg.model.hidden and cfg.model.n_hidden:
        raise ConfigError("model.hidden and model.n_hidden exclude each other; set model.n_hidden=0 with "
                          "model.hidden")
    if cfg.model.activation not in ACTIVATIONS:
        raise ConfigError(f"model.activation must be one of {', '.join(ACTIVATIONS)}, got {cfg.model.activation!r}")
    if cfg.optim.name not in ("rmsprop", "adam"):
        raise ConfigError(f"optim.name must be 'rmsprop' or 'adam', got {cfg.optim.name!r}")
    _positive("optim.lr", cfg.optim.lr)
    _positive("optim.weight_decay", cfg.optim.weight_decay, allow_zero=True)
    _positive("optim.eps", cfg.optim.eps)
    for key in ("alpha", "beta1", "beta2"):
        _unit_interval(f"optim.{key}", getattr(cfg.optim, key))
    _positive("train.batch_size", cfg.train.batch_size)
    _positive("train.max_steps", cfg.train.max_steps)
    _positive("train.replicas", cfg.train.replicas)
    _positive("train.eval_every", cfg.train.eval_every)
    _positive("train.log_every", cfg.train.log_every)
    _positive("train.checkpoint_minutes", cfg.train.checkpoint_minutes, allow_zero=True)
    _positive("train.divergence_nats", cfg.train.divergence_nats, allow_zero=True)
    _positive("eval.batch_size", cfg.eval.batch_size)
    _positive("eval.iwae_k", cfg.eval.iwae_k, allow_zero=True)
    if cfg.eval.limit is not None:
        _positive("eval.limit", cfg.eval.limit)
    if cfg.eval.train_limit is not None:
        _positive("eval.train_limit", cfg.eval.train_limit)
    _positive("eval.max_rows", cfg.eval.max_rows)
    _positive("eval.images", cfg.eval.images, allow_zero=True)
    _positive("test.batch_size", cfg.test.batch_size)
    if cfg.test.limit is not None:
        _positive("test.limit", cfg.test.limit)
    _positive("test.elbo_samples", cfg.test.elbo_samples)
    _positive("test.iwae_k", cfg.test.iwae_k)
    _positive("test.max_rows", cfg.test.max_rows)
    _positive("variance.every", cfg.variance.every, allow_zero=True)
    if cfg.variance.every and cfg.variance.samples < 2:
        raise ConfigError(f"variance.samples must be >= 2 to estimate a variance, got {cfg.variance.samples}")
    bad = [v for v in cfg.variance.views if v not in VARIANCE_VIEWS]
    if bad or len(set(cfg.variance.views)) != len(cfg.variance.views):
        raise ConfigError(f"variance.views must be distinct names from {list(VARIANCE_VIEWS)}, "
                          f"got {list(cfg.variance.views)}")
    if not 0 <= cfg.variance.exact_max_latents <= 20:
        raise ConfigError(f"variance.exact_max_latents must be in [0, 20] (2^N configurations are enumerated), "
                          f"got {cfg.variance.exact_max_latents}")
    if cfg.train.resume and cfg.train.overwrite:
        raise ConfigError("train.resume and train.overwrite exclude each other; pick one")
    if not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    from .threads import parse_threads
    try:
        parse_threads(cfg.threads)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _finite_floats(cfg)


def unknown_keys(values: Mapping, schema: type = Config, prefix: str = "") -> list[str]:
    """The dotted keys of a composed config (as a plain mapping, without ``hydra``) that ``schema`` lacks,
    e.g. ``train.max_step`` added with ``+train.max_step=10``. ``dataset`` and ``estimator`` (typed ``Any``
    here) are left to their own schemas and option checks."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    out = []
    for key, value in values.items():
        f = fields.get(key)
        if f is None:
            out.append(f"{prefix}{key}")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default) and isinstance(value, Mapping):
            out += unknown_keys(value, type(default), f"{prefix}{key}.")
    return out


def check_keys(values: Mapping) -> None:
    """:class:`ConfigError` naming the first key the schema lacks, with the closest key it has."""
    bad = unknown_keys(values)
    if not bad:
        return
    key = bad[0]
    section, _, name = key.rpartition(".")
    schema: Any = Config
    for part in filter(None, section.split(".")):
        schema = type(getattr(schema(), part))
    known = [f.name for f in dataclasses.fields(schema)]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {section + '.' if section else ''}{close[0]}?" if close else ""
    raise ConfigError(f"{key} is not a config key{hint} ({section or 'the top level'} has: {', '.join(known)})")


#: where the schemas of the group files are stored: a group of their own, so that they are never offered as
#: options of ``model=`` or ``optim=`` (each file lists ``/schema/<group>/base@_here_`` in its defaults)
SCHEMA_GROUP = "schema"


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group=f"{SCHEMA_GROUP}/model", name="base", node=ModelConfig)
    cs.store(group=f"{SCHEMA_GROUP}/optim", name="base", node=OptimConfig)
    from .data.config import register_dataset_configs  # here: keeps torch out of this import
    register_dataset_configs()
