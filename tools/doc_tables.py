"""The tables of the README and the docs that hold measured figures, made from the result files:
``python tools/doc_tables.py --write``.

Each table stands in a page between ``<!-- table:NAME -->`` and ``<!-- /table -->`` and is made from
``benchmarks/results/`` alone, so the pages' figures are the data's, never typed:

* ``cpu``: for each CPU class measured (``<cpu>``: its ISA class, ``avx512_amx``, ``avx512``, ``avx2``, ``neon``), one
  row per setting measured there (``cpu_<setting>_<cpu>_<build>.json``, :data:`SETTINGS`, written by
  ``benchmarks/run_cpu_isa.sh``) and ONNX Runtime (``onnx_inference_<cpu>.json``), a column per build of the
  kernels; each cell the SSB / baseline ratios of the models in the order measured and the commit measured at;
* ``ops``: for each CPU class, each sampling op, the native kernel's time over PyTorch's path's at layer2 / layer3 /
  layer4 (``cpu_sampling_products_<dtype>_<cpu>_<build>.json``);
* ``summary`` (the README's): a row per CPU class and build, a column per setting any of them measured;
* ``targets`` (docs/performance.md): a row per CPU class and build, a column per target of the speed issue (#22,
  :data:`~timm_ssb.benchmark.SPEED_TARGETS`; the compiled settings have none): how many of that row's cells meet
  theirs, and each miss with its target;
* ``small_digit`` (docs/adaptive-sampling.md): each sampler's accuracy and its paired difference from uniform
  (``ablation_small_digit*.json``);
* ``warm_start`` (docs/training.md): accuracy by epoch of the four arms of ``warm_start_digits.json``.

``python tools/doc_tables.py`` prints the tables; ``--write`` puts them in the pages; ``--check`` exits 1 where
a page differs from what the data gives (run by the test suite).
"""

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Dict, List

from timm_ssb.benchmark import SPEED_TARGETS

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / 'benchmarks' / 'results'
PAGES = tuple(
    ROOT / page for page in ('README.md', 'docs/performance.md', 'docs/adaptive-sampling.md', 'docs/training.md')
)
SETTINGS = {
    'inference_fp32': 'fp32 inference',
    'train_fp32': 'fp32 training step',
    'inference_bf16': 'bf16 autocast inference',
    'compiled_inference_fp32': 'fp32 inference, torch.compile',
    'compiled_train_fp32': 'fp32 training step, torch.compile',
    'compiled_inference_bf16': 'bf16 autocast inference, torch.compile',
}
BUILDS = {'native': 'kernels for this CPU (-march=native)', 'x86-64-v3': 'kernels built for AVX2 (x86-64-v3)'}
CPU_CLASSES = ('avx512_amx', 'avx512', 'avx2', 'neon')
"""The ISA classes the tables list first, in this order; any other class with result files follows them."""
OPS = {
    'down': 'down',
    'up + residual + ReLU': 'up_residual_relu',
    'down, forward + backward': 'down_fwd_bwd',
    'up, forward + backward': 'up_fwd_bwd',
}
"""Each sampling op's key in ``sampling_products.py``'s rows: ``<key>_ratio``, the median of the per-pair ratios of the
op alternating with PyTorch's, or in files from before those, ``<key>_ms`` over ``reference_<key>_ms``."""
MODEL_NAMES = {
    'ssb_resnetd50': 'D-50',
    'ssb_resnetd101': 'D-101',
    'ssb_resnetd152': 'D-152',
    'ssb_resnetrs152': 'RS-152',
}
"""The short names the pages give the models the speed tables measure."""
OPS_TARGET = 0.5
"""The most time a float32 sampling op may take, as a fraction of PyTorch's path's."""
_NATIVE_FP32 = 'cpu_inference_fp32_*_native.json'
_BLOCK = re.compile(r'(<!-- table:(\w+) -->\n).*?(<!-- /table -->)', re.DOTALL)
_BLOCK_NAMES = re.compile(r'<!-- table:(\w+) -->')


def _load(path: Path) -> Dict:
    return json.loads(path.read_text())


def _commit(payload: Dict) -> str:
    machine = payload['machine']
    dirty = ', dirty tree' if machine.get('git_dirty') else ''
    return f'{(machine.get("git_commit") or "?")[:7]}{dirty}'


def measured_cpus() -> List[str]:
    """The CPU classes with a fp32 inference result for their own build (``cpu_inference_fp32_<cpu>_native.json``),
    those of :data:`CPU_CLASSES` first in its order, then any other, so that no measured class is left out."""
    found = {path.name[len('cpu_inference_fp32_') : -len('_native.json')] for path in RESULTS.glob(_NATIVE_FP32)}
    return [cpu for cpu in CPU_CLASSES if cpu in found] + sorted(found - set(CPU_CLASSES))


def cpu_label(cpu: str) -> str:
    """The CPU a class was measured on, as its result files name it: ``AMD EPYC, AVX-512``."""
    machine = _load(RESULTS / f'cpu_inference_fp32_{cpu}_native.json')['machine']
    processor = re.sub(r'\((R|TM)\)| Processor', '', machine['processor']).strip()
    return f'{processor}, {machine["cpu_isa"]}'


def ratio_cell(path: Path) -> str:
    """The file's SSB / baseline ratios, in the order measured, and its commit; ``–`` where there is no file."""
    if not path.exists():
        return '–'
    payload = _load(path)
    ratios = ' / '.join(f'{row["ratio"]:.2f}' for row in payload['results'])
    return f'{ratios}× ({_commit(payload)})'


def cpu_table() -> str:
    lines = ['| SSB / baseline | ' + ' | '.join(BUILDS.values()) + ' |', '|---|' + '---|' * len(BUILDS)]
    for cpu in measured_cpus():
        name = cpu_label(cpu)
        for setting, label in SETTINGS.items():
            paths = [RESULTS / f'cpu_{setting}_{cpu}_{build}.json' for build in BUILDS]
            if any(path.exists() for path in paths):
                lines.append(f'| {name}: {label} | ' + ' | '.join(ratio_cell(path) for path in paths) + ' |')
        onnx = RESULTS / f'onnx_inference_{cpu}.json'
        if onnx.exists():
            models = ' / '.join(row['model'].removeprefix('ssb_') for row in _load(onnx)['results'])
            lines.append(f'| {name}: onnxruntime fp32 ({models}) | {ratio_cell(onnx)} | |')
    return '\n'.join(lines)


def op_ratio(row: Dict, key: str) -> float:
    """A sampling op's native / PyTorch ratio in a row of ``sampling_products.py`` (see :data:`OPS`)."""
    if f'{key}_ratio' in row:
        return row[f'{key}_ratio']
    return row[f'{key}_ms'] / row[f'reference_{key}_ms']


def ops_table() -> str:
    columns = [(dtype, build) for dtype in ('float32', 'bfloat16') for build in BUILDS]
    header = ' | '.join(f'{dtype}, {build}' for dtype, build in columns)
    lines = [f'| native / PyTorch, layer2 / 3 / 4 | {header} |', '|---|' + '---|' * len(columns)]
    for cpu in measured_cpus():
        payloads = {}
        for dtype, build in columns:
            path = RESULTS / f'cpu_sampling_products_{dtype}_{cpu}_{build}.json'
            payloads[dtype, build] = _load(path) if path.exists() else None
        for op, key in OPS.items():
            cells = [
                ' / '.join(f'{op_ratio(row, key):.2f}' for row in payload['results']) + f' ({_commit(payload)})'
                if payload
                else '–'
                for payload in payloads.values()
            ]
            lines.append(f'| {cpu_label(cpu)}: {op} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def summary_table() -> str:
    """A row per CPU class and build, a column per setting that any of them measured."""
    cpus = measured_cpus()
    settings = [s for s in SETTINGS if any((RESULTS / f'cpu_{s}_{c}_{b}.json').exists() for c in cpus for b in BUILDS)]
    lines = ['| | ' + ' | '.join(SETTINGS[s] for s in settings) + ' |', '|---|' + '---|' * len(settings)]
    for cpu in cpus:
        for build, label in BUILDS.items():
            cells = [ratio_cell(RESULTS / f'cpu_{setting}_{cpu}_{build}.json') for setting in settings]
            lines.append(f'| {cpu_label(cpu)}, {label} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def _figure(value: float, target: float) -> str:
    """``value`` to two decimals, or three where two would print it as its target."""
    return f'{value:.3f}' if f'{value:.2f}' == f'{target:.2f}' else f'{value:.2f}'


def _target_cell(misses: List[str], total: int) -> str:
    if not total:
        return '–'
    met = f'{total - len(misses)} of {total}'
    return f'{met}: {", ".join(misses)}' if misses else met


def model_targets_cell(path: Path, targets: Dict[str, float]) -> str:
    """How many of the file's models meet their ``targets`` (a setting's :data:`~timm_ssb.benchmark.SPEED_TARGETS`),
    and each miss as ``D-50 1.21 (1.25)``."""
    if not path.exists():
        return '–'
    misses, total = [], 0
    for row in _load(path)['results']:
        target = targets.get(row['model'])
        if target is None:
            continue
        total += 1
        if row['ratio'] < target:
            misses.append(f'{MODEL_NAMES[row["model"]]} {_figure(row["ratio"], target)} ({target:g})')
    return _target_cell(misses, total)


def ops_targets_cell(path: Path) -> str:
    """How many of a float32 sampling-products file's cells are at most :data:`OPS_TARGET`, and where some miss, the
    largest and, in files that measured them, the missing cells' floors over PyTorch's time: how many are above the
    target (out of the machine's reach) and the largest of the others (within it)."""
    if not path.exists():
        return '–'
    rows = _load(path)['results']
    ratios = [op_ratio(row, key) for row in rows for key in OPS.values()]
    met = sum(ratio <= OPS_TARGET for ratio in ratios)
    if met == len(ratios):
        return f'{met} of {len(ratios)}'
    cells = [(op_ratio(row, key), row.get(f'{key}_floor_ratio')) for row in rows for key in OPS.values()]
    floors = [floor for ratio, floor in cells if ratio > OPS_TARGET and floor is not None]
    floor = ''
    if floors:
        beyond = sum(f > OPS_TARGET for f in floors)
        within = [f for f in floors if f <= OPS_TARGET]
        parts = [f'{beyond} above {OPS_TARGET:g}'] if beyond else []
        if within:
            parts.append(f'{"the others" if beyond else "all"} at most {max(within):.2f}')
        floor = '; floors of the misses: ' + ', '.join(parts)
    return f'{met} of {len(ratios)} (largest {max(ratios):.2f}{floor})'


def targets_table() -> str:
    settings = [setting for setting in SETTINGS if setting in SPEED_TARGETS]
    columns = [*(SETTINGS[setting] for setting in settings), 'float32 sampling ops', 'onnxruntime fp32']
    lines = ['| cells at their target | ' + ' | '.join(columns) + ' |', '|---|' + '---|' * len(columns)]
    for cpu in measured_cpus():
        for build, label in BUILDS.items():
            cells = [
                model_targets_cell(RESULTS / f'cpu_{setting}_{cpu}_{build}.json', SPEED_TARGETS[setting])
                for setting in settings
            ]
            cells.append(ops_targets_cell(RESULTS / f'cpu_sampling_products_float32_{cpu}_{build}.json'))
            onnx = RESULTS / f'onnx_inference_{cpu}.json'
            cells.append(model_targets_cell(onnx, SPEED_TARGETS['onnx']) if build == 'native' else '')
            lines.append(f'| {cpu_label(cpu)}, {label} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def _mean_std(mean: float, std: float) -> str:
    return f'{mean:.4f} ± {std:.4f}'


def small_digit_table() -> str:
    lines = [
        '| setting (12 × 12 digit, 16 fragments) | adaptive | uniform | bilinear | adaptive − uniform, paired |',
        '|---|---|---|---|---|',
    ]
    for path in sorted(RESULTS.glob('ablation_small_digit*.json')):
        payload = _load(path)
        settings = payload['settings']
        accuracy = {row['sampler']: _mean_std(row['mean'], row['std']) for row in payload['table']}
        paired = next((c for c in payload['paired'] if c['sampler'] == 'adaptive'), None)
        difference = (
            f'{paired["mean_difference"]:+.4f} ± {paired["std_difference"]:.4f} ({paired["wins"]} better, '
            f'{paired["losses"]} worse; p = {paired["p_value"]:.2f})'
            if paired
            else '–'
        )
        sizes = tuple(settings['sizes']) if settings.get('sizes') else (6, 3, 2)
        extra = (
            f', saliency lr × {settings["saliency_lr_scale"]:g}' if settings.get('saliency_lr_scale', 1) != 1 else ''
        )
        label = f'sizes {sizes}{extra}, {len(settings["seeds"])} seeds ({_commit(payload)})'
        cells = [accuracy.get(sampler, '–') for sampler in ('adaptive', 'uniform', 'bilinear')]
        lines.append(f'| {label} | ' + ' | '.join(cells) + f' | {difference} |')
    return '\n'.join(lines)


def warm_start_table() -> str:
    path = RESULTS / 'warm_start_digits.json'
    if not path.exists():
        return '(no result file yet)'
    payload = _load(path)
    curves = {curve['arm']: {p['epoch']: p for p in curve['points']} for curve in payload['curves']}
    epochs = sorted({e for points in curves.values() for e in points if e <= 4} | {8, 15})
    lines = ['| arm | ' + ' | '.join(f'epoch {e}' for e in epochs) + ' |', '|---|' + '---|' * len(epochs)]
    for arm, points in curves.items():
        cells = [_mean_std(points[e]['mean'], points[e]['std']) if e in points else '' for e in epochs]
        lines.append(f'| {arm.replace("_", " ")} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + f'\n\n({len(payload["settings"]["seeds"])} seeds, {_commit(payload)})'


def tables() -> Dict[str, str]:
    return {
        'cpu': cpu_table(),
        'ops': ops_table(),
        'summary': summary_table(),
        'targets': targets_table(),
        'small_digit': small_digit_table(),
        'warm_start': warm_start_table(),
    }


def render(page: str, made: Dict[str, str]) -> str:
    """``page`` with each ``table:NAME`` block holding ``made[NAME]``."""
    return _BLOCK.sub(lambda m: f'{m.group(1)}{made[m.group(2)]}\n{m.group(3)}', page)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument('--write', action='store_true', help='put the tables in the pages')
    mode.add_argument('--check', action='store_true', help='exit 1 where the page differs from the data')
    args = parser.parse_args()
    made = tables()
    if not (args.write or args.check):
        print('\n\n'.join(made.values()))
        return 0
    pages = {page: page.read_text() for page in PAGES}
    found = {name for text in pages.values() for name in _BLOCK_NAMES.findall(text)}
    missing = sorted(set(made) - found)
    if missing:
        print(f'no page has a block for table(s) {", ".join(missing)}', file=sys.stderr)
        return 1
    stale = []
    for page, text in pages.items():
        updated = render(text, made)
        if updated == text:
            continue
        if args.write:
            page.write_text(updated)
        else:
            stale.append(str(page.relative_to(ROOT)))
    if stale:
        print(
            f'{", ".join(stale)} differ from the result files: run python tools/doc_tables.py --write', file=sys.stderr
        )
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
