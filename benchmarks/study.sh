#!/usr/bin/env bash
# The comparison study: the paper's Tables 3, 5, 6 and 7 re-asked on Fashion-MNIST (and Table 3 on
# MNIST, Table 4 on the fortunes text categories) with learning rates chosen on validation data, in both
# preprocessing regimes. Every sweep
# resumes where it stopped, so rerun this script to continue; finished tables land in
# benchmarks/results/ as they finish. About 7 hours on a 2-core CPU with JOBS=2.
#   bash benchmarks/study.sh                 # all, in order of priority
#   SWEEPS="fmnist_ablation" bash benchmarks/study.sh
set -uo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-2}
PY=${PY:-python}
SWEEPS=${SWEEPS:-"fmnist_methods_matched fmnist_methods_paper fmnist_ablation fmnist_augment_matched
  fmnist_augment_paper fmnist_distill_resnet8 mnist_methods_matched fortunes_text"}
status=0
for s in $SWEEPS; do
  if [ "$s" = mnist_methods_matched ] && [ ! -e data/MNIST/raw/train-images-idx3-ubyte.gz ]; then
    $PY -m benchmarks.mnist_data --root data || { status=1; continue; }
  fi
  if [ "$s" = fortunes_text ] && [ ! -e data/fortunes/train.csv ]; then
    $PY -m benchmarks.fortunes_data --out data/fortunes || { status=1; continue; }
  fi
  echo "== $s ($(date -u +%FT%TZ))"
  $PY -m kd sweep "benchmarks/sweeps/$s.yaml" --jobs "$JOBS" || status=1
done
exit $status
