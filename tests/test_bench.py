"""scripts/bench_step.py runs end to end and reports what the speed targets are read from."""
import re
import subprocess
import sys
from pathlib import Path

import torch

from sbn_train.models import SBN

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_step.py"


def bench(*args):
    return subprocess.run([sys.executable, str(SCRIPT), "--data", "random", "--threads", "1", *args],
                          capture_output=True, text=True, timeout=600)


def test_headline_reports_ratios_and_memory(tmp_path):
    # a checkpoint of the timed model, as a training run writes it
    torch.manual_seed(3)
    model = SBN(784, [200], 0)
    torch.save({"model": model.state_dict()}, tmp_path / "checkpoint.pt")
    out = bench("--models", "sbn_1layer", "--batch", "8", "--rounds", "1", "--slow-rounds", "1",
                "--checkpoint", str(tmp_path / "checkpoint.pt"))
    assert out.returncode == 0, out.stderr
    names = ("reinforce", "nvil", "marginal", "marginal_reference")
    lines = [line.split() for line in out.stdout.splitlines() if line.split() and line.split()[0] in names]
    rows = {w[0]: w[1:] for w in lines[:4]}                     # the timing table
    throughput = {w[0]: w[1:] for w in lines[4:]}               # steps/s and hours per 2M steps (eager)
    assert set(throughput) == set(names)
    for n, (rate, hours) in throughput.items():
        # printed to 0.1 step/s and 0.01 h: the rounding of both bounds the difference
        r = float(rate)
        assert abs(float(hours) - 2e6 / r / 3600) <= 0.005 + 2e6 / 3600 * 0.05 / (r * (r - 0.05)) + 1e-9, n
    assert set(rows) == {"reinforce", "nvil", "marginal", "marginal_reference"}
    for cols in rows.values():                      # batch, forward, backward, optim, step, /reinforce, peak MB
        assert len(cols) == 7 and all(float(c) > 0 for c in cols[:5]) and float(cols[6]) >= 0
        # one round: the step is the sum of its phases, up to the rounding of five printed 2-decimal numbers
        assert abs(sum(float(c) for c in cols[:4]) - float(cols[4])) <= 5 * 0.005 + 1e-9
    # the ratios are those of the printed step times (each printed to 0.01 ms; the ratios to 0.01 and 0.1)
    step = {n: float(cols[4]) for n, cols in rows.items()}

    def ratio_bound(a, b, printed_to):   # |a/b - a'/b'| for a, b each within 0.005 of a', b', plus printing
        return printed_to / 2 + (0.005 * b + 0.005 * a) / (b * (b - 0.005)) + 1e-9
    got = float(re.search(r"ratio marginal/nvil = ([\d.]+)", out.stdout).group(1))
    assert abs(got - step["marginal"] / step["nvil"]) <= ratio_bound(step["marginal"], step["nvil"], 0.01)
    got = float(re.search(r"ratio marginal_reference/marginal = ([\d.]+)", out.stdout).group(1))
    assert abs(got - step["marginal_reference"] / step["marginal"]) <= \
        ratio_bound(step["marginal_reference"], step["marginal"], 0.1)


def test_missing_checkpoint_is_a_short_error(tmp_path):
    out = bench("--checkpoint", str(tmp_path / "nope.pt"))
    assert out.returncode != 0
    assert "no checkpoint at" in out.stderr and "Traceback" not in out.stderr


def test_batch_sizes_come_from_the_paper_schedules():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_step
    finally:
        sys.path.pop(0)
    assert bench_step.paper_batch("sbn_nonlinear") == 20       # configs/experiment/schedule/paper_sbn_nonlinear.yaml
    assert bench_step.paper_batch("sbn_2layer") == 100
    assert bench_step.paper_batch("sbn_1layer") == 100         # no schedule: the default config's batch size


def test_replicas_table_reports_aggregate_rates_and_their_ratios():
    out = bench("--models", "sbn_1layer", "--batch", "5", "--rounds", "2", "--replicas", "1,3",
                "--estimators", "nvil,marginal")
    assert out.returncode == 0, out.stderr
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.stdout.splitlines()
            if line.startswith("| sbn_1layer")]
    assert [r[1] for r in rows] == ["nvil", "marginal"]
    for r in rows:                          # model, estimator, batch, R=1, R=3, R=3/R=1 (CPU: eager only)
        assert len(r) == 6
        r1, r3 = (float(v.replace(",", "")) for v in r[3:5])
        # the ratio is printed from the unrounded rates: it agrees with the printed rates up to their rounding
        assert abs(float(r[5].rstrip("x")) - r3 / r1) <= 0.005 + (0.5 * r3 + 0.5 * r1) / r1 ** 2 + 0.5 / r1


def test_eval_replicas_reports_serial_and_batched():
    """--eval-replicas: for the evaluation and the final test, R = 1, then R runs one after another and batched,
    with the ratio of the two."""
    out = bench("--models", "sbn_1layer", "--eval-replicas", "1,2", "--eval-rows", "20", "--test-k", "10",
                "--rounds", "1")
    assert out.returncode == 0, out.stderr
    for phase in ("eval", "test"):
        assert re.search(rf"^{phase} \(batch \d+, ELBO samples \d+, K \d+\)", out.stdout, re.M), out.stdout
    rows = re.findall(r"^  (R=\d \w+)\s+([\d.]+) s .*?rows/s(?:\s+serial/batched ([\d.]+)x)?$", out.stdout, re.M)
    assert [r[0] for r in rows] == ["R=1 serial", "R=2 serial", "R=2 batched"] * 2, out.stdout
    assert all(float(rows[i][2]) > 0 for i in (2, 5)) and not rows[1][2]
