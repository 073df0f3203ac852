#!/usr/bin/env bash
# The cost tables on one GPU (bf16 autocast, channels_last), one CSV per part with the GPU's name in
# the file name. Runs from the source tree without installing anything:
#   bash benchmarks/gpu.sh                                  # every part, on a CUDA machine
#   PARTS="epoch compile large-k" bash benchmarks/gpu.sh    # only some parts
#   DEVICE=cpu AMP=none STEPS=1 REPEATS=1 SHORT_STEPS=1 SHORT_REPEATS=1 WARMUP=0 BATCH=2 EPOCH_SIZE=4 COMPILE_BACKEND=aot_eager \
#     CLASSES=50,300 WHOLE_RUN_PRESETS=digits GRAPH_PRESETS=digits COMPILE_MODE=default E2E_DATASET=digits E2E_EPOCHS=1 \
#     STEP_PRESETS=digits OUTDIR=/tmp/x bash benchmarks/gpu.sh   # logic check on CPU
#   DRY_RUN=1 bash benchmarks/gpu.sh                        # print the commands, run and write nothing
# Parts, with the wall time each took on one H200 (benchmarks/results/gpu_h200_*log.txt); about
# 6 minutes in all there, so an H100 (slower memory) should stay under 8:
#   steps    every preset, every source, STEPS x REPEATS                        (150 s)
#   epoch    whole synthetic epochs through the real loader, ResNet101 -> ShuffleNet
#            and LeNet, onehot/proxy/network/lspp                                (61 s)
#   compile  torch.compile rows beside eager ones, same presets and sources,
#            SHORT_STEPS x SHORT_REPEATS (compilation itself, ~80 s, timed apart) (143 s)
#   large-k  K = 1,000 and 21,841 with a linear head: onehot, dense proxy,
#            top-k proxy, top-k cache; LS++ at both K, SHORT_STEPS x SHORT_REPEATS (24 s)
#   graphs   the step captured once and replayed (--compile-mode reduce-overhead: CUDA graphs) beside
#            eager, LeNet (Fashion-MNIST shape) and ResNet18 students, then the large-K rows so
#   e2e      the LeNet recipe end to end (E2E_EPOCHS epochs of Fashion-MNIST through the real loader),
#            eager and captured, one CSV (benchmarks/e2e.py). A lent machine has no Debian data set:
#            mkdir -p data/FashionMNIST/raw && cp /usr/share/datasets/fashion-mnist/*.gz data/FashionMNIST/raw/
#            here first, and carry data/FashionMNIST (30 MB) with the run
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
AMP=${AMP:-bf16}
STEPS=${STEPS:-20}
REPEATS=${REPEATS:-10}
SHORT_STEPS=${SHORT_STEPS:-10}   # the compile and large-k parts: fewer timed steps
SHORT_REPEATS=${SHORT_REPEATS:-5}
WARMUP=${WARMUP:-5}
BATCH=${BATCH:-}
EPOCH_SIZE=${EPOCH_SIZE:-}
COMPILE_BACKEND=${COMPILE_BACKEND:-inductor}
CLASSES=${CLASSES:-}
COMPILE_MODE=${COMPILE_MODE:-reduce-overhead}  # the graphs and e2e parts (the CPU logic check: default)
GRAPH_PRESETS=${GRAPH_PRESETS:-fmnist-lenet cifar100-r34-r18}  # the graphs part's students: LeNet, ResNet18
E2E_DATASET=${E2E_DATASET:-fashion-mnist}
E2E_EPOCHS=${E2E_EPOCHS:-15}
WHOLE_RUN_PRESETS=${WHOLE_RUN_PRESETS:-tinyimagenet-r101-shufflenet fmnist-lenet}  # the epoch and compile parts
STEP_PRESETS=${STEP_PRESETS:-tinyimagenet-r101-shufflenet cifar100-r34-r18 fmnist-lenet digits}  # the steps part
DRY_RUN=${DRY_RUN:-}
PARTS=${PARTS:-steps epoch compile large-k graphs e2e}
OUTDIR=${OUTDIR:-benchmarks/results}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# run CMD...: run it, or with DRY_RUN print it (one line, shell-quoted)
run() {
  if [ -n "$DRY_RUN" ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
if [ -n "$DRY_RUN" ]; then
  name=$DEVICE  # no device is asked for its name
else
  name=$($PY - "$DEVICE" <<'PY'
import re, sys, torch
dev = sys.argv[1]
n = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"
print(re.sub(r"[^A-Za-z0-9]+", "-", n).strip("-").lower())
PY
)
  mkdir -p "$OUTDIR"
  $PY -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
fi

# bench TAG PRESET ARGS...: one CSV, never overwriting an earlier one
bench() {
  local tag=$1 preset=$2; shift 2
  local out="$OUTDIR/cost_${preset}_${name}${tag}.csv"
  [ -e "$out" ] && out="$OUTDIR/cost_${preset}_${name}${tag}_$(date -u +%Y%m%dT%H%M%S).csv"
  echo "== $preset$tag -> $out"
  local start=$(date +%s)
  if [ "$preset" = large-k ]; then set -- large-k-bench "$@"; else set -- bench --preset "$preset" "$@"; fi
  run $PY -m kd "$@" --device "$DEVICE" --out "$out" --quiet
  echo "   $(( $(date +%s) - start ))s"
}
common=(--amp "$AMP" --warmup "$WARMUP" ${BATCH:+--batch-size "$BATCH"})
image=(--channels-last)
for part in $PARTS; do
  case $part in
    steps)
      for preset in $STEP_PRESETS; do
        bench "" "$preset" "${common[@]}" "${image[@]}" --steps "$STEPS" --repeats "$REPEATS"
      done ;;
    epoch)
      for preset in $WHOLE_RUN_PRESETS; do
        bench _epoch "$preset" "${common[@]}" "${image[@]}" --mode epoch ${EPOCH_SIZE:+--epoch-size "$EPOCH_SIZE"} \
          --repeats 3 --sources onehot,proxy,network,lspp
      done ;;
    compile)
      for preset in $WHOLE_RUN_PRESETS; do
        bench _compile "$preset" "${common[@]}" "${image[@]}" --compile --compile-backend "$COMPILE_BACKEND" \
          --steps "$SHORT_STEPS" --repeats "$SHORT_REPEATS" --sources onehot,proxy,network,lspp
      done ;;
    large-k)
      bench "" large-k "${common[@]}" --steps "$SHORT_STEPS" --repeats "$SHORT_REPEATS" ${CLASSES:+--classes "$CLASSES"} ;;
    graphs)
      for preset in $GRAPH_PRESETS; do
        bench _graphs "$preset" "${common[@]}" "${image[@]}" --compile --compile-mode "$COMPILE_MODE" \
          --compile-backend "$COMPILE_BACKEND" --steps "$STEPS" --repeats "$REPEATS" --sources bare,onehot,proxy,cached,lspp
      done
      bench _graphs large-k "${common[@]}" --compile-mode "$COMPILE_MODE" --compile-backend "$COMPILE_BACKEND" \
        --steps "$SHORT_STEPS" --repeats "$SHORT_REPEATS" ${CLASSES:+--classes "$CLASSES"} ;;
    e2e)
      out="$OUTDIR/e2e_lenet_${name}.csv"
      [ -e "$out" ] && out="$OUTDIR/e2e_lenet_${name}_$(date -u +%Y%m%dT%H%M%S).csv"
      root=(); [ -d data ] && root=(--data-root data)
      run $PY -m benchmarks.e2e --dataset "$E2E_DATASET" "${root[@]}" --epochs "$E2E_EPOCHS" --device "$DEVICE" \
        --modes "none,$COMPILE_MODE" --compile-backend "$COMPILE_BACKEND" ${BATCH:+--batch-size "$BATCH"} --out "$out" ;;
    *) echo "unknown part '$part' (steps, epoch, compile, large-k, graphs, e2e)" >&2; exit 2 ;;
  esac
done
