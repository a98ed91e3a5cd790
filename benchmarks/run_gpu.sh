#!/usr/bin/env bash
# GPU check and benchmarks (issue #12), one command for a machine with one CUDA GPU:
#     bash benchmarks/run_gpu.sh [OUT_DIR]          (default OUT_DIR: benchmarks/results)
# In order of what matters if time runs out, each step writing its files as it finishes:
# 1. the Triton kernel's tests and the CUDA model tests (no host syncs, CUDA-graph capture), natively (gpu_tests.txt);
# 2. the sampling ops alone, Triton against PyTorch and against a copy of the map, bf16 and fp32 (gpu_sampling_*);
# 3. eager inference and training step against the timm baselines: bf16 autocast, channels_last, batch 256,
#    with peak memory (gpu_{inference,train}_eager);
# 4. the same with torch.compile (gpu_{inference,train}_compile);
# 5. where the time goes (gpu_profile.py): wall vs device-busy time, launches and top kernels per step of
#    SSB-ResNet-D-50 and resnet50d, eager and compiled inference, eager training step (gpu_profile_*).
# MODELS (default: the four SSB models) narrows steps 3-4, e.g. MODELS="ssb_resnetd50 ssb_resnetd152";
# PYTHON (default: python3) is the interpreter that has torch, timm and this package (or PYTHONPATH=src).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
mkdir -p "$out"
py=${PYTHON:-python3}
read -r -a models <<<"${MODELS:-ssb_resnetd50 ssb_resnetd101 ssb_resnetd152 ssb_resnetrs152}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu_tests.txt"
"$py" -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_models.py tests/test_sampling.py \
    -k 'triton or cuda' 2>&1 | tee -a "$out/gpu_tests.txt" || echo 'TESTS FAILED: see above' | tee -a "$out/gpu_tests.txt"
for dtype in bfloat16 float32; do
    "$py" benchmarks/gpu_sampling.py --dtype "$dtype" --json "$out/gpu_sampling_$dtype.json" |
        tee "$out/gpu_sampling_$dtype.txt"
done
common=(--models "${models[@]}" --device cuda --amp bfloat16 --batch-size 256 --rounds 7 --iters 5 --warmup 3)
for mode in eager compile; do
    flag=()
    [ "$mode" = compile ] && flag=(--compile)
    "$py" -m timm_ssb.cli bench "${common[@]}" "${flag[@]}" --json "$out/gpu_inference_$mode.json" |
        tee "$out/gpu_inference_$mode.txt"
    "$py" -m timm_ssb.cli bench "${common[@]}" "${flag[@]}" --train --json "$out/gpu_train_$mode.json" |
        tee "$out/gpu_train_$mode.txt"
done
for mode in eager compile train; do
    flag=()
    [ "$mode" = compile ] && flag=(--compile)
    [ "$mode" = train ] && flag=(--train)
    "$py" benchmarks/gpu_profile.py --models ssb_resnetd50 resnet50d "${flag[@]}" --json "$out/gpu_profile_$mode.json" |
        tee "$out/gpu_profile_$mode.txt"
done
