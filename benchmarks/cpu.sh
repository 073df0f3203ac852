#!/usr/bin/env bash
# The CPU cost tables quoted in the README: every preset, fp32, one CSV per preset under
# benchmarks/results/ (cost_<preset>_cpu.csv). Steps are interleaved one at a time across the
# sources (--steps 1) with many repeats, because shared CPU machines drift by several percent.
# PYTHON=.venv/bin/python bash benchmarks/cpu.sh   (any Python with proxykd's requirements)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUTDIR=${OUTDIR:-benchmarks/results}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUTDIR"
bench() {
  local preset=$1; shift
  local out="$OUTDIR/cost_${preset}_cpu.csv"
  [ -e "$out" ] && out="$OUTDIR/cost_${preset}_cpu_$(date -u +%Y%m%dT%H%M%S).csv"
  echo "== $preset -> $out"
  local start=$(date +%s)
  $PY -m kd bench --preset "$preset" --device cpu --out "$out" --quiet "$@"
  echo "   $(( $(date +%s) - start ))s"
}
bench digits --steps 1 --repeats 500
# The framework-overhead table: LeNet steps are ~10 ms, so small fixed costs show; many repeats
# are needed, and a ResNet18 teacher forward (~1 s at batch 128 here) would make them take hours.
bench fmnist-lenet --steps 1 --repeats 1000 --sources bare,onehot,ls,proxy,cached,lspp
bench cifar100-r34-r18 --steps 1 --repeats 15
bench tinyimagenet-r101-shufflenet --steps 1 --repeats 9
