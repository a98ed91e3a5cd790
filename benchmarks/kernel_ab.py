"""A change to the native resampling kernel, timed against the kernel before it in one process (an A/B).

``resample.cpp`` as committed at a git revision (``--base``, default ``HEAD``) and as in the working tree are each
compiled with the kernel library's flags (:func:`timm_ssb.layers.native.cpu.build.cflags`: ``-march=native``, or
``$TIMM_SSB_CPU_ARCH``, such as ``x86-64-v3`` for the AVX2 build) into a library of its own, its op namespace
renamed (``timm_ssb_ab_base``, ``timm_ssb_ab_new``), cached under ``$TIMM_SSB_CACHE/kernel_ab`` by a hash of the
source and the flags. Then, for each SSB map of a ResNet-D at 224 x 224 (layer2: 512 channels, 28 x 28 sampled to
16 x 16; layer3: 1024, 14 -> 8; layer4: 2048, 7 -> 4), each dtype and each op asked for, the two versions are
called alternately, call by call, so that both meet the machine as it is at that moment; a cell is the new
version's time over the base's, the median of the per-pair ratios (below 1: the change is faster). On a shared
VM the machine's speed moves by more than most changes between processes, and far less between two calls.

The ops (uniform matrices, channels-last maps, the C++ ops called directly):

* ``down``: the map sampled down, ``separable_resample(x, down_y, down_x)``;
* ``up``: the sampled map back up, with the residual (the map) added and the ReLU;
* ``up_into``: the way up as a model's inference runs it: written into the residual (a copy of the map, which it
  overwrites call after call), with the next block's saliency logits computed from each output pixel;
* ``down_fb`` and ``up_fb``: the same with its backward (every gradient: the map's, the matrices', and on the way
  up the residual's), and the map's gradient added into an accumulator, as autograd does for a block's input,
  which it reaches from three uses.

Usage:

    python benchmarks/kernel_ab.py --base HEAD~1 --json benchmarks/results/cpu_kernel_ab_CHANGE_avx512_native.json
"""

import argparse
import hashlib
import logging
import statistics
import subprocess
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

from timm_ssb.benchmark import SAMPLED_MAPS, machine_info, report, require_positive
from timm_ssb.layers import resample, uniform_matrices
from timm_ssb.layers.native import set_sampling_backend
from timm_ssb.layers.native.calibration import interleaved_times
from timm_ssb.layers.native.cpu.build import SOURCES, build_tools, cache_dir, cflags, openmp_flags

ROOT = Path(__file__).resolve().parent.parent
KERNEL = SOURCES[0]  # resample.cpp
OPS = ('down', 'up', 'up_into', 'down_fb', 'up_fb')
VERSIONS = ('base', 'new')


def committed_source(revision: str) -> str:
    """``resample.cpp`` as committed at ``revision``; ``SystemExit`` naming it if git cannot show it."""
    path = KERNEL.relative_to(ROOT).as_posix()
    done = subprocess.run(['git', '-C', str(ROOT), 'show', f'{revision}:{path}'], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f'--base {revision!r}: git cannot show {path} there ({done.stderr.strip()})')
    return done.stdout


def load_version(source: str, version: str):
    """Compiles ``source`` (a ``resample.cpp``) as the library of ``version``, or loads its cached build, and
    returns its ops (``torch.ops.timm_ssb_ab_<version>``)."""
    namespace = f'timm_ssb_ab_{version}'
    renamed = source.replace('TORCH_LIBRARY(timm_ssb_cpu,', f'TORCH_LIBRARY({namespace},')
    if renamed == source:
        raise SystemExit(f'the {version} kernel source registers no TORCH_LIBRARY(timm_ssb_cpu, ...)')
    flags = cflags()
    key = hashlib.sha256('\0'.join((renamed, torch.__version__, *flags)).encode()).hexdigest()[:16]
    directory = cache_dir().parent / 'kernel_ab' / key
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / 'resample.cpp'
    if not path.exists() or path.read_text() != renamed:
        path.write_text(renamed)
    logging.getLogger('torch.utils.cpp_extension').setLevel(logging.ERROR)  # its warning about CUDA_HOME
    from torch.utils.cpp_extension import load

    load(
        name=f'timm_ssb_ab_{key}',
        sources=[str(path)],
        extra_cflags=list(flags),
        extra_ldflags=list(openmp_flags()[1]),
        build_directory=str(directory),
        is_python_module=False,
        verbose=False,
    )
    return getattr(torch.ops, namespace)


def op_calls(ops, op: str, channels: int, side: int, size: int, batch_size: int, dtype: torch.dtype) -> Callable:
    """One call of ``op`` with version ``ops``' kernels, on random data of this map's shape."""
    x = torch.randn(batch_size, channels, side, side).to(dtype).contiguous(memory_format=torch.channels_last)
    down_y, down_x, up_y, up_x = (m.contiguous() for m in uniform_matrices(x, size, 0.5 / size, 0.5 / size))
    z = resample(x, down_y, down_x)
    grad_z, grad_out = torch.randn_like(z), torch.randn_like(x)
    accumulated = torch.zeros_like(x)
    residual = x.clone()
    saliency_weight, saliency_bias = torch.randn(channels) / channels**0.5, torch.zeros(1)

    def down() -> None:
        ops.separable_resample(x, down_y, down_x, None, False)

    def up() -> None:
        ops.separable_resample(z, up_y, up_x, x, True)

    def up_into() -> None:
        ops.separable_resample_into_residual(z, up_y, up_x, residual, True, saliency_weight, saliency_bias)

    def down_fb() -> None:
        ops.separable_resample(x, down_y, down_x, None, False)
        grad_x = ops.separable_resample_backward(grad_z, x, down_y, down_x, None, True, True)[0]
        accumulated.add_(grad_x)

    def up_fb() -> None:
        out = ops.separable_resample(z, up_y, up_x, x, True)
        masked = ops.separable_resample_backward(grad_out, z, up_y, up_x, out, True, True)[3]
        accumulated.add_(masked)

    return {'down': down, 'up': up, 'up_into': up_into, 'down_fb': down_fb, 'up_fb': up_fb}[op]


def ab_row(libraries: Dict[str, Any], stage: str, op: str, dtype: torch.dtype, args: argparse.Namespace) -> dict:
    channels, side, size = next((c, h, s) for name, c, h, s in SAMPLED_MAPS if name == stage)
    calls = {v: op_calls(libraries[v], op, channels, side, size, args.batch_size, dtype) for v in VERSIONS}
    times = interleaved_times(calls, args.repeats, warmup=3)
    return {
        'stage': stage,
        'op': op,
        'dtype': str(dtype).removeprefix('torch.'),
        'base_ms': statistics.median(times['base']),
        'new_ms': statistics.median(times['new']),
        'ratio': statistics.median(n / b for n, b in zip(times['new'], times['base'], strict=True)),
    }


def format_rows(rows: List[dict]) -> str:
    lines = [f'{"op":8} {"dtype":9} {"stage":7} {"base ms":>9} {"new ms":>9} {"new / base":>10}', '-' * 57]
    lines += [
        f'{r["op"]:8} {r["dtype"]:9} {r["stage"]:7} {r["base_ms"]:9.3f} {r["new_ms"]:9.3f} {r["ratio"]:10.3f}'
        for r in rows
    ]
    return '\n'.join(lines)


def comma_list(allowed: tuple, what: str) -> Callable[[str], List[str]]:
    def parse(text: str) -> List[str]:
        items = [item.strip() for item in text.split(',') if item.strip()]
        wrong = [item for item in items if item not in allowed]
        if not items or wrong:
            raise argparse.ArgumentTypeError(f'{what} must be a comma-separated list of {", ".join(allowed)}')
        return items

    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--base', default='HEAD', help='the git revision whose resample.cpp is the base')
    parser.add_argument('--ops', type=comma_list(OPS, '--ops'), default=list(OPS), help=f'default {",".join(OPS)}')
    stages = tuple(name for name, *_ in SAMPLED_MAPS)
    parser.add_argument(
        '--stages', type=comma_list(stages, '--stages'), default=list(stages), help=f'default {",".join(stages)}'
    )
    parser.add_argument(
        '--dtypes',
        type=comma_list(('float32', 'bfloat16'), '--dtypes'),
        default=['float32'],
        help='float32 (the default), bfloat16 or both, comma-separated',
    )
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=60, help='pairs of calls a cell')
    parser.add_argument('--json', default=None, help='write the rows, settings and machine here')
    args = parser.parse_args()
    require_positive(parser, args, 'batch_size', 'threads', 'repeats')
    sources = {'base': committed_source(args.base), 'new': KERNEL.read_text()}
    tools = build_tools()
    if tools['compiler'] is None or tools['ninja'] is None:
        parser.error(f'kernel_ab.py compiles the kernels and needs a C++ compiler and ninja (found: {tools})')
    torch.set_num_threads(args.threads)
    set_sampling_backend('reference')  # the test data's down-sampled map, made without either kernel
    libraries = {version: load_version(sources[version], version) for version in VERSIONS}
    base_commit = subprocess.run(
        ['git', '-C', str(ROOT), 'rev-parse', args.base], capture_output=True, text=True
    ).stdout.strip()
    rows = [
        ab_row(libraries, stage, op, getattr(torch, dtype), args)
        for dtype in args.dtypes
        for op in args.ops
        for stage in args.stages
    ]
    machine = machine_info('cpu')
    header = (
        f'resample.cpp: the working tree (new) against {args.base} ({base_commit[:7]}, base), alternating call by '
        f'call, on cpu ({machine["processor"]}, {machine["cpu_isa"]}, kernels -march={machine["kernel_arch"]}), batch '
        f'{args.batch_size}, channels_last, {args.threads} threads, median of {args.repeats} pairs'
    )
    payload = {
        'settings': {**vars(args), 'base_commit': base_commit},
        'sources_sha256': {v: hashlib.sha256(sources[v].encode()).hexdigest() for v in VERSIONS},
        'machine': machine,
        'results': rows,
    }
    report(f'{header}\n{format_rows(rows)}', args.json, payload)


if __name__ == '__main__':
    main()
