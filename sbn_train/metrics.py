"""The registry of metric tags: one entry per TensorBoard tag (or family of tags), read by the training
loop, the TensorBoard layout (:mod:`sbn_train.tb`) and ``scripts/report.py``. Tags are an API: stable and
namespaced. Adding a metric is one entry here plus the code that computes it.

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

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable

COMPARED = "sbn-train: estimators compared"
PER_LAYER = "sbn-train: per layer"


@dataclass(frozen=True)
class Metric:
    pattern: str
    source: str
    doc: str
    hparam: bool = False                     # shown as a metric column in TensorBoard's HParams tab
    chart: tuple[str, str] | None = None     # (category, title) of its chart in the custom-scalars layout
    scalar: bool = True                      # written to TensorBoard (False: results.json only)

    @cached_property
    def regex(self) -> str:
        """The TensorBoard regex of the tag family, e.g. ``^valid/iwae\\d+$``."""
        out = re.escape(self.pattern)
        for hole, rx in (("{K}", r"\d+"), ("{l}", r"\d+"), ("{name}", r".+")):
            out = out.replace(re.escape(hole), rx)
        return f"^{out}$"

    def matches(self, tag: str) -> bool:
        return re.match(self.regex, tag) is not None


_VAR = "the unbiased variance over M estimates of every gradient element, averaged over elements"
METRICS: tuple[Metric, ...] = (
    # the charts of the custom-scalars layout appear in this order
    Metric("grad_var/inference", "variance", f"paper's protocol (M fresh training minibatches): {_VAR}, "
           "inference net", hparam=True, chart=(COMPARED, "gradient variance, inference net (paper's protocol)")),
    Metric("grad_var_latent/inference", "variance", f"one fixed minibatch, M draws of the estimator's noise: "
           f"{_VAR}, inference net", chart=(COMPARED, "gradient variance, inference net (latent noise only)")),
    Metric("grad_var/generative", "variance", "as grad_var/inference, generative net",
           chart=(COMPARED, "gradient variance, generative net")),
    Metric("valid/elbo", "eval", "ELBO on (the first eval.limit rows of) the validation split, fixed-seed "
           "binarization and sampling", hparam=True, chart=(COMPARED, "validation ELBO")),
    Metric("valid/iwae{K}", "eval", "K-sample importance-weighted bound on the same rows; the best value "
           "picks best.pt (valid/elbo if eval.iwae_k=0)", hparam=True,
           chart=(COMPARED, "validation importance-weighted bound")),
    Metric("train/elbo", "log", "mean single-sample ELBO of the training batches since the last log",
           hparam=True, chart=(COMPARED, "training ELBO (running)")),
    Metric("grad_bias/inference", "variance", "squared bias against the exact gradient, mean over "
           "inference-net elements (models with at most variance.exact_max_latents latent units)",
           chart=(COMPARED, "squared bias vs exact gradient, inference net")),
    Metric("perf/steps_per_s", "log", "training steps per second since the last log (measurements excluded)",
           chart=(COMPARED, "steps per second")),
    Metric("grad_var/layer{l}", "variance", "as grad_var/inference, over inference layer l's parameters",
           chart=(PER_LAYER, "gradient variance per inference layer (paper's protocol)")),
    Metric("grad_var_latent/layer{l}", "variance", "as grad_var_latent/inference, inference layer l",
           chart=(PER_LAYER, "gradient variance per inference layer (latent noise only)")),
    # no chart of their own
    Metric("grad_var_latent/generative", "variance", "as grad_var_latent/inference, generative net"),
    Metric("grad_bias/layer{l}", "variance", "as grad_bias/inference, inference layer l"),
    Metric("grad_bias/generative", "variance", "as grad_bias/inference, generative net"),
    Metric("grad_mse/inference", "variance", "mean squared error against the exact gradient, inference net"),
    Metric("grad_mse/layer{l}", "variance", "as grad_mse/inference, inference layer l"),
    Metric("grad_mse/generative", "variance", "as grad_mse/inference, generative net"),
    Metric("train/elbo_eval", "eval", "ELBO on the first eval.train_limit training rows", hparam=True),
    Metric("train/iwae{K}", "eval", "K-sample bound on the same rows", hparam=True),
    Metric("test/elbo", "test", "the best model on the test split: ELBO averaged over test.elbo_samples samples",
           hparam=True),
    Metric("test/iwae{K}", "test", "the best model's bound with K = test.iwae_k on the test split", hparam=True),
    Metric("test/elbo_se", "test", "standard error of test/elbo over test examples", scalar=False),
    Metric("test/iwae{K}_se", "test", "standard error of test/iwae{K} over test examples", scalar=False),
    Metric("perf/step_time_ms", "log", "milliseconds per training step since the last log"),
    Metric("estimator/{name}", "estimator", "what the estimator reports (e.g. baseline statistics)"),
    Metric("best/valid", "results", "the best validation bound (the model kept as best.pt)", scalar=False),
    Metric("best/step", "results", "the step of best.pt", scalar=False),
)

#: tags that scripts/report.py reads
VARIANCE_TAG, LATENT_VARIANCE_TAG, VALID_TAG = "grad_var/inference", "grad_var_latent/inference", "valid/elbo"


def lookup(tag: str) -> Metric | None:
    """The registry entry of ``tag`` (the first whose pattern matches), or None."""
    return next((m for m in METRICS if m.matches(tag)), None)


def hparam_tags(tags: Iterable[str]) -> list[str]:
    """The tags among ``tags`` that are HParams metrics, in the given order."""
    out = []
    for tag in tags:
        m = lookup(tag)
        if m is not None and m.hparam:
            out.append(tag)
    return out


def custom_scalars_layout() -> dict[str, dict[str, list]]:
    """The custom-scalars layout: one multiline chart per charted tag family, every run one line in it."""
    layout: dict[str, dict[str, list]] = {}
    for m in METRICS:
        if m.chart is not None:
            category, title = m.chart
            layout.setdefault(category, {})[title] = ["Multiline", [m.regex]]
    return layout
