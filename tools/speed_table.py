"""Print the CPU speed table of one machine from its result files, as Markdown: ``python tools/speed_table.py``.

Reads ``benchmarks/results/cpu_{inference_fp32,train_fp32,inference_bf16}_<cpu>_<build>.json`` (written by
``benchmarks/run_cpu_isa.sh``) and prints one row per setting and a column per build, each cell the SSB / baseline
ratios of the models in the order measured, with the commit each file was measured at; so the tables in the README
and docs are copied from the data, not typed.

    python tools/speed_table.py --cpu avx512_amx
"""

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / 'benchmarks' / 'results'
SETTINGS = {
    'inference_fp32': 'fp32 inference',
    'train_fp32': 'fp32 training step',
    'inference_bf16': 'bf16 autocast inference',
}
BUILDS = {'native': 'kernels for this CPU', 'x86-64-v3': 'kernels built for AVX2 (x86-64-v3)'}


def cell(path: Path) -> str:
    if not path.exists():
        return '–'
    payload = json.loads(path.read_text())
    ratios = ' / '.join(f'{row["ratio"]:.2f}' for row in payload['results'])
    machine = payload['machine']
    dirty = ', dirty tree' if machine.get('git_dirty') else ''
    return f'{ratios}× ({(machine.get("git_commit") or "?")[:7]}{dirty})'


def table(cpu: str) -> str:
    lines = ['| SSB / baseline | ' + ' | '.join(BUILDS.values()) + ' |', '|---|' + '---|' * len(BUILDS)]
    for setting, label in SETTINGS.items():
        cells = [cell(RESULTS / f'cpu_{setting}_{cpu}_{build}.json') for build in BUILDS]
        lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--cpu', default='avx512_amx', help="the CPU's ISA class in the file names")
    args = parser.parse_args()
    print(table(args.cpu))


if __name__ == '__main__':
    main()
