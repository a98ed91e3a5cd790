#!/usr/bin/env bash
# CPU benchmark of issue #4's settings: fp32, channels_last, 2 threads; inference at batch 16, training at batch 8.
# Writes benchmarks/results/cpu_{inference,train}.{json,txt}. Takes about 15 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
mkdir -p "$out"
timm-ssb bench --models ssb_resnetd50 ssb_resnetd101 ssb_resnetd152 ssb_resnetrs152 --device cpu --threads 2 --batch-size 16 --stages --json "$out/cpu_inference.json" "$@" | tee "$out/cpu_inference.txt"
timm-ssb bench --models ssb_resnetd50 ssb_resnetd101 ssb_resnetd152 ssb_resnetrs152 --device cpu --threads 2 --batch-size 8 --train --json "$out/cpu_train.json" "$@" | tee "$out/cpu_train.txt"
