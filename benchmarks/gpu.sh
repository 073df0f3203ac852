#!/usr/bin/env bash
# Every cost preset on one GPU (bf16 autocast, channels_last), one CSV per preset with the GPU's
# name in the file name. Runs from the source tree without installing anything:
#   bash benchmarks/gpu.sh                      # on a CUDA machine
#   DEVICE=cpu AMP=none STEPS=1 REPEATS=1 WARMUP=0 BATCH=2 OUTDIR=/tmp/x bash benchmarks/gpu.sh   # logic check on CPU
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
AMP=${AMP:-bf16}
STEPS=${STEPS:-20}
REPEATS=${REPEATS:-10}
WARMUP=${WARMUP:-5}
BATCH=${BATCH:-}
OUTDIR=${OUTDIR:-benchmarks/results}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

name=$($PY - "$DEVICE" <<'PY'
import re, sys, torch
dev = sys.argv[1]
n = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"
print(re.sub(r"[^A-Za-z0-9]+", "-", n).strip("-").lower())
PY
)
mkdir -p "$OUTDIR"
$PY -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
for preset in tinyimagenet-r101-shufflenet cifar100-r34-r18 fmnist-lenet digits; do
  out="$OUTDIR/cost_${preset}_${name}.csv"
  [ -e "$out" ] && out="$OUTDIR/cost_${preset}_${name}_$(date -u +%Y%m%dT%H%M%S).csv"
  echo "== $preset -> $out"
  start=$(date +%s)
  $PY -m kd bench --preset "$preset" --device "$DEVICE" --amp "$AMP" --channels-last \
      --steps "$STEPS" --repeats "$REPEATS" --warmup "$WARMUP" ${BATCH:+--batch-size "$BATCH"} \
      --out "$out" --quiet
  echo "   $(( $(date +%s) - start ))s"
done
