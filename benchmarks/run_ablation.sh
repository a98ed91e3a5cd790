#!/usr/bin/env bash
# Regenerates every adaptive-sampling experiment the docs cite (benchmarks/results/ablation_*.{txt,json,png} and
# warm_start_digits.*). Each run is deterministic per seed on one machine (same seed, same threads: the same
# accuracy). The first four are the 16-pixel-digit ablations (3 seeds, ~20 minutes on 2 cores); the next two the
# 12-pixel digit among 16 fragments (5 seeds, ~45 minutes); the last the warm-start recipe in miniature (~25 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=(--seeds 0 1 2)
python benchmarks/ablation_cluttered_digits.py "${seeds[@]}" "$@"
python benchmarks/ablation_cluttered_digits.py "${seeds[@]}" --samplers adaptive --sigma-g 0.05 \
    --name ablation_cluttered_digits_sigma_g_0.05 "$@"
python benchmarks/ablation_cluttered_digits.py "${seeds[@]}" --samplers adaptive uniform --sigma-g 0.05 --sizes 3 2 1 \
    --name ablation_cluttered_digits_sizes_3_2_1 "$@"
python benchmarks/ablation_cluttered_digits.py "${seeds[@]}" --samplers adaptive uniform --sigma-g 0.05 \
    --model ssb_resnetd50 --name ablation_cluttered_digits_resnetd50 "$@"
python benchmarks/ablation_cluttered_digits.py --digit 12 --fragments 16 --name ablation_small_digit "$@"
python benchmarks/ablation_cluttered_digits.py --digit 12 --fragments 16 --sizes 4 2 1 --samplers adaptive uniform \
    --name ablation_small_digit_sizes_4_2_1 "$@"
python benchmarks/warm_start_digits.py "$@"
