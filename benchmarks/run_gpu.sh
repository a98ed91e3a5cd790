#!/usr/bin/env bash
# GPU check and benchmarks, one command for a machine with one CUDA GPU:
#     bash benchmarks/run_gpu.sh [OUT_DIR]          (default OUT_DIR: benchmarks/results)
# In order of what matters if time runs out, each step writing its files as it finishes:
# 1. the Triton kernels' tests and the CUDA model tests (no host syncs, CUDA-graph capture), natively (gpu_tests.txt);
# 2. the sampling ops alone (resampling and the adaptive matrices), Triton against PyTorch and against a copy of
#    the map, bf16 (gpu_sampling_bfloat16), and the traffic model's bytes beside them (gpu_traffic_bfloat16);
# 3. eager inference (with each part's time) and training step against the timm baselines: bf16 autocast,
#    channels_last, batch 256, with peak memory (gpu_{inference,train}_eager);
# 4. where the time goes (gpu_profile.py): wall vs device-busy time, launches, top kernels and the operators
#    (with input shapes) behind them, per step of SSB-ResNet-D-50 and resnet50d: eager and compiled inference,
#    eager training step (gpu_profile_{eager,compile,train});
# 5. inference and training step with torch.compile (gpu_{inference,train}_compile; each model pair compiles
#    twice per mode, about a minute each);
# 6. the sampling ops in fp32 (gpu_sampling_float32).
# On an H200, steps 1-4 should take about six minutes (estimated from the step times of the two runs so far,
# Triton compiling its kernels included): run them in one lease, the rest in another if need be.
# MODELS (default: the four SSB models) narrows steps 3 and 5, COMPILE_MODELS (default: ssb_resnetd50) step 5.
# PYTHON (default: python3) is the interpreter that has torch, timm and this package (or PYTHONPATH=src).
# OUT_DIR gets gpu_commit.txt (the commit, or a digest of src/ where there is no git) and, at the end or when the
# run is stopped, gpu_results.tgz with every file written.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
mkdir -p "$out"
py=${PYTHON:-python3}
read -r -a models <<<"${MODELS:-ssb_resnetd50 ssb_resnetd101 ssb_resnetd152 ssb_resnetrs152}"
read -r -a compile_models <<<"${COMPILE_MODELS:-ssb_resnetd50}"
# What ran, whatever the machine's git says (a device machine may get a copy of the tree without its .git): the
# commit if there is one, and a digest of the package's sources, so that the results can be tied to a commit here.
{
    git rev-parse HEAD 2>/dev/null || echo 'no git here'
    git status --porcelain 2>/dev/null | head -20
    find src -type f \( -name '*.py' -o -name '*.cpp' \) -print0 | sort -z | xargs -0 sha256sum | sha256sum
} >"$out/gpu_commit.txt"
archive() { tar -czf "$out/gpu_results.tgz" -C "$out" --exclude gpu_results.tgz . 2>/dev/null || true; }
trap archive EXIT  # one archive of whatever finished, also when a step fails or the lease's limit stops the run
trap 'exit 143' TERM INT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu_tests.txt"
"$py" -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_models.py tests/test_sampling.py \
    -k 'triton or cuda' 2>&1 | tee -a "$out/gpu_tests.txt" || echo 'TESTS FAILED: see above' | tee -a "$out/gpu_tests.txt"
"$py" benchmarks/gpu_sampling.py --dtype bfloat16 --json "$out/gpu_sampling_bfloat16.json" |
    tee "$out/gpu_sampling_bfloat16.txt"
"$py" benchmarks/traffic_model.py --measured "$out/gpu_sampling_bfloat16.json" --json "$out/gpu_traffic_bfloat16.json" |
    tee "$out/gpu_traffic_bfloat16.txt"
common=(--device cuda --amp bfloat16 --batch-size 256 --rounds 5 --iters 5 --warmup 3)
"$py" -m timm_ssb.cli bench --models "${models[@]}" "${common[@]}" --stages --json "$out/gpu_inference_eager.json" |
    tee "$out/gpu_inference_eager.txt"
"$py" -m timm_ssb.cli bench --models "${models[@]}" "${common[@]}" --train --json "$out/gpu_train_eager.json" |
    tee "$out/gpu_train_eager.txt"
for mode in eager compile train; do
    flag=()
    [ "$mode" = compile ] && flag=(--compile)
    [ "$mode" = train ] && flag=(--train)
    "$py" benchmarks/gpu_profile.py --models ssb_resnetd50 resnet50d --shapes "${flag[@]}" \
        --json "$out/gpu_profile_$mode.json" | tee "$out/gpu_profile_$mode.txt"
done
"$py" -m timm_ssb.cli bench --models "${compile_models[@]}" "${common[@]}" --compile \
    --json "$out/gpu_inference_compile.json" | tee "$out/gpu_inference_compile.txt"
"$py" -m timm_ssb.cli bench --models "${compile_models[@]}" "${common[@]}" --compile --train \
    --json "$out/gpu_train_compile.json" | tee "$out/gpu_train_compile.txt"
"$py" benchmarks/gpu_sampling.py --dtype float32 --json "$out/gpu_sampling_float32.json" |
    tee "$out/gpu_sampling_float32.txt"
