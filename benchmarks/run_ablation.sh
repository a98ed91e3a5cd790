#!/usr/bin/env bash
# Regenerates every ablation result the README cites (benchmarks/results/ablation_cluttered_digits*.{txt,json,png}).
# Each run is deterministic per seed on one machine (same seed, same threads: the same accuracy); about 20 minutes
# on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
python benchmarks/ablation_cluttered_digits.py "$@"
python benchmarks/ablation_cluttered_digits.py --samplers adaptive --sigma-g 0.05 \
    --name ablation_cluttered_digits_sigma_g_0.05 "$@"
python benchmarks/ablation_cluttered_digits.py --samplers adaptive uniform --sigma-g 0.05 --sizes 3 2 1 \
    --name ablation_cluttered_digits_sizes_3_2_1 "$@"
python benchmarks/ablation_cluttered_digits.py --samplers adaptive uniform --sigma-g 0.05 --model ssb_resnetd50 \
    --name ablation_cluttered_digits_resnetd50 "$@"
