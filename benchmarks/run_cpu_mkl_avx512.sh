#!/usr/bin/env bash
# Issue #4's CPU settings again, with Intel MKL's AVX-512 kernels enabled on a non-Intel CPU
# (benchmarks/mkl_intel_dispatch.c, loaded with LD_PRELOAD; needs a C compiler) and freed memory kept
# in the process (as run_cpu.sh's second run). On an Intel CPU MKL uses them anyway and this changes nothing.
# It measures what the SSB models gain when their sampling products (torch.bmm, run by MKL) get the
# AVX-512 speed the convolutions (oneDNN) already have; the package does not do this for its users.
# Writes benchmarks/results/cpu_{sampling_products,inference,train,time_ceiling}_mkl_avx512.{json,txt}.
# Takes about 30 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
mkdir -p "$out"
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
cc -shared -fPIC -O2 -o "$build/libmkl_intel_dispatch.so" benchmarks/mkl_intel_dispatch.c
export LD_PRELOAD="$build/libmkl_intel_dispatch.so"
export MALLOC_MMAP_THRESHOLD_=1000000000000 MALLOC_TRIM_THRESHOLD_=100000000000
models=(ssb_resnetd50 ssb_resnetd101 ssb_resnetd152 ssb_resnetrs152)
python benchmarks/sampling_products.py --json "$out/cpu_sampling_products_mkl_avx512.json" \
    | tee "$out/cpu_sampling_products_mkl_avx512.txt"
timm-ssb bench --models "${models[@]}" --device cpu --threads 2 --batch-size 16 --stages \
    --json "$out/cpu_inference_mkl_avx512.json" "$@" | tee "$out/cpu_inference_mkl_avx512.txt"
timm-ssb bench --models "${models[@]}" --device cpu --threads 2 --batch-size 8 --train \
    --json "$out/cpu_train_mkl_avx512.json" "$@" | tee "$out/cpu_train_mkl_avx512.txt"
python benchmarks/time_ceiling.py --json "$out/cpu_time_ceiling_mkl_avx512.json" \
    | tee "$out/cpu_time_ceiling_mkl_avx512.txt"
