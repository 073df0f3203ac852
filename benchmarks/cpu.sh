#!/usr/bin/env bash
# The CPU cost tables quoted in benchmarks/step-cost.md and large-k.md, one CSV per part under benchmarks/results/
# (cost_<preset>_cpu<tag>.csv, never overwriting an earlier one). Steps are interleaved one at a
# time across the sources (--steps 1) with many repeats, because shared CPU machines drift by
# several percent.
#   PYTHON=.venv/bin/python bash benchmarks/cpu.sh                       # every part
#   PYTHON=.venv/bin/python PARTS="epoch large-k" bash benchmarks/cpu.sh # some parts
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUTDIR=${OUTDIR:-benchmarks/results}
PARTS=${PARTS:-steps epoch compile large-k}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUTDIR"
bench() {
  local tag=$1 preset=$2; shift 2
  local out="$OUTDIR/cost_${preset}_cpu${tag}.csv"
  [ -e "$out" ] && out="$OUTDIR/cost_${preset}_cpu${tag}_$(date -u +%Y%m%dT%H%M%S).csv"
  echo "== $preset$tag -> $out"
  local start=$(date +%s)
  if [ "$preset" = large-k ]; then set -- large-k-bench "$@"; else set -- bench --preset "$preset" "$@"; fi
  $PY -m kd "$@" --device cpu --out "$out" --quiet
  echo "   $(( $(date +%s) - start ))s"
}
for part in $PARTS; do
  case $part in
    steps)
      bench "" digits --steps 1 --repeats 500
      # The framework-overhead table: LeNet steps are ~10 ms, so small fixed costs show; many repeats
      # are needed, and a ResNet18 teacher forward (~1 s at batch 128 here) would make them take hours.
      bench "" fmnist-lenet --steps 1 --repeats 1000 --sources bare,onehot,ls,proxy,cached,lspp
      bench "" cifar100-r34-r18 --steps 1 --repeats 15
      bench "" tinyimagenet-r101-shufflenet --steps 1 --repeats 9 ;;
    epoch)
      # Whole epochs through the real loader: Fashion-MNIST itself for LeNet (no network row: a
      # ResNet18 teacher epoch takes minutes here), a small synthetic epoch for ResNet101 -> ShuffleNet.
      bench _epoch fmnist-lenet --mode epoch --data fashion-mnist --repeats 5 --sources onehot,proxy,cached,lspp
      bench _epoch tinyimagenet-r101-shufflenet --mode epoch --epoch-size 128 --repeats 3 --sources onehot,proxy,network,lspp ;;
    compile)
      bench _compile fmnist-lenet --compile --steps 1 --repeats 300 --sources bare,onehot,proxy,lspp
      bench _compile digits --compile --steps 1 --repeats 100 --sources onehot,proxy,network,lspp ;;
    large-k)
      bench "" large-k --steps 1 --repeats 30 ;;
    *) echo "unknown part '$part' (steps, epoch, compile, large-k)" >&2; exit 2 ;;
  esac
done
