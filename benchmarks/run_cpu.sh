#!/usr/bin/env bash
# CPU benchmarks behind the README's Speed section: fp32, channels_last, 2 threads; inference at batch 16,
# training at batch 8, the time ceiling of each model, and (default allocator only) the sampling products.
# Runs twice: with glibc's default allocator settings, then with freed memory kept in the process
# (no mmap for large blocks, no trimming), which removes the page faults every new large tensor
# otherwise costs both models. Writes benchmarks/results/cpu_{inference,train,time_ceiling}[_malloc_kept]
# and cpu_sampling_products, each .json (with the commit and command) and .txt. About 45 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
mkdir -p "$out"
models=(ssb_resnetd50 ssb_resnetd101 ssb_resnetd152 ssb_resnetrs152)
run() {
    local suffix=$1
    shift
    timm-ssb bench --models "${models[@]}" --device cpu --threads 2 --batch-size 16 --stages \
        --json "$out/cpu_inference$suffix.json" "$@" | tee "$out/cpu_inference$suffix.txt"
    timm-ssb bench --models "${models[@]}" --device cpu --threads 2 --batch-size 8 --train \
        --json "$out/cpu_train$suffix.json" "$@" | tee "$out/cpu_train$suffix.txt"
    python benchmarks/time_ceiling.py --json "$out/cpu_time_ceiling$suffix.json" | tee "$out/cpu_time_ceiling$suffix.txt"
}
run '' "$@"
python benchmarks/sampling_products.py --json "$out/cpu_sampling_products.json" | tee "$out/cpu_sampling_products.txt"
MALLOC_MMAP_THRESHOLD_=1000000000000 MALLOC_TRIM_THRESHOLD_=100000000000 run _malloc_kept "$@"
