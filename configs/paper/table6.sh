#!/usr/bin/env bash
# The paper's Table 6, teachers first, then their students (kd must be on PATH, or use KD='python -m kd').
# Needs CIFAR-100 under $KD_DATA_ROOT (or ./data) and TinyImageNet in ImageFolder layout under
# $KD_DATA_ROOT/tiny-imagenet-200/{train,val}. Finished runs (with a summary.json) are skipped.
set -euo pipefail
KD=${KD:-kd}
# A run killed between epochs continues from its checkpoint; one killed in its first epoch must be removed by hand.
run() {
  local verb=$1 config=$2 out=$3
  [ -f "$out/summary.json" ] && return 0
  if [ -f "$out/checkpoint.pt" ]; then $KD "$verb" --resume --out "$out"; else $KD "$verb" --config "$config" --out "$out"; fi
}
run train-teacher configs/paper/cifar100/teacher-resnet34-onehot.yaml runs/paper/cifar100/teacher-resnet34-onehot
run train-teacher configs/paper/cifar100/teacher-resnet34-ls.yaml runs/paper/cifar100/teacher-resnet34-ls
run train-teacher configs/paper/cifar100/teacher-resnet34-lspp.yaml runs/paper/cifar100/teacher-resnet34-lspp
run distill configs/paper/cifar100/student-resnet18-from-resnet34-onehot.yaml runs/paper/cifar100/student-resnet18-from-resnet34-onehot
run distill configs/paper/cifar100/student-resnet18-from-resnet34-ls.yaml runs/paper/cifar100/student-resnet18-from-resnet34-ls
run distill configs/paper/cifar100/student-resnet18-from-resnet34-lspp.yaml runs/paper/cifar100/student-resnet18-from-resnet34-lspp
run distill configs/paper/cifar100/student-resnet18-from-resnet34-ptlspp.yaml runs/paper/cifar100/student-resnet18-from-resnet34-ptlspp
run distill configs/paper/cifar100/student-resnet34-from-resnet34-onehot.yaml runs/paper/cifar100/student-resnet34-from-resnet34-onehot
run distill configs/paper/cifar100/student-resnet34-from-resnet34-ls.yaml runs/paper/cifar100/student-resnet34-from-resnet34-ls
run distill configs/paper/cifar100/student-resnet34-from-resnet34-lspp.yaml runs/paper/cifar100/student-resnet34-from-resnet34-lspp
run distill configs/paper/cifar100/student-resnet34-from-resnet34-ptlspp.yaml runs/paper/cifar100/student-resnet34-from-resnet34-ptlspp
run distill configs/paper/cifar100/student-resnet50-from-resnet34-onehot.yaml runs/paper/cifar100/student-resnet50-from-resnet34-onehot
run distill configs/paper/cifar100/student-resnet50-from-resnet34-ls.yaml runs/paper/cifar100/student-resnet50-from-resnet34-ls
run distill configs/paper/cifar100/student-resnet50-from-resnet34-lspp.yaml runs/paper/cifar100/student-resnet50-from-resnet34-lspp
run distill configs/paper/cifar100/student-resnet50-from-resnet34-ptlspp.yaml runs/paper/cifar100/student-resnet50-from-resnet34-ptlspp
run train-teacher configs/paper/cifar100/teacher-resnet50-onehot.yaml runs/paper/cifar100/teacher-resnet50-onehot
run train-teacher configs/paper/cifar100/teacher-resnet50-ls.yaml runs/paper/cifar100/teacher-resnet50-ls
run train-teacher configs/paper/cifar100/teacher-resnet50-lspp.yaml runs/paper/cifar100/teacher-resnet50-lspp
run distill configs/paper/cifar100/student-shufflenetv2-from-resnet50-onehot.yaml runs/paper/cifar100/student-shufflenetv2-from-resnet50-onehot
run distill configs/paper/cifar100/student-shufflenetv2-from-resnet50-ls.yaml runs/paper/cifar100/student-shufflenetv2-from-resnet50-ls
run distill configs/paper/cifar100/student-shufflenetv2-from-resnet50-lspp.yaml runs/paper/cifar100/student-shufflenetv2-from-resnet50-lspp
run distill configs/paper/cifar100/student-shufflenetv2-from-resnet50-ptlspp.yaml runs/paper/cifar100/student-shufflenetv2-from-resnet50-ptlspp
run train-teacher configs/paper/tinyimagenet/teacher-resnet50-onehot.yaml runs/paper/tinyimagenet/teacher-resnet50-onehot
run train-teacher configs/paper/tinyimagenet/teacher-resnet50-ls.yaml runs/paper/tinyimagenet/teacher-resnet50-ls
run train-teacher configs/paper/tinyimagenet/teacher-resnet50-lspp.yaml runs/paper/tinyimagenet/teacher-resnet50-lspp
run distill configs/paper/tinyimagenet/student-shufflenetv2-from-resnet50-onehot.yaml runs/paper/tinyimagenet/student-shufflenetv2-from-resnet50-onehot
run distill configs/paper/tinyimagenet/student-shufflenetv2-from-resnet50-ls.yaml runs/paper/tinyimagenet/student-shufflenetv2-from-resnet50-ls
run distill configs/paper/tinyimagenet/student-shufflenetv2-from-resnet50-lspp.yaml runs/paper/tinyimagenet/student-shufflenetv2-from-resnet50-lspp
run distill configs/paper/tinyimagenet/student-shufflenetv2-from-resnet50-ptlspp.yaml runs/paper/tinyimagenet/student-shufflenetv2-from-resnet50-ptlspp
run train-teacher configs/paper/tinyimagenet/teacher-resnet101-onehot.yaml runs/paper/tinyimagenet/teacher-resnet101-onehot
run train-teacher configs/paper/tinyimagenet/teacher-resnet101-ls.yaml runs/paper/tinyimagenet/teacher-resnet101-ls
run train-teacher configs/paper/tinyimagenet/teacher-resnet101-lspp.yaml runs/paper/tinyimagenet/teacher-resnet101-lspp
run distill configs/paper/tinyimagenet/student-shufflenetv2-from-resnet101-onehot.yaml runs/paper/tinyimagenet/student-shufflenetv2-from-resnet101-onehot
run distill configs/paper/tinyimagenet/student-shufflenetv2-from-resnet101-ls.yaml runs/paper/tinyimagenet/student-shufflenetv2-from-resnet101-ls
run distill configs/paper/tinyimagenet/student-shufflenetv2-from-resnet101-lspp.yaml runs/paper/tinyimagenet/student-shufflenetv2-from-resnet101-lspp
run distill configs/paper/tinyimagenet/student-shufflenetv2-from-resnet101-ptlspp.yaml runs/paper/tinyimagenet/student-shufflenetv2-from-resnet101-ptlspp
run train-teacher configs/paper/tinyimagenet/teacher-densenet121-onehot.yaml runs/paper/tinyimagenet/teacher-densenet121-onehot
run train-teacher configs/paper/tinyimagenet/teacher-densenet121-ls.yaml runs/paper/tinyimagenet/teacher-densenet121-ls
run train-teacher configs/paper/tinyimagenet/teacher-densenet121-lspp.yaml runs/paper/tinyimagenet/teacher-densenet121-lspp
run distill configs/paper/tinyimagenet/student-shufflenetv2-from-densenet121-onehot.yaml runs/paper/tinyimagenet/student-shufflenetv2-from-densenet121-onehot
run distill configs/paper/tinyimagenet/student-shufflenetv2-from-densenet121-ls.yaml runs/paper/tinyimagenet/student-shufflenetv2-from-densenet121-ls
run distill configs/paper/tinyimagenet/student-shufflenetv2-from-densenet121-lspp.yaml runs/paper/tinyimagenet/student-shufflenetv2-from-densenet121-lspp
run distill configs/paper/tinyimagenet/student-shufflenetv2-from-densenet121-ptlspp.yaml runs/paper/tinyimagenet/student-shufflenetv2-from-densenet121-ptlspp
