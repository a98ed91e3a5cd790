#!/usr/bin/env bash
# CPU benchmarks behind the README's Speed section: fp32, channels_last, 2 threads; inference at batch 16,
# training at batch 8, the time ceiling of each model, and (default allocator only) the sampling products.
# Runs twice: with glibc's default allocator settings, then with freed memory kept in the process
# (no mmap for large blocks, no trimming), which removes the page faults every new large tensor
# otherwise costs both models. Writes benchmarks/results/cpu_{inference,train,time_ceiling}[_malloc_kept]
# and cpu_sampling_products, then (default allocator) bf16 autocast and torch.compile inference,
# cpu_inference_{bf16,compile,compile_bf16} and cpu_time_ceiling_bf16, and the time ceiling with the PyTorch
# sampling path (cpu_{time_ceiling,sampling_products}_reference); each .json (with the commit and command) and .txt. The sampling
# backend (TIMM_SSB_SAMPLING_BACKEND, default auto: the native kernel) is recorded in each JSON.
# The fp32 runs took about 45 minutes on 2 cores; the bf16 and compile runs are not timed yet.
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
# the sampling's cost with the PyTorch path instead of the native kernel (the "before" of the kernel)
TIMM_SSB_SAMPLING_BACKEND=reference python benchmarks/sampling_products.py \
    --json "$out/cpu_sampling_products_reference.json" | tee "$out/cpu_sampling_products_reference.txt"
TIMM_SSB_SAMPLING_BACKEND=reference python benchmarks/time_ceiling.py --json "$out/cpu_time_ceiling_reference.json" |
    tee "$out/cpu_time_ceiling_reference.txt"
# bf16 autocast (how CPUs with native bf16 run these models) and torch.compile, inference, default allocator
bench_inference() {
    local name=$1
    shift
    timm-ssb bench --models "${models[@]}" --device cpu --threads 2 --batch-size 16 \
        --json "$out/cpu_inference_$name.json" "$@" | tee "$out/cpu_inference_$name.txt"
}
bench_inference bf16 --amp bfloat16
bench_inference compile --compile
bench_inference compile_bf16 --compile --amp bfloat16
python benchmarks/time_ceiling.py --amp bfloat16 --json "$out/cpu_time_ceiling_bf16.json" | tee "$out/cpu_time_ceiling_bf16.txt"
MALLOC_MMAP_THRESHOLD_=1000000000000 MALLOC_TRIM_THRESHOLD_=100000000000 run _malloc_kept "$@"
