#!/usr/bin/env bash
# GPU benchmark of issue #4's settings: bf16 autocast, channels_last, batch 256, eager and torch.compile,
# inference and training step. Writes benchmarks/results/gpu_*.{json,txt}. One command: bash benchmarks/run_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
mkdir -p "$out"
common=(--models ssb_resnetd50 ssb_resnetd101 ssb_resnetd152 ssb_resnetrs152 --device cuda --amp bfloat16 --batch-size 256 --rounds 7 --iters 5 --warmup 3)
for mode in eager compile; do
  flag=(); [ "$mode" = compile ] && flag=(--compile)
  timm-ssb bench "${common[@]}" "${flag[@]}" --json "$out/gpu_inference_$mode.json" "$@" | tee "$out/gpu_inference_$mode.txt"
  timm-ssb bench "${common[@]}" "${flag[@]}" --train --json "$out/gpu_train_$mode.json" "$@" | tee "$out/gpu_train_$mode.txt"
done
