"""The registry of metric tags: one entry per TensorBoard tag (or family of tags), read by the training
loop, the TensorBoard layout (:mod:`sbn_train.tb`) and ``scripts/report.py``. Tags are an API: stable and
namespaced. Adding a metric is one entry here plus the code that computes it.

The names are chosen for TensorBoard's Time Series tab, the first screen of a run: it groups cards by the
tag's first path segment (``bounds/valid/elbo`` -> group ``bounds``) and orders the groups by name. So the
bounds tracked during training are ``bounds/{split}/...`` (the group that comes first), and each probe
value goes to TensorBoard as its log10 only (``grad_var_log10/...``: variances span orders of magnitude, a
linear axis shows a sliver); its linear value is in ``results.json``.

A pattern may hold ``{K}`` (the sample count of an importance-weighted bound), ``{l}`` (an inference layer,
1 = nearest the data) or ``{name}`` (anything, e.g. an estimator's own statistic).

Sources (where a value is computed):
    log        the training loop, every ``train.log_every`` steps
    eval       the periodic evaluation, every ``train.eval_every`` steps (:mod:`sbn_train.evaluation`)
    variance   the gradient-variance probe, every ``variance.every`` steps
    estimator  ``Estimate.metrics`` of the training step, logged with ``log``
    test       the final test of the best model (once, at the last step)
    results    ``results.json`` only (never a TensorBoard scalar)
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Iterable

COMPARED = "sbn-train: estimators compared"
PER_LAYER = "sbn-train: per layer"
LOG10 = "_log10"            # grad_var/inference -> grad_var_log10/inference: log10 of a probe value
BOUNDS = "bounds"           # bounds/train/elbo, bounds/valid/iwae50: the first group of the Time Series tab


def bounds_prefix(split: str) -> str:
    """The tag prefix of a split's bounds during training: ``valid`` -> ``bounds/valid``."""
    return f"{BOUNDS}/{split}"


@dataclass(frozen=True)
class Metric:
    pattern: str
    source: str
    doc: str
    hparam: bool = False                     # shown as a metric column in TensorBoard's HParams tab
    chart: tuple[str, str] | None = None     # (category, title) of its chart in the custom-scalars layout
    scalar: bool = True                      # written to TensorBoard (False: results.json only)
    requires: str | None = None              # logged only by a run with this: a variance view, or "iwae"

    @cached_property
    def regex(self) -> str:
        """The TensorBoard regex of the tag family, e.g. ``^valid/iwae\\d+$``."""
        out = re.escape(self.pattern)
        for hole, rx in (("{K}", r"\d+"), ("{l}", r"\d+"), ("{name}", r".+")):
            out = out.replace(re.escape(hole), rx)
        return f"^{out}$"

    def matches(self, tag: str) -> bool:
        return re.match(self.regex, tag) is not None

    def layer_regex(self, layer: int) -> str:
        """The regex of the family's tag of one inference layer, e.g. ``^grad_var_log10/layer2$``."""
        return self.regex.replace(r"\d+", str(layer), 1) if "{l}" in self.pattern else self.regex


_VAR = "the unbiased variance over M estimates of every gradient element, averaged over elements"
_LOG = "log10 of "
_PROBE = "results.json only; TensorBoard gets its log10"
METRICS: tuple[Metric, ...] = (
    # the charts of the custom-scalars layout appear in this order; variance and bias are charted as log10
    # (they differ by orders of magnitude between estimators)
    Metric("grad_var_log10/inference", "variance", _LOG + "grad_var/inference", hparam=True, requires="minibatch",
           chart=(COMPARED, "log10 gradient variance, inference net (paper's protocol: fresh minibatches)")),
    Metric("grad_var_log10_latent/inference", "variance", _LOG + "grad_var_latent/inference", requires="latent",
           chart=(COMPARED, "log10 gradient variance, inference net (one fixed minibatch: latent noise only)")),
    Metric("bounds/valid/elbo", "eval", "ELBO on (the first eval.limit rows of) the validation split, "
           "fixed-seed binarization and sampling", hparam=True, chart=(COMPARED, "validation ELBO")),
    Metric("bounds/valid/iwae{K}", "eval", "K-sample importance-weighted bound on the same rows; the best value "
           "picks best.pt (bounds/valid/elbo if eval.iwae_k=0)", hparam=True, requires="iwae",
           chart=(COMPARED, "validation importance-weighted bound")),
    Metric("bounds/train/elbo", "log", "mean single-sample ELBO of the training batches since the last log",
           hparam=True, chart=(COMPARED, "training ELBO (running)")),
    Metric("grad_var_log10/generative", "variance", _LOG + "grad_var/generative", requires="minibatch",
           chart=(COMPARED, "log10 gradient variance, generative net (paper's protocol)")),
    Metric("grad_bias_log10/inference", "variance", _LOG + "grad_bias/inference", requires="exact",
           chart=(COMPARED, "log10 squared bias vs the exact gradient, inference net")),
    Metric("perf/steps_per_s", "log", "training steps per second since the last log (measurements excluded)",
           chart=(COMPARED, "steps per second")),
    Metric("grad_var_log10/layer{l}", "variance", _LOG + "grad_var/layer{l}", requires="minibatch",
           chart=(PER_LAYER, "log10 gradient variance, inference layer {l} (paper's protocol)")),
    Metric("grad_var_log10_latent/layer{l}", "variance", _LOG + "grad_var_latent/layer{l}", requires="latent",
           chart=(PER_LAYER, "log10 gradient variance, inference layer {l} (latent noise only)")),
    # no chart of their own
    Metric("grad_var_log10/{name}", "variance", _LOG + "grad_var/{name}", requires="minibatch"),
    Metric("grad_var_log10_latent/{name}", "variance", _LOG + "grad_var_latent/{name}", requires="latent"),
    Metric("grad_bias_log10/{name}", "variance", _LOG + "grad_bias/{name}", requires="exact"),
    Metric("grad_mse_log10/{name}", "variance", _LOG + "grad_mse/{name}", requires="exact"),
    Metric("bounds/train/elbo_eval", "eval", "ELBO on the first eval.train_limit training rows", hparam=True),
    Metric("bounds/train/iwae{K}", "eval", "K-sample bound on the same rows", hparam=True, requires="iwae"),
    Metric("test/elbo", "test", "the best model on the test split: ELBO averaged over test.elbo_samples samples",
           hparam=True),
    Metric("test/iwae{K}", "test", "the best model's bound with K = test.iwae_k on the test split", hparam=True),
    Metric("test/elbo_se", "test", "standard error of test/elbo over test examples", scalar=False),
    Metric("test/iwae{K}_se", "test", "standard error of test/iwae{K} over test examples", scalar=False),
    Metric("perf/step_time_ms", "log", "milliseconds per training step since the last log"),
    Metric("estimator/{name}", "estimator", "what the estimator reports (e.g. baseline statistics)"),
    # the probe's linear values: results.json only (TensorBoard gets their log10, above)
    Metric("grad_var/inference", "variance", f"paper's protocol (M fresh training minibatches): {_VAR}, "
           f"inference net; {_PROBE}", requires="minibatch", scalar=False),
    Metric("grad_var_latent/inference", "variance", f"one fixed minibatch, M draws of the estimator's noise: "
           f"{_VAR}, inference net; {_PROBE}", requires="latent", scalar=False),
    Metric("grad_var/generative", "variance", "as grad_var/inference, generative net", requires="minibatch",
           scalar=False),
    Metric("grad_var/layer{l}", "variance", "as grad_var/inference, over inference layer l's parameters",
           requires="minibatch", scalar=False),
    Metric("grad_var_latent/layer{l}", "variance", "as grad_var_latent/inference, inference layer l",
           requires="latent", scalar=False),
    Metric("grad_var_latent/generative", "variance", "as grad_var_latent/inference, generative net",
           requires="latent", scalar=False),
    Metric("grad_bias/inference", "variance", "squared bias against the exact gradient, mean over "
           "inference-net elements (models with at most variance.exact_max_latents latent units); "
           + _PROBE, requires="exact", scalar=False),
    Metric("grad_bias/layer{l}", "variance", "as grad_bias/inference, inference layer l", requires="exact",
           scalar=False),
    Metric("grad_bias/generative", "variance", "as grad_bias/inference, generative net", requires="exact",
           scalar=False),
    Metric("grad_mse/inference", "variance", "mean squared error against the exact gradient, inference net; "
           + _PROBE, requires="exact", scalar=False),
    Metric("grad_mse/layer{l}", "variance", "as grad_mse/inference, inference layer l", requires="exact",
           scalar=False),
    Metric("grad_mse/generative", "variance", "as grad_mse/inference, generative net", requires="exact",
           scalar=False),
    Metric("best/valid", "results", "the best validation bound (the model kept as best.pt)", scalar=False),
    Metric("best/step", "results", "the step of best.pt", scalar=False),
)

#: TensorBoard tags that scripts/report.py reads (the variances as log10: see :func:`current_scalars`)
VARIANCE_TAG, LATENT_VARIANCE_TAG = "grad_var_log10/inference", "grad_var_log10_latent/inference"
VALID_TAG, VALID_BOUND_PREFIX = f"{BOUNDS}/valid/elbo", f"{BOUNDS}/valid/iwae"

#: the split prefixes of the bounds' tags before they moved under ``bounds/``, and the latent view's log10
#: family before ``_log10`` followed the quantity (runs written before then)
_OLD_BOUNDS, _OLD_LATENT_LOG10 = ("train/", "valid/"), "grad_var_latent_log10/"


@lru_cache(maxsize=4096)
def lookup(tag: str) -> Metric | None:
    """The registry entry of ``tag`` (the first whose pattern matches), or None."""
    return next((m for m in METRICS if m.matches(tag)), None)


def in_tensorboard(tag: str) -> bool:
    """Whether ``tag`` is written to TensorBoard (not a ``results.json``-only metric)."""
    m = lookup(tag)
    return m is None or m.scalar


def current_tag(tag: str) -> str:
    """Today's name of a tag an older run wrote: ``valid/elbo`` -> ``bounds/valid/elbo``,
    ``grad_var_latent_log10/x`` -> ``grad_var_log10_latent/x``; others unchanged."""
    if tag.startswith(_OLD_BOUNDS):
        return f"{BOUNDS}/{tag}"
    return tag.replace(_OLD_LATENT_LOG10, "grad_var_log10_latent/", 1) if tag.startswith(_OLD_LATENT_LOG10) else tag


def current_scalars(scalars: dict[str, list]) -> dict[str, list]:
    """The scalars ``{tag: [(step, value)]}`` of a run of any version under today's tags: older bound tags
    renamed (merged by step with today's, for a run resumed across the change), and the log10 series of a
    probe value logged only linearly (runs from before the log10 tags)."""
    out: dict[str, dict] = {}
    for tag, values in scalars.items():
        out.setdefault(current_tag(tag), {}).update(dict(values))
    for tag in list(out):
        m = lookup(tag)
        if m is not None and m.source == "variance" and not m.scalar:       # a linear probe value
            logs = {s: math.log10(v) for s, v in out[tag].items() if math.isfinite(v) and v > 0}
            out[log10_tag(tag)] = {**logs, **out.get(log10_tag(tag), {})}
    return {tag: sorted(values.items()) for tag, values in out.items()}


#: HParams metric columns shown first (TensorBoard shows five at first), then the others in registry order
HPARAM_FIRST = ("test/iwae{K}", "test/elbo", "bounds/valid/iwae{K}", "bounds/valid/elbo",
                "grad_var_log10/inference")


def hparam_tags(tags: Iterable[str]) -> list[str]:
    """The tags among ``tags`` that are HParams metrics: those of :data:`HPARAM_FIRST` first, then the
    others in registry order."""
    order = {m.pattern: i for i, m in enumerate(METRICS)}
    rank = {p: i - len(HPARAM_FIRST) for i, p in enumerate(HPARAM_FIRST)}
    out = []
    for tag in tags:
        m = lookup(tag)
        if m is not None and m.hparam:
            out.append((rank.get(m.pattern, order[m.pattern]), tag))
    return [tag for _, tag in sorted(out)]


def log10_tag(tag: str) -> str:
    """The tag of a probe value's log10, ``_log10`` after the quantity: ``grad_var/layer1`` ->
    ``grad_var_log10/layer1``, ``grad_var_latent/layer1`` -> ``grad_var_log10_latent/layer1`` (so the paper's
    protocol, ``grad_var_log10``, is the group TensorBoard's Time Series tab shows, and opens, first)."""
    family, _, rest = tag.partition("/")
    grad, quantity, *view = family.split("_")
    return f"{'_'.join([grad, quantity + LOG10, *view])}/{rest}"


ALL_VIEWS = ("minibatch", "latent", "exact")


def custom_scalars_layout(n_layers: int | None = None, views: Iterable[str] = ALL_VIEWS,
                          iwae: bool = True) -> dict[str, dict[str, list]]:
    """The custom-scalars layout: one multiline chart per charted tag family, every run one line in it.

    Only charts that the run will fill: ``views`` are the variance views it logs (``[]`` without the probe;
    no ``exact`` for a model above ``variance.exact_max_latents``), ``iwae`` whether it logs ``*/iwae{K}``.
    ``n_layers`` (the model's latent layers) gives one per-layer chart per layer, none for a one-layer model
    (its layer 1 is the inference net); None: one chart holding every layer. TensorBoard merges the layouts
    of the runs in a folder, so a sweep over models shows every chart some run fills.
    """
    have = set(views) | ({"iwae"} if iwae else set())
    layout: dict[str, dict[str, list]] = {}
    for m in METRICS:
        if m.chart is None or (m.requires is not None and m.requires not in have):
            continue
        category, title = m.chart
        if "{l}" not in m.pattern or n_layers is None:
            layout.setdefault(category, {})[title.replace(" {l}", "s")] = ["Multiline", [m.regex]]
        elif n_layers > 1:
            for layer in range(1, n_layers + 1):
                layout.setdefault(category, {})[title.replace("{l}", str(layer))] = ["Multiline", [m.layer_regex(layer)]]
    return layout
