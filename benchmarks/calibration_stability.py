"""How often the first-use calibration makes the same choice: the native resampling against PyTorch's products,
measured afresh in each of ``--processes`` new processes, as on a user's first run.

Each process starts from a copy of this machine's kernel build without its kept calibration, calls
``timm_ssb.layers.native.calibrate`` for fp32 and bf16, inference and training, and reports the ratio native /
PyTorch per way; the table gives each ratio's range and how many processes chose the native kernel.

    python benchmarks/calibration_stability.py --json benchmarks/results/cpu_calibration_stability_<cpu>_<build>.json \\
        | tee benchmarks/results/cpu_calibration_stability_<cpu>_<build>.txt
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

from timm_ssb.benchmark import machine_info, report
from timm_ssb.layers.native.calibration import chooses_native
from timm_ssb.layers.native.cpu.build import cache_dir, cpu_library

SETTINGS = [
    (dtype, mode, way)
    for dtype in ('float32', 'bfloat16')
    for mode in ('inference', 'training')
    for way in ('down', 'up')
]

_ONE_PROCESS = """
import json, sys, torch
from timm_ssb.layers.native import calibrate, forget_calibration
torch.set_num_threads(int(sys.argv[1]))
forget_calibration()
ratios = {}
for dtype in ('float32', 'bfloat16'):
    for mode in ('inference', 'training'):
        entry = calibrate(getattr(torch, dtype), mode == 'training')
        for way in ('down', 'up'):
            ratios[f'{dtype}/{mode}/{way}'] = entry[f'{way}_native_ms'] / entry[f'{way}_reference_ms']
print(json.dumps(ratios))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--processes', type=int, default=8)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--json', default=None, metavar='PATH')
    args = parser.parse_args()
    for flag in ('processes', 'threads'):
        if getattr(args, flag) <= 0:
            parser.error(f'--{flag} must be a positive int')
    cpu_library.require()
    runs: List[Dict[str, float]] = []
    with tempfile.TemporaryDirectory() as root:
        shutil.copytree(cache_dir(), Path(root) / cache_dir().name, ignore=shutil.ignore_patterns('calibration.json'))
        env = {**os.environ, 'TIMM_SSB_CACHE': root}
        for _ in range(args.processes):
            done = subprocess.run(
                [sys.executable, '-c', _ONE_PROCESS, str(args.threads)], env=env, capture_output=True, text=True
            )
            if done.returncode != 0:
                sys.exit(f'a calibration process failed:\n{done.stderr}')
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    machine = machine_info('cpu')
    rows = []
    for dtype, mode, way in SETTINGS:
        ratios = [run[f'{dtype}/{mode}/{way}'] for run in runs]
        rows.append(
            dict(dtype=dtype, mode=mode, way=way, ratios=ratios, native_chosen=sum(chooses_native(r) for r in ratios))
        )
    lines = [
        f'first-use calibration in {args.processes} fresh processes, {args.threads} threads, '
        f'{machine["processor"]} ({machine["cpu_isa"]}, kernels -march={machine["kernel_arch"]})',
        f'{"dtype":<9} {"mode":<10} {"way":<5} {"native/PyTorch min":>18} {"max":>6} {"native chosen":>14}',
    ]
    for r in rows:
        lines.append(
            f'{r["dtype"]:<9} {r["mode"]:<10} {r["way"]:<5} {min(r["ratios"]):>18.2f} {max(r["ratios"]):>6.2f} '
            f'{r["native_chosen"]:>9} of {args.processes}'
        )
    report('\n'.join(lines), args.json, {'settings': vars(args), 'machine': machine, 'results': rows})


if __name__ == '__main__':
    main()
