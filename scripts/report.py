#!/usr/bin/env python
"""Tables and figures from a sweep folder, as in Tokui & Sato (2017).

    python scripts/report.py outputs/paper_cpu/2026-11-29_00-18-26 [--out DIR]

Reads every run folder below SWEEP (a folder holding results.json, failed.json, checkpoint.pt or
``.hydra/config.yaml``): its TensorBoard events (EventAccumulator), ``results.json``, and the run's own config
record (the config in its results.json or checkpoint, else the ``.hydra`` record the run wrote). For each dataset x model x estimator it picks the learning rate
whose runs reach the best validation ELBO (the highest ``bounds/valid/elbo`` seen during training, averaged over
seeds), and writes to DIR (default: SWEEP/report):

    table.md, table.csv, table.tex   test ELBO ("VB") and test importance-weighted bound ("MCB") of the best
                                     model, mean and standard error over seeds (CSV: one row per estimator);
                                     for runs without the final test (test.enabled=false), the best
                                     validation ELBO and bound instead
    figure.png                       gradient variance (log scale) and validation ELBO against iterations, one
                                     line per estimator (mean over seeds), one row of panels per dataset x model
    runs.csv                         every run found, with its status: finished, failed (and why), unfinished

Runs that failed or are unfinished are listed in table.md and on stdout, never silently dropped; a run
whose records cannot be read (a cut or empty file, a field of the wrong type) counts as failed, with the
reason.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sbn_train.metrics import (LATENT_VARIANCE_TAG, VALID_BOUND_PREFIX, VALID_TAG,  # noqa: E402  (the tag registry)
                                VARIANCE_TAG, current_scalars)

#: the paper's names for the estimator configs, in the paper's column order
LABELS = {"reinforce": "LR", "reinforce_ma": "LR+C", "nvil": "LR+C+IDB", "muprop": "MuProp+C+IDB",
          "leg": "LEG", "marginal": "marginal (RAM)", "marginal_paper_code": "RAM (published code)"}
DATASETS = {"mnist": "MNIST", "omniglot": "Omniglot", "fashion_mnist": "Fashion-MNIST", "synthetic": "synthetic"}


@dataclass
class Run:
    path: Path
    dataset: str
    model: str                      # e.g. "linear 200-200"
    estimator: str
    lr: float
    seed: int
    max_steps: int
    status: str                     # finished | failed | unfinished
    step: int = 0
    error: str = ""
    metrics: dict = field(default_factory=dict)
    scalars: dict = field(default_factory=dict)    # tag -> [(step, value)], today's tags (current_scalars)

    @property
    def best_valid_elbo(self) -> float:
        values = [v for _, v in self.scalars.get(VALID_TAG, []) if math.isfinite(v)]
        return max(values) if values else -math.inf

    @property
    def valid_k(self) -> int:
        """K of the validation bound the run logged (bounds/valid/iwae{K}), 0 if none."""
        n = len(VALID_BOUND_PREFIX)
        ks = [int(t[n:]) for t in self.scalars if t.startswith(VALID_BOUND_PREFIX) and t[n:].isdigit()]
        return max(ks, default=0)

    @property
    def best_valid_bound(self) -> float:
        values = [v for _, v in self.scalars.get(f"{VALID_BOUND_PREFIX}{self.valid_k}", []) if math.isfinite(v)]
        return max(values) if values else -math.inf

    @property
    def tested(self) -> bool:
        return "test/elbo" in self.metrics


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """The run's TensorBoard scalars under today's tags (older runs' tags renamed: ``current_scalars``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 1, "tensors": 1, "histograms": 1})
    acc.Reload()
    return current_scalars({tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]})


def read_run(folder: Path) -> Run:
    """The run in ``folder``; a run whose records cannot be read (a cut or empty file, wrong types) is a
    failed run with the reason, never an error of the whole report."""
    try:
        return _read_run(folder)
    except Exception as e:  # noqa: BLE001 - one malformed run must not cost the sweep its report
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return Run(path=folder, dataset="?", model="?", estimator="?", lr=math.nan, seed=-1, max_steps=0,
                   status="failed", error=f"records unreadable ({type(e).__name__}: {why})")


def _read_run(folder: Path) -> Run:
    results, failed = folder / "results.json", folder / "failed.json"
    data, problem = None, ""
    if results.exists():
        try:
            data = results_record(results)
        except ValueError as e:
            problem = str(e)
    who = run_identity(folder, data)
    run = Run(path=folder, status="unfinished", **who)
    run.scalars = read_scalars(folder)
    steps = [s for values in run.scalars.values() for s, _ in values]
    run.step = max(steps, default=0)
    try:
        if problem:
            raise ValueError(problem)
        if who["model"] == "?":
            raise ValueError("no readable config record (no config in results.json or checkpoint.pt, and "
                             ".hydra/config.yaml or hydra.yaml missing, empty or cut)")
        if data is not None:
            run.metrics, run.step = data.get("metrics", {}), data.get("step", run.step)
            run.status = "finished" if data.get("status", "finished") == "finished" else "unfinished"
        elif failed.exists():
            run.status, run.error = "failed", str(read_json(failed).get("error", ""))
    except ValueError as e:
        run.status, run.error, run.metrics = "failed", str(e), {}
    return run


def results_record(path: Path) -> dict:
    """A results.json whose fields have the types the report uses (``step`` an integer, ``metrics`` an object
    of numbers); ValueError naming the field otherwise."""
    data = read_json(path)
    step = data.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError(f"{path.name} unreadable (step is {step!r}, not an integer)")
    metrics = data.get("metrics", {})
    if not isinstance(metrics, dict):
        raise ValueError(f"{path.name} unreadable (metrics is {type(metrics).__name__}, not an object)")
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{path.name} unreadable (metric {k} is {v!r}, not a number)")
    if not isinstance(data.get("status", "finished"), str):
        raise ValueError(f"{path.name} unreadable (status is {data['status']!r}, not a string)")
    return data


def run_identity(folder: Path, results: dict | None) -> dict:
    """Dataset, model, estimator, learning rate, seed and length of the run, from its own record: the config
    in its results.json or checkpoint (what the run itself trained with), else its .hydra record (written
    by the run once its folder was its own). A field no record holds is left unknown."""
    who = {"dataset": "?", "model": "?", "estimator": "?", "lr": math.nan, "seed": -1, "max_steps": 0}
    config = (results or {}).get("config")
    if not isinstance(config, dict) and (folder / "checkpoint.pt").exists():
        config = checkpoint_config(folder / "checkpoint.pt")
    hparams = (results or {}).get("hparams")
    hparams = hparams if isinstance(hparams, dict) else {}
    family = {}                     # a categorical model's family, classes and hidden widths
    if isinstance(config, dict) and "dataset.name" in config:
        sizes, hidden = config.get("model.latent_sizes"), config.get("model.n_hidden")
        family = {k: config.get(f"model.{k}") for k in ("family", "classes", "hidden")}
        who.update(dataset=str(config["dataset.name"]), estimator=str(config.get("estimator_choice", "?")),
                   lr=float(config.get("optim.lr", math.nan)), seed=int(config.get("seed", -1)))
    elif hparams:
        sizes, hidden = json.loads(str(hparams.get("latent_sizes", "null"))), hparams.get("n_hidden")
        family = {k: hparams.get(k) for k in ("family", "classes")}
        who.update(dataset=str(hparams.get("dataset", "?")), estimator=str(hparams.get("estimator", "?")),
                   lr=float(hparams.get("lr", math.nan)), seed=int(hparams.get("seed", -1)))
    else:
        sizes = hidden = None
    max_steps = hparams.get("max_steps")
    hydra = hydra_record(folder) if sizes is None or max_steps is None else None
    if hydra is not None:
        cfg, choices = hydra
        if sizes is None:
            sizes, hidden = list(cfg.model.latent_sizes), cfg.model.n_hidden
            family = {k: cfg.model.get(k) for k in ("family", "classes", "hidden")}
            who.update(dataset=str(cfg.dataset.name), estimator=str(choices.estimator), lr=float(cfg.optim.lr),
                       seed=int(cfg.seed))
        max_steps = cfg.train.max_steps if max_steps is None else max_steps
    if sizes is not None:
        who["model"] = model_label(sizes, hidden, **family)
    who["max_steps"] = int(max_steps or 0)
    return who


def model_label(sizes, n_hidden, family=None, classes=None, hidden=None) -> str:
    """"linear 200-200", "nonlinear 200-200"; categorical: "categorical linear 20x10-20x10",
    "categorical MLP 512-256, 20x10"."""
    if family != "categorical":
        return f"{'nonlinear' if n_hidden or hidden else 'linear'} {'-'.join(str(h) for h in sizes)}"
    layers = "-".join(f"{h}x{classes}" for h in sizes)
    nets = f"MLP {'-'.join(str(w) for w in hidden)}, " if hidden else ("nonlinear " if n_hidden else "linear ")
    return f"categorical {nets}{layers}"


def checkpoint_config(path: Path) -> dict | None:
    """The config a checkpoint records (tensors and plain data only are read: nothing in it can run code)."""
    import torch
    try:
        config = torch.load(path, map_location="cpu", weights_only=True).get("config")
    except Exception:  # noqa: BLE001 - an unreadable checkpoint leaves the other records
        return None
    return config if isinstance(config, dict) else None


def hydra_record(folder: Path):
    """(config, choices) of the run's ``.hydra`` record, or None if it is missing or cannot be read."""
    from omegaconf import OmegaConf
    try:
        cfg = OmegaConf.load(folder / ".hydra" / "config.yaml")
        choices = OmegaConf.load(folder / ".hydra" / "hydra.yaml").hydra.runtime.choices
        cfg.model.latent_sizes, cfg.dataset.name, cfg.optim.lr, cfg.seed, cfg.train.max_steps, choices.estimator
    except Exception:  # noqa: BLE001 - empty, cut or foreign yaml: the run stays, its identity unknown
        return None
    return cfg, choices


def read_json(path: Path) -> dict:
    """A results.json / failed.json as a dict; ValueError (saying which file and why) if it cannot be read."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path.name} unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} unreadable (not a JSON object)")
    return data


#: files that only a run folder holds (a folder with any of them is a run, finished or not)
RUN_FILES = ("results.json", "failed.json", "checkpoint.pt", ".hydra/config.yaml")


def find_runs(sweep: Path) -> list[Run]:
    folders = sorted({p.parent.parent if p.name == "config.yaml" else p.parent
                      for name in RUN_FILES for p in sweep.rglob(name)})
    return [read_run(f) for f in folders]


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    m = sum(values) / n
    if n == 1:
        return m, math.nan
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


def test_mean_se(runs: list[Run], key: str) -> tuple[float, float]:
    """Mean and standard error over seeds of a test metric; for a single seed, the run's own standard error
    over the test rows (``<key>_se`` in results.json)."""
    values = [r.metrics[key] for r in runs if key in r.metrics]
    m, se = mean_se(values)
    if len(values) == 1 and f"{key}_se" in runs[0].metrics:
        se = float(runs[0].metrics[f"{key}_se"])
    return m, se


def estimator_order(names) -> list[str]:
    return [e for e in LABELS if e in names] + sorted(e for e in names if e not in LABELS)


@dataclass
class Row:
    dataset: str
    model: str
    estimator: str
    lr: float
    runs: list[Run]
    valid_elbo: float
    vb: tuple[float, float]
    mcb: tuple[float, float]
    mcb_k: int
    valid_bound: float = -math.inf       # best validation bound (valid/iwae{valid_k}), mean over seeds
    valid_k: int = 0

    @property
    def tested(self) -> bool:
        return all(r.tested for r in self.runs)


def select(runs: list[Run]) -> list[Row]:
    """Per dataset x model x estimator: the learning rate with the best mean validation ELBO over seeds."""
    groups: dict[tuple, dict[float, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r.status == "finished":
            groups[(r.dataset, r.model, r.estimator)][r.lr].append(r)
    rows = []
    for (dataset, model, est), by_lr in groups.items():
        scored = sorted(by_lr.items(), key=lambda kv: (-mean_se([r.best_valid_elbo for r in kv[1]])[0], kv[0]))
        lr, chosen = scored[0]
        ks = sorted({int(k[len("test/iwae"):]) for r in chosen for k in r.metrics
                     if k.startswith("test/iwae") and not k.endswith("_se")})
        k = ks[-1] if ks else 0
        vk = min(r.valid_k for r in chosen)
        rows.append(Row(dataset, model, est, lr, sorted(chosen, key=lambda r: r.seed),
                        mean_se([r.best_valid_elbo for r in chosen])[0],
                        test_mean_se(chosen, "test/elbo"), test_mean_se(chosen, f"test/iwae{k}"), k,
                        mean_se([r.best_valid_bound for r in chosen])[0] if vk else -math.inf, vk))
    order = {e: i for i, e in enumerate(estimator_order({r.estimator for r in rows}))}
    return sorted(rows, key=lambda r: (r.dataset, r.model, order[r.estimator]))


# ----- writers -------------------------------------------------------------------------------------
def fmt(m: float, se: float, latex: bool = False) -> str:
    if not math.isfinite(m):
        return "n/a"
    pm = r" $\pm$ " if latex else " ± "
    return f"{m:.2f}{pm}{se:.2f}" if math.isfinite(se) else f"{m:.2f}"


def score_lines(by_est: dict[str, Row], ests: list[str], latex: bool = False) -> list[tuple[str, list[str]]]:
    """(label, cells) of the score rows of one block: the test ELBO and bound (VB, MCB) when every run was
    tested; otherwise the best validation ELBO and bound (a run without the final test has no VB/MCB)."""
    rows = [by_est[e] for e in ests]
    if all(r.tested for r in rows):
        k = max(r.mcb_k for r in rows)
        lines = [("VB (ELBO)" if not latex else "VB", [fmt(*r.vb, latex=latex) for r in rows])]
        if k:
            lines.append((f"MCB (K={k})" if not latex else f"MCB ($K={k}$)", [fmt(*r.mcb, latex=latex) for r in rows]))
        return lines
    lines = [("best valid ELBO", [fmt(r.valid_elbo, math.nan) for r in rows])]
    ks = {r.valid_k for r in rows if r.valid_k}
    if ks:
        k = f"K={ks.pop()}" if len(ks) == 1 else "K"
        lines.append((f"best valid bound ({k})" if not latex else f"best valid bound (${k}$)",
                      [fmt(r.valid_bound, math.nan) for r in rows]))
    return lines


def table_blocks(rows: list[Row]):
    """Yield (dataset label, model, estimators, {estimator: row}) per dataset x model."""
    blocks: dict[tuple, dict[str, Row]] = defaultdict(dict)
    for r in rows:
        blocks[(r.dataset, r.model)][r.estimator] = r
    for (dataset, model), by_est in blocks.items():
        yield DATASETS.get(dataset, dataset), model, estimator_order(by_est), by_est


def write_csv(rows: list[Row], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "model", "estimator", "label", "lr", "seeds", "best_valid_elbo", "vb_mean", "vb_se",
                    "mcb_k", "mcb_mean", "mcb_se", "valid_k", "best_valid_bound"])
        for r in rows:
            w.writerow([r.dataset, r.model, r.estimator, LABELS.get(r.estimator, r.estimator), r.lr, len(r.runs),
                        f"{r.valid_elbo:.4f}", f"{r.vb[0]:.4f}", f"{r.vb[1]:.4f}", r.mcb_k, f"{r.mcb[0]:.4f}",
                        f"{r.mcb[1]:.4f}", r.valid_k, f"{r.valid_bound:.4f}"])


def markdown_table(rows: list[Row]) -> str:
    lines = []
    for dataset, model, ests, by_est in table_blocks(rows):
        tested = all(by_est[e].tested for e in ests)
        one_seed = all(len(by_est[e].runs) == 1 for e in ests)
        where = (("test set; one seed: ± the standard error over the test rows" if one_seed else
                  "test set; mean ± standard error over seeds") if tested else
                 "no final test (test.enabled=false): validation split, best over evaluations, mean over seeds")
        lines += [f"**{dataset}, {model}** ({where})", "",
                  "| | " + " | ".join(LABELS.get(e, e) for e in ests) + " |",
                  "|---|" + "---:|" * len(ests),
                  *[f"| {label} | " + " | ".join(cells) + " |" for label, cells in score_lines(by_est, ests)],
                  "| learning rate | " + " | ".join(f"{by_est[e].lr:g}" for e in ests) + " |",
                  "| seeds | " + " | ".join(str(len(by_est[e].runs)) for e in ests) + " |", ""]
    return "\n".join(lines)


def latex_table(rows: list[Row]) -> str:
    out = []
    for dataset, model, ests, by_est in table_blocks(rows):
        out += [r"\begin{tabular}{l" + "r" * len(ests) + "}", r"\toprule",
                f"{dataset}, {model} & " + " & ".join(LABELS.get(e, e).replace("+", "+{}") for e in ests)
                + r" \\", r"\midrule",
                *[f"{label} & " + " & ".join(cells) + r" \\" for label, cells in score_lines(by_est, ests, True)],
                r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(out)


def problems(runs: list[Run]) -> list[str]:
    lines = []
    for r in runs:
        if r.status == "failed":
            lines.append(f"- failed: `{r.path.name}` at step {r.step}/{r.max_steps}: {r.error}")
        elif r.status == "unfinished":
            lines.append(f"- unfinished: `{r.path.name}` at step {r.step}/{r.max_steps}")
    return lines


def write_runs(runs: list[Run], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "dataset", "model", "estimator", "lr", "seed", "status", "step", "max_steps",
                    "best_valid_elbo", "test_elbo", "error"])
        for r in runs:
            w.writerow([r.path.name, r.dataset, r.model, r.estimator, r.lr, r.seed, r.status, r.step, r.max_steps,
                        r.best_valid_elbo, r.metrics.get("test/elbo", ""), r.error])


def mean_curve(runs: list[Run], tag: str, log10: bool = False) -> tuple[list[int], list[float]]:
    """Mean over runs at the steps every run logged ``tag``; ``log10``: the tag holds log10 values, the mean
    is of the values themselves (10 ** each)."""
    per = [{s: 10 ** v if log10 else v for s, v in r.scalars.get(tag, [])} for r in runs]
    steps = sorted(set.intersection(*(set(p) for p in per))) if per else []
    return steps, [sum(p[s] for p in per) / len(per) for s in steps]


def write_figure(rows: list[Row], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = list(table_blocks(rows))
    fig, axes = plt.subplots(len(blocks), 2, figsize=(11, 3.6 * len(blocks)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (dataset, model, ests, by_est), (ax_var, ax_elbo) in zip(blocks, axes):
        for i, e in enumerate(ests):
            row, color, label = by_est[e], colors[i % len(colors)], LABELS.get(e, e)
            steps, var = mean_curve(row.runs, VARIANCE_TAG, log10=True)
            ax_var.plot(steps, var, "-o", ms=3, color=color, label=f"{label} (lr {row.lr:g})")
            steps, var = mean_curve(row.runs, LATENT_VARIANCE_TAG, log10=True)
            if steps:
                ax_var.plot(steps, var, "--", color=color, alpha=0.6)
            steps, elbo = mean_curve(row.runs, VALID_TAG)
            ax_elbo.plot(steps, elbo, "-o", ms=3, color=color, label=label)
        ax_var.set_yscale("log")
        ax_var.set_title(f"{dataset}, {model}: gradient variance (inference net)", fontsize=10)
        ax_var.set_xlabel("iteration")
        ax_var.set_ylabel("mean variance per element\n(solid: fresh minibatches; dashed: latent noise only)",
                          fontsize=8)
        ax_elbo.set_title(f"{dataset}, {model}: validation ELBO", fontsize=10)
        ax_elbo.set_xlabel("iteration")
        ax_elbo.set_ylabel("ELBO (nats)")
        ax_var.legend(fontsize=7)
        ax_elbo.legend(fontsize=7)
        for ax in (ax_var, ax_elbo):
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", type=Path, help="a sweep folder (hydra.sweep.dir) or a single run folder")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: SWEEP/report)")
    args = ap.parse_args(argv)
    if not args.sweep.is_dir():
        print(f"report: {args.sweep} is not a folder", file=sys.stderr)
        return 2
    runs = find_runs(args.sweep)
    if not runs:
        print(f"report: no runs (folders with {', '.join(RUN_FILES)}) under {args.sweep}", file=sys.stderr)
        return 2
    out = args.out or args.sweep / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = select(runs)
    write_runs(runs, out / "runs.csv")
    issues = problems(runs)
    md = [f"# Report: {args.sweep}", "", markdown_table(rows) if rows else "No finished runs.", ""]
    if issues:
        md += ["Runs not in the table:", "", *issues, ""]
    (out / "table.md").write_text("\n".join(md))
    write_csv(rows, out / "table.csv")
    (out / "table.tex").write_text(latex_table(rows))
    if rows:
        write_figure(rows, out / "figure.png")
    print("\n".join(md))
    print(f"{len(runs)} runs: " + ", ".join(f"{sum(r.status == s for r in runs)} {s}"
                                          for s in ("finished", "failed", "unfinished")) + f"; written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
