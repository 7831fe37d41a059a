"""A tiny sweep through the CLI, then scripts/report.py on it: table, figure, and runs that did not finish."""
import csv
import json
import math
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from test_cli import SMALL, sbn_train, scalars

REPORT = Path(__file__).resolve().parent.parent / "scripts" / "report.py"
ESTIMATORS = ["reinforce", "nvil", "marginal"]
LRS = ["0.001", "0.003"]


def test_sweep_then_report(tmp_path):
    sweep = tmp_path / "sweep"
    r = sbn_train("-m", f"estimator={','.join(ESTIMATORS)}", f"optim.lr={','.join(LRS)}", "seed=0,1", *SMALL,
                  "train.max_steps=20", "train.eval_every=10", "train.log_every=10", "variance.every=10",
                  "variance.samples=3", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr[-3000:]
    runs = sorted(p for p in sweep.iterdir() if (p / "results.json").exists())
    assert len(runs) == len(ESTIMATORS) * len(LRS) * 2, [p.name for p in sweep.iterdir()]
    # a run that stopped with an error, and one killed before it finished
    bad = sbn_train(*SMALL, "train.batch_size=100000", f"hydra.run.dir={sweep / 'broken'}")
    assert bad.returncode == 2 and (sweep / "broken" / "failed.json").exists(), bad.stderr[-2000:]
    shutil.copytree(runs[0], sweep / "killed")
    (sweep / "killed" / "results.json").unlink()

    out = tmp_path / "report"
    rep = subprocess.run([sys.executable, str(REPORT), str(sweep), "--out", str(out)], capture_output=True,
                         text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-3000:]

    with (out / "table.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["estimator"] for r in rows) == sorted(ESTIMATORS), rows
    for row in rows:
        assert row["seeds"] == "2" and row["mcb_k"] == "100", row
        for key in ("vb_mean", "vb_se", "mcb_mean", "mcb_se", "best_valid_elbo"):
            assert math.isfinite(float(row[key])), (row["estimator"], key, row[key])
        assert float(row["mcb_mean"]) > float(row["vb_mean"]) - 3 * math.hypot(float(row["mcb_se"]),
                                                                                float(row["vb_se"]))

    # the chosen learning rate has the best validation ELBO (best over evaluations, mean over seeds),
    # recomputed here from the events
    best = defaultdict(list)
    for run in runs:
        overrides = dict(kv.split("=", 1) for kv in run.name.split(","))
        best[(overrides["estimator"], float(overrides["optim.lr"]))].append(
            max(v for _, v in scalars(run)["bounds/valid/elbo"]))
    for row in rows:
        means = {lr: sum(v) / len(v) for (e, lr), v in best.items() if e == row["estimator"]}
        assert float(row["lr"]) == max(means, key=means.get), (row, means)

    png = (out / "figure.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    table = (out / "table.md").read_text()
    assert "| VB (ELBO) |" in table and "| MCB (K=100) |" in table
    assert "failed: `broken`" in table and "train.batch_size=100000 exceeds" in table
    assert "unfinished: `killed` at step 20/20" in table
    assert "\\begin{tabular}" in (out / "table.tex").read_text()
    with (out / "runs.csv").open() as f:
        statuses = [r["status"] for r in csv.DictReader(f)]
    assert sorted(statuses) == sorted(["finished"] * len(runs) + ["failed", "unfinished"])


def test_report_without_final_test_and_with_unreadable_records(tmp_path):
    """test.enabled=false: the table shows the best validation ELBO and bound (no n/a rows, no K=0 bound).
    A run whose results.json or failed.json cannot be read is listed as failed, with the reason."""
    sweep = tmp_path / "sweep"
    r = sbn_train("-m", "estimator=nvil,reinforce", *SMALL, "test.enabled=false", "train.max_steps=4",
                  "train.eval_every=2", "variance.every=0", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr[-3000:]
    runs = sorted(p for p in sweep.iterdir() if (p / "results.json").exists())
    assert len(runs) == 2
    shutil.copytree(runs[0], sweep / "corrupt")
    (sweep / "corrupt" / "results.json").write_text('{"step": 4, "metr')          # cut short
    shutil.copytree(runs[0], sweep / "empty_failed")
    (sweep / "empty_failed" / "results.json").unlink()
    (sweep / "empty_failed" / "failed.json").write_text("")

    out = tmp_path / "report"
    rep = subprocess.run([sys.executable, str(REPORT), str(sweep), "--out", str(out)], capture_output=True,
                         text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-3000:]
    table = (out / "table.md").read_text()
    assert "n/a" not in table and "K=0" not in table and "| VB (ELBO) |" not in table, table
    assert "no final test (test.enabled=false)" in table
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in table.splitlines() if line.startswith("| best valid")}
    assert set(cells) == {"best valid ELBO", "best valid bound (K=5)"}, table
    best = {p.name.split("=", 1)[1]: p for p in runs}
    for i, est in enumerate(["reinforce", "nvil"]):            # the paper's column order: LR, LR+C+IDB
        s = scalars(best[est])
        assert cells["best valid ELBO"][i] == f"{max(v for _, v in s['bounds/valid/elbo']):.2f}"
        assert cells["best valid bound (K=5)"][i] == f"{max(v for _, v in s['bounds/valid/iwae5']):.2f}"
    assert "failed: `corrupt` at step 4/4: results.json unreadable (JSONDecodeError" in table, table
    assert "failed: `empty_failed` at step 4/4: failed.json unreadable (JSONDecodeError" in table, table
    with (out / "runs.csv").open() as f:
        statuses = {row["run"]: row["status"] for row in csv.DictReader(f)}
    assert statuses["corrupt"] == "failed" and statuses["empty_failed"] == "failed"
    assert "\\begin{tabular}" in (out / "table.tex").read_text() and "K=0" not in (out / "table.tex").read_text()


def test_report_lists_malformed_runs_as_failed(tmp_path):
    """One malformed run does not cost the sweep its report: a run folder with an empty or cut .hydra record
    (a disk that filled during start-up) and results.json files with fields of the wrong type are each
    listed as failed with the reason; a run's identity comes from its own record (results.json), so a
    .hydra record emptied later does not change it."""
    sweep = tmp_path / "sweep"
    good = sweep / "good"
    r = sbn_train(*SMALL, "test.enabled=false", "train.max_steps=4", "train.eval_every=2", "variance.every=0",
                  f"hydra.run.dir={good}")
    assert r.returncode == 0, r.stderr[-3000:]
    broken = {"step_null": ("step", None), "metrics_null": ("metrics", None),
              "metric_text": ("metrics", {"valid/elbo": "-90.1"})}
    for name, (key, value) in broken.items():
        shutil.copytree(good, sweep / name)
        data = json.loads((good / "results.json").read_text())
        data[key] = value
        (sweep / name / "results.json").write_text(json.dumps(data))
    shutil.copytree(good, sweep / "hydra_emptied")
    (sweep / "hydra_emptied" / ".hydra" / "hydra.yaml").write_text("")
    start = sweep / "cut_at_start"                    # start-up cut short: a record only, cut and empty
    (start / ".hydra").mkdir(parents=True)
    (start / ".hydra" / "config.yaml").write_text((good / ".hydra" / "config.yaml").read_text()[:50])
    (start / ".hydra" / "hydra.yaml").write_text("")

    out = tmp_path / "report"
    rep = subprocess.run([sys.executable, str(REPORT), str(sweep), "--out", str(out)], capture_output=True,
                         text=True, timeout=300)
    assert rep.returncode == 0 and "Traceback" not in rep.stderr, rep.stderr[-3000:]
    with (out / "runs.csv").open() as f:
        runs = {row["run"]: row for row in csv.DictReader(f)}
    assert {k: v["status"] for k, v in runs.items()} == {
        "good": "finished", "hydra_emptied": "finished", "step_null": "failed", "metrics_null": "failed",
        "metric_text": "failed", "cut_at_start": "failed"}
    assert runs["hydra_emptied"]["estimator"] == runs["good"]["estimator"] != "?"
    assert "step is None, not an integer" in runs["step_null"]["error"]
    assert "metrics is NoneType, not an object" in runs["metrics_null"]["error"]
    assert "metric valid/elbo is '-90.1', not a number" in runs["metric_text"]["error"]
    assert "no readable config record" in runs["cut_at_start"]["error"]
    table = (out / "table.md").read_text()
    assert "| seeds | 2 |" in table, table                  # good and hydra_emptied
    for name in ("step_null", "metrics_null", "metric_text", "cut_at_start"):
        assert f"failed: `{name}`" in table, table
