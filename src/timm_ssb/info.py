"""``timm-ssb info`` (or ``python -m timm_ssb.info``): which sampling implementation this machine runs, and why.

Reports the CPU and its vector instruction set, the versions that matter, whether PyTorch puts its CPU tensors on
huge pages, the sampling backend chosen, whether the C++ kernels are built (and where) or why not, whether the
Triton kernels can run, and for each "no" the one-line fix. With ``--check``, a short self-test: every
implementation that can run here against the PyTorch reference on a small map, and the native CPU resampling timed
against PyTorch's products on a layer2-sized map per dtype and mode -- what the backend ``'auto'`` then uses. It
builds the C++ kernels if they are not yet built, whatever the backend (also ``'reference'``, which itself never
compiles anything): it reports whether they can be. Exits 1 where the backend forced by
``TIMM_SSB_SAMPLING_BACKEND`` cannot run here or a self-test fails.
"""

import argparse
import importlib.metadata
import json
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import timm
import torch

from .layers import adaptive_matrices, resample_reference
from .layers.native import (
    cpu_arch,
    cpu_library,
    get_sampling_backend,
    separable_resample,
    separable_resample_triton,
    set_sampling_backend,
    triton_kernels,
)
from .layers.native.calibration import CALIBRATION_SHAPE, calibrate, chooses_native, forget_calibration
from .layers.native.cpu import build
from .layers.native.cpu.features import cpu_flags, cpu_name, vector_isa
from .layers.samplers import DEFAULT_SIGMA_G
from .version import __version__

__all__ = ['collect', 'format_report', 'main']

ISA_FLAGS = ('sse4_2', 'avx', 'avx2', 'fma', 'avx512f', 'avx512_bf16', 'amx_tile', 'amx_bf16', 'asimd', 'sve')
"""The instruction-set flags that matter to the kernels or to PyTorch's own CPU speed, as ``/proc/cpuinfo``
names them."""

MODES = ((torch.float32, False), (torch.float32, True), (torch.bfloat16, False), (torch.bfloat16, True))

THP_SETTING = Path('/sys/kernel/mm/transparent_hugepage/enabled')
"""Linux's transparent huge pages setting: ``always``, ``madvise`` (where a program asks, as PyTorch's allocator
does with ``THP_MEM_ALLOC_ENABLE=1``) or ``never``, the one in brackets chosen."""


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _mode_name(dtype: torch.dtype, training: bool) -> str:
    return f'{str(dtype).removeprefix("torch.")} {"training" if training else "inference"}'


def collect(check: bool = False) -> Dict[str, Any]:
    """Everything ``timm-ssb info`` reports, as data; ``check`` adds the self-test (and may take seconds)."""
    flags = cpu_flags()
    backend = get_sampling_backend()
    report: Dict[str, Any] = {
        'machine': {
            'cpu': cpu_name(),
            'isa': vector_isa(flags),
            'flags': [flag for flag in ISA_FLAGS if flag in flags],
            'machine': platform.machine(),
            'cores': os.cpu_count(),
            'torch_threads': torch.get_num_threads(),
        },
        'versions': {
            'python': platform.python_version(),
            'torch': torch.__version__,
            'timm': timm.__version__,
            'timm_ssb': __version__,
            'triton': _version('triton'),
            'ninja': _version('ninja'),
        },
        'huge_pages': huge_pages(),
        'backend': {
            'chosen': backend,
            'set_by': 'TIMM_SSB_SAMPLING_BACKEND' if 'TIMM_SSB_SAMPLING_BACKEND' in os.environ else 'default',
        },
        'cpu_kernels': _cpu_kernels(check),
        'triton': _triton(),
    }
    problems = []
    if backend == 'native' and not report['cpu_kernels']['built']:
        problems.append('TIMM_SSB_SAMPLING_BACKEND=native, but the C++ kernels are not built')
    if backend == 'triton' and not report['triton']['runs']:
        problems.append('TIMM_SSB_SAMPLING_BACKEND=triton, but the Triton kernels cannot run here')
    if check:
        report['self_test'] = _self_test(report)
        failed = [row['implementation'] for row in report['self_test'] if not row['ok']]
        problems += [f'{name} differs from the reference' for name in failed]
    report['problems'] = problems
    return report


def huge_pages() -> Dict[str, Optional[str]]:
    """``THP_MEM_ALLOC_ENABLE`` as set (``None``: unset), with which PyTorch's CPU allocator puts tensors of 2 MB or
    more on transparent huge pages, and the kernel's choice in :data:`THP_SETTING` (``None`` where there is none, as
    off Linux). With both, a fresh large tensor faults in a page per 2 MB instead of per 4 KB: fp32 inference ran faster
    for SSB and its baseline alike, SSB more so (docs/usage.md)."""
    try:
        chosen = re.search(r'\[(\w+)\]', THP_SETTING.read_text())
    except OSError:
        chosen = None
    return {'thp_mem_alloc_enable': os.environ.get('THP_MEM_ALLOC_ENABLE'), 'kernel': chosen and chosen.group(1)}


def _huge_pages_line(pages: Dict[str, Optional[str]]) -> str:
    kernel, variable = pages['kernel'], pages['thp_mem_alloc_enable']
    if kernel in (None, 'never'):
        return f"huge pages for torch's CPU tensors: no (the kernel's transparent huge pages: {kernel or 'none'})"
    setting = 'THP_MEM_ALLOC_ENABLE unset' if variable is None else f'THP_MEM_ALLOC_ENABLE={variable}'
    where = f"{setting}; the kernel's transparent huge pages: {kernel}"
    if variable == '1':
        return f"huge pages for torch's CPU tensors: yes ({where})"
    return (
        f"huge pages for torch's CPU tensors: no ({where}) -- tip: THP_MEM_ALLOC_ENABLE=1 in the environment, "
        'fewer page faults and faster CPU inference (docs/usage.md)'
    )


def _cpu_kernels(check: bool) -> Dict[str, Any]:
    tools = build.build_tools()
    built = cpu_library()
    error = cpu_library.error
    try:
        arch, arch_flags, cache = cpu_arch(), list(build.arch_flags()), str(build.cache_dir())
    except ValueError:  # a bad TIMM_SSB_CPU_ARCH: the build's error names it
        arch, arch_flags, cache = os.environ.get(build.CPU_ARCH_ENV), [], None
    fix = None
    if not built:
        if cache is None:
            fix = f'unset {build.CPU_ARCH_ENV} or set it to a -march value such as native or x86-64-v3'
        elif tools['compiler'] is None:
            fix = build.COMPILER_HINT
        elif tools['ninja'] is None:
            fix = 'pip install ninja'
        else:
            fix = f'see the error; the build folder is {cache}'
    info: Dict[str, Any] = {
        'compiler': tools['compiler'],
        'ninja': tools['ninja'],
        'arch': arch,
        'arch_flags': arch_flags,
        'openmp_flags': {'compile': list(build.openmp_flags()[0]), 'link': list(build.openmp_flags()[1])},
        'cache': cache,
        'built': built,
        'error': error,
        'fix': fix,
        'faster_than_pytorch': {},
    }
    if built and check:
        for dtype, training in MODES:
            entry = calibrate(dtype, training)
            info['faster_than_pytorch'][_mode_name(dtype, training)] = entry
    return info


def _triton() -> Dict[str, Any]:
    interpreter = os.environ.get('TRITON_INTERPRET') == '1'
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    info: Dict[str, Any] = {'cuda_device': cuda, 'interpreter': interpreter, 'runs': False}
    info.update(why_not=None, fix=None)
    if _version('triton') is None:
        info.update(why_not='Triton is not installed', fix='pip install triton (it comes with the CUDA build of torch)')
    elif not triton_kernels():
        info.update(why_not=f'the kernels did not load: {triton_kernels.error}', fix='reinstall torch with its Triton')
    elif cuda is None and not interpreter:
        info.update(
            why_not='no CUDA GPU; on the CPU the C++ kernels serve',
            fix='none needed (TRITON_INTERPRET=1 runs them on CPU tensors, slowly, for testing)',
        )
    else:
        info['runs'] = True
    return info


def _self_test(report: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Each implementation that can run here against the float64 reference on a small map, the way down and the
    way back up with a residual and a ReLU."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 24, 20, 18, generator=generator).contiguous(memory_format=torch.channels_last)
    logits = torch.randn(2, 1, 20, 18, generator=generator) * 2.0
    saved = get_sampling_backend()
    set_sampling_backend('reference')
    try:
        down_y, down_x, up_y, up_x = adaptive_matrices(logits, 7, DEFAULT_SIGMA_G, 0.5 / 7, 0.5 / 7)
    finally:
        set_sampling_backend(saved)
    z = resample_reference(x.double(), down_y.double(), down_x.double())
    expected = (z, torch.relu(x.double() + resample_reference(z, up_y.double(), up_x.double())))
    implementations = []
    if report['cpu_kernels']['built']:
        implementations.append(('C++ (CPU)', separable_resample, 'cpu'))
    if report['triton']['runs']:
        device = 'cuda' if report['triton']['cuda_device'] else 'cpu'
        where = 'GPU' if device == 'cuda' else 'interpreter'
        implementations.append((f'Triton ({where})', separable_resample_triton, device))
    rows = []
    for name, op, device in implementations:
        args = [t.to(device) for t in (x, down_y, down_x, z.float(), up_y, up_x)]
        with torch.no_grad():
            got = (
                op(args[0], args[1].contiguous(), args[2].contiguous(), None, False),
                op(
                    args[3].contiguous(memory_format=torch.channels_last),
                    args[4].contiguous(),
                    args[5].contiguous(),
                    args[0],
                    True,
                ),
            )
        pairs = zip(got, expected, strict=True)
        error = max(float((g.double().cpu() - e).abs().max() / e.abs().max()) for g, e in pairs)
        rows.append({'implementation': name, 'max_relative_error': error, 'ok': error < 1e-5})
    return rows


def _yes_no(value: Any, fix: Optional[str] = None) -> str:
    if value:
        return 'yes' if value is True else str(value)
    return f'no -- fix: {fix}' if fix else 'no'


def format_report(report: Dict[str, Any]) -> str:
    """The report as text, a fact a line."""
    machine, versions, backend = report['machine'], report['versions'], report['backend']
    cpu, triton = report['cpu_kernels'], report['triton']
    target = ' '.join(cpu['arch_flags']) or "the compiler's default target"
    if cpu['cache'] is None:
        target = f'nothing ({build.CPU_ARCH_ENV}={cpu["arch"]!r} is not a -march value)'
    openmp = {step: ' '.join(flags) for step, flags in cpu['openmp_flags'].items()}
    lines = [
        f'cpu: {machine["cpu"]} ({machine["machine"]}, {machine["cores"]} cores, '
        f'torch threads {machine["torch_threads"]})',
        f'vector isa: {machine["isa"]} (flags: {" ".join(machine["flags"]) or "unknown"})',
        'versions: ' + ', '.join(f'{k} {v or "not installed"}' for k, v in versions.items()),
        _huge_pages_line(report['huge_pages']),
        f'sampling backend: {backend["chosen"]} (set by {backend["set_by"]})',
        '',
        'C++ kernels (CPU):',
        f'  compiler: {_yes_no(cpu["compiler"], build.COMPILER_HINT)}',
        f'  ninja: {_yes_no(cpu["ninja"], "pip install ninja")}',
        f'  built for: {target}',
        f"  OpenMP, torch's runtime: {openmp['compile'] or 'none'} (link: {openmp['link'] or 'none'})",
        f'  cache: {cpu["cache"] or "none"}',
        f'  built and loaded: {_yes_no(cpu["built"], cpu["fix"])}' + (f' ({cpu["error"]})' if cpu['error'] else ''),
    ]
    if cpu['faster_than_pytorch']:
        batch, channels, side, size = CALIBRATION_SHAPE
        lines.append(f'  native vs PyTorch products, ms ({batch}x{channels}x{side}x{side} -> {size}x{size} and back):')
        for mode, entry in cpu['faster_than_pytorch'].items():
            for way in ('down', 'up'):
                native, reference = entry[f'{way}_native_ms'], entry[f'{way}_reference_ms']
                lines.append(
                    f'    {mode}, {way}: {native:.2f} vs {reference:.2f} ({reference / native:.2f}x): auto uses '
                    + ('native' if chooses_native(native / reference) else 'PyTorch')
                )
    elif cpu['built']:
        lines.append(
            '  auto uses it where it measures clearly faster than PyTorch (timed at first use; --check shows it)'
        )
    lines += [
        '',
        'Triton kernels:',
        f'  cuda device: {triton["cuda_device"] or "none"}',
        f'  interpreter (TRITON_INTERPRET=1): {_yes_no(triton["interpreter"])}',
        '  can run: ' + ('yes' if triton['runs'] else f'no ({triton["why_not"]}) -- fix: {triton["fix"]}'),
    ]
    if 'self_test' in report:
        lines += ['', 'self-test against the float64 reference (2x24x20x18 -> 7x7 and back):']
        lines += [
            f'  {row["implementation"]}: max relative error {row["max_relative_error"]:.1e} '
            + ('ok' if row['ok'] else 'FAILED')
            for row in report['self_test']
        ] or ['  no native implementation can run here']
    lines += [''] + [f'problem: {problem}' for problem in report['problems']] if report['problems'] else []
    return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='timm-ssb info', description=__doc__.split('\n')[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--check', action='store_true', help='test each implementation and time native vs PyTorch')
    parser.add_argument(
        '--recalibrate', action='store_true', help="with --check: forget this build's kept timings, measure again"
    )
    parser.add_argument('--json', action='store_true', help='print the report as JSON')


def run(args: argparse.Namespace) -> int:
    if args.recalibrate and not args.check:
        raise SystemExit('timm-ssb info: --recalibrate needs --check')
    if args.recalibrate and cpu_library():
        forget_calibration()
    report = collect(check=args.check)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 1 if report['problems'] else 0


if __name__ == '__main__':
    sys.exit(main())
