#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script (`make bench-gpu`): the replica-group table (with a categorical
# model), the CUDA tests, bench_step.py on CUDA (eager and graph columns) for the three paper models and the
# categorical models, the concurrency mode, and 20,000-step CLI runs with graphs. Everything it prints is the report. Needs a Python where `import sbn_train` works (the project's
# venv, or PYTHONPATH=<checkout> with its dependencies) and MNIST in the data cache (or network access).
#   PYTHON=python3 bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT_DIR:-outputs/gpu_check}
mkdir -p "$OUT"
step() { echo; echo "=== $* ($(date +%T))"; }

step "environment"
$PY - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))
PY
nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv || true

step "bench_step.py --replicas: aggregate steps/s and peak memory of replica groups, eager and graph"
timeout 900 $PY scripts/bench_step.py --device cuda --replicas 1,4,16,64 --estimators reinforce,nvil,marginal \
    --rounds 10
timeout 600 $PY scripts/bench_step.py --device cuda --replicas 1,16 --models sbn_4layer,sbn_nonlinear,categorical_2layer \
    --estimators nvil,marginal --rounds 5

step "CUDA tests"
timeout 900 $PY -m pytest -q -ra tests/test_graph_step.py tests/test_replicas.py tests/test_host_sync.py tests/test_marginal_device_route.py \
    tests/test_marginal_fast.py tests/test_data.py -k "cuda or graph or device or sync"

step "bench_step.py: eager and graph, three models"
timeout 900 $PY scripts/bench_step.py --device cuda --models sbn_2layer,sbn_4layer,sbn_nonlinear \
    --estimators reinforce,nvil,marginal,marginal_reference,leg,muprop --rounds 10 --no-memory

step "bench_step.py: categorical models, eager and graph, with the VAE's floor"
timeout 600 $PY scripts/bench_step.py --device cuda --models categorical_2layer,categorical_vae \
    --estimators reinforce,nvil,marginal,gumbel --rounds 10 --no-memory

step "bench_step.py: concurrent runs on one GPU"
timeout 900 $PY scripts/bench_step.py --device cuda --concurrent 1,2,4,8 --estimators marginal,nvil \
    --warmup-seconds 40 --window-seconds 15

for est in marginal nvil reinforce; do
  step "CLI: $est, 20,000 steps, CUDA graph, evaluation every 50,000 steps (so once, at the end)"
  start=$(date +%s.%N)
  timeout 1200 $PY -m sbn_train.cli estimator=$est device=cuda train.max_steps=20000 train.eval_every=50000 \
      train.log_every=1000 variance.every=0 eval.limit=1000 eval.train_limit=1000 test.enabled=false \
      train.progress=false hydra.run.dir="$OUT/cli_$est" train.overwrite=true 2>&1 | grep -v "^\[" | tail -3
  end=$(date +%s.%N)
  $PY - "$OUT/cli_$est" "$start" "$end" <<'PY'
import sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1]); acc.Reload()
rates = [e.value for e in acc.Scalars("perf/steps_per_s")]
wall = float(sys.argv[3]) - float(sys.argv[2])
print(f"steps/s (training, median of log windows): {sorted(rates)[len(rates) // 2]:.0f}; "
      f"whole command {wall:.1f} s for 20,000 steps; a 2M-step run at that rate: "
      f"{2e6 / sorted(rates)[len(rates) // 2] / 60:.1f} min")
PY
done
