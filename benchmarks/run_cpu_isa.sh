#!/usr/bin/env bash
# Issue #22's CPU table on this machine, once per build of the native kernels: for this CPU (-march=native) and,
# on an x86-64 CPU that has it, for AVX2 (x86-64-v3, the code an AVX2-only CPU such as AMD Zen 2/3 gets). Each
# run: fp32 inference (batch 16) and training step (batch 8), bf16 autocast inference (batch 16), channels-last,
# 2 threads, default allocator, every figure SSB / baseline in one process; and sampling_products.py in fp32 and
# bf16 (each sampling op, the native kernel -- backend native, whatever auto would choose -- against PyTorch's
# path and the map's memory floors; the medians over SAMPLING_PROCESSES fresh processes, default 3). Writes
# benchmarks/results/cpu_{inference_fp32,train_fp32,inference_bf16,sampling_products_{float32,bfloat16}}_<cpu>_<build>.{txt,json}: <cpu> the CPU's ISA class (avx512, avx512_amx, avx2,
# neon), <build> native or x86-64-v3; the CPU, ISA, build, commit and command are in each JSON.
# ARCHS="native" runs one build only; SETTINGS="inference_fp32 sampling" runs those parts only. Not run by default
# (each takes ~10 min a build on 2 cores, the training step longer, most of it compiling):
# SETTINGS="compiled_inference_fp32 compiled_train_fp32 compiled_inference_bf16", the same rows with both models
# under torch.compile (cpu_compiled_{inference_fp32,train_fp32,inference_bf16}_<cpu>_<build>).
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
mkdir -p "$out"
models=(ssb_resnetd50 ssb_resnetd101 ssb_resnetd152 ssb_resnetrs152)
known="inference_fp32 train_fp32 inference_bf16 sampling compiled_inference_fp32 compiled_train_fp32 compiled_inference_bf16"
settings=" ${SETTINGS:-inference_fp32 train_fp32 inference_bf16 sampling} "
for setting in $settings; do
    if [[ " $known " != *" $setting "* ]]; then
        echo "SETTINGS: unknown setting '$setting'; allowed: $known" >&2
        exit 2
    fi
done
isa=$(python -c 'from timm_ssb.layers.native.cpu.features import vector_isa; print(vector_isa())')
cpu=$(echo "$isa" | tr 'A-Z' 'a-z' | tr -d ' -' | tr '+' '_')
for arch in ${ARCHS:-native x86-64-v3}; do
    build=${cpu}_$arch
    export TIMM_SSB_CPU_ARCH=$arch
    bench() {
        local name=$1
        shift
        python -m timm_ssb.cli bench --models "${models[@]}" --device cpu --threads 2 \
            --json "$out/cpu_${name}_$build.json" "$@" | tee "$out/cpu_${name}_$build.txt"
    }
    [[ $settings == *" inference_fp32 "* ]] && bench inference_fp32 --batch-size 16
    [[ $settings == *" train_fp32 "* ]] && bench train_fp32 --batch-size 8 --train
    [[ $settings == *" inference_bf16 "* ]] && bench inference_bf16 --batch-size 16 --amp bfloat16
    [[ $settings == *" compiled_inference_fp32 "* ]] && bench compiled_inference_fp32 --batch-size 16 --compile
    [[ $settings == *" compiled_train_fp32 "* ]] && bench compiled_train_fp32 --batch-size 8 --train --compile
    [[ $settings == *" compiled_inference_bf16 "* ]] && bench compiled_inference_bf16 --batch-size 16 --amp bfloat16 --compile
    [[ $settings == *" sampling "* ]] || continue
    for dtype in float32 bfloat16; do
        TIMM_SSB_SAMPLING_BACKEND=native python benchmarks/sampling_products.py --dtype $dtype --processes "${SAMPLING_PROCESSES:-3}" --json "$out/cpu_sampling_products_${dtype}_$build.json" |
            tee "$out/cpu_sampling_products_${dtype}_$build.txt"
    done
done
