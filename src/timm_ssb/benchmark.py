"""Throughput of SSB models against their timm baselines, measured in the same process.

Each SSB model and its baseline are built with the same settings, checked to run, then timed in
interleaved rounds (SSB, baseline, SSB, baseline, ...) so that machine noise hits both alike. The
reported ratio is the median over rounds of (SSB throughput / baseline throughput).

Memory: on CUDA the peak allocated memory of one step; on the CPU, which has no allocator
statistics, the bytes of tensors saved for backward in one training step (the activation memory
that dominates training memory), and nothing for inference.
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn

from .complexity import count_gmacs, count_params
from .layers.native import cpu_arch, get_sampling_backend
from .layers.native.cpu.features import cpu_model, cpu_name, vector_isa
from .models import BASELINES
from .version import __version__

try:
    import resource
except ImportError:  # not on Windows
    resource = None

__all__ = [
    'BenchSettings',
    'BenchResult',
    'benchmark_pair',
    'run_benchmark',
    'machine_info',
    'run_record',
    'report',
    'write_json',
    'format_table',
    'SPEED_TARGETS',
    'round_spread',
    'stage_times',
    'model_parts',
]


@dataclass
class BenchSettings:
    """What is measured; all of it goes into the JSON next to the numbers."""

    device: str = 'cpu'
    batch_size: int = 16
    img_size: int = 224
    train: bool = False
    compile: bool = False
    channels_last: bool = True
    amp_dtype: Optional[str] = None
    threads: Optional[int] = None
    rounds: int = 7
    iters: int = 2
    warmup: int = 2
    stages: bool = False
    model_kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class BenchResult:
    """One SSB model against its baseline."""

    model: str
    baseline: str
    params_m: float
    baseline_params_m: float
    gmacs: float
    baseline_gmacs: float
    throughput: float
    baseline_throughput: float
    ratio: float
    ratio_rounds: List[float]
    memory_mb: Optional[float]
    baseline_memory_mb: Optional[float]
    memory_kind: str
    stages_ms: Optional[Dict[str, float]] = None
    baseline_stages_ms: Optional[Dict[str, float]] = None
    page_faults: Optional[float] = None
    """Minor page faults per step (host memory touched for the first time), median over rounds."""
    baseline_page_faults: Optional[float] = None

    @property
    def gmacs_ratio(self) -> float:
        return self.baseline_gmacs / self.gmacs


def run_record() -> Dict[str, Any]:
    """The code and the command a result was made with: the git commit of this package's checkout (``None``
    outside one), whether tracked files other than the committed results (``benchmarks/results``, which a
    run rewrites) differed from it, and the command line as typed."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> Optional[str]:
        try:
            done = subprocess.run(['git', '-C', str(root), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git('rev-parse', 'HEAD')
    status = git('status', '--porcelain', '--untracked-files=no', '--', '.', ':(exclude)benchmarks/results')
    status = status if commit else None
    program = sys.argv[0]
    if program.endswith('.py'):
        head = ['python', os.path.relpath(program, root) if os.path.isabs(program) else program]
    else:
        head = [os.path.basename(program)]
    command = shlex.join(head + sys.argv[1:])
    return {'git_commit': commit, 'git_dirty': bool(status) if commit else None, 'command': command}


def machine_info(device: str) -> Dict[str, Any]:
    """Machine, versions and thread settings, and the commit and command (:func:`run_record`), for reproducibility."""
    info: Dict[str, Any] = {
        **run_record(),
        'platform': platform.platform(),
        'python': platform.python_version(),
        'processor': cpu_name(),
        'cpu_model': cpu_model(),
        'cpu_isa': vector_isa(),
        'kernel_arch': cpu_arch(),
        'cpu_count': os.cpu_count(),
        'torch_threads': torch.get_num_threads(),
        'torch': torch.__version__,
        'timm': timm.__version__,
        'timm_ssb': __version__,
        'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'allocator_env': allocator_env(),
        'sampling_backend': get_sampling_backend(),
    }
    if device.startswith('cuda') and torch.cuda.is_available():
        info['gpu'] = torch.cuda.get_device_name(device)
        info['cuda'] = torch.version.cuda
    return info


ALLOCATOR_VARIABLES = ('LD_PRELOAD', 'GLIBC_TUNABLES', 'THP_MEM_ALLOC_ENABLE')
"""Besides glibc's ``MALLOC_*`` tunables, the environment :func:`allocator_env` records: a preloaded allocator,
glibc's tunables, and PyTorch's own switch to transparent huge pages for its CPU tensors."""


def allocator_env() -> Dict[str, str]:
    """Environment that changes host memory allocation (glibc ``MALLOC_*`` tunables, a preloaded allocator,
    PyTorch's ``THP_MEM_ALLOC_ENABLE``).

    On CPU it matters: with glibc's defaults, large freed tensors go back to the OS and the next ones
    page-fault on first touch, which costs both models of a pair time in proportion to the memory they
    allocate, not to their arithmetic.
    """
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith('MALLOC_') or k in ALLOCATOR_VARIABLES}


def _synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _make_step(model: nn.Module, settings: BenchSettings, x: torch.Tensor) -> Callable[[], None]:
    device = x.device
    amp_dtype = getattr(torch, settings.amp_dtype) if settings.amp_dtype else None
    run = torch.compile(model) if settings.compile else model

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    if not settings.train:
        model.eval()

        def infer() -> None:
            with torch.inference_mode(), autocast():
                run(x)

        return infer

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    target = torch.randint(0, 1000, (x.shape[0],), device=device)
    loss_fn = nn.CrossEntropyLoss()

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn(run(x), target)
        loss.backward()
        optimizer.step()

    return train_step


def _saved_tensor_mb(step: Callable[[], None]) -> float:
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values()) / 2**20


def _memory_mb(step: Callable[[], None], settings: BenchSettings, device: torch.device) -> Optional[float]:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    if settings.train:
        return _saved_tensor_mb(step)
    return None


def _time(step: Callable[[], None], iters: int, device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _synchronize(device)
    return time.perf_counter() - start


SPEED_TARGETS = {
    'inference_fp32': {'ssb_resnetd50': 1.25, 'ssb_resnetd101': 1.5, 'ssb_resnetd152': 1.65, 'ssb_resnetrs152': 1.65},
    'train_fp32': {'ssb_resnetd50': 1.2, 'ssb_resnetd101': 1.4, 'ssb_resnetd152': 1.5, 'ssb_resnetrs152': 1.5},
    'inference_bf16': {'ssb_resnetd50': 1.2, 'ssb_resnetd101': 1.4, 'ssb_resnetd152': 1.5, 'ssb_resnetrs152': 1.5},
    'onnx': {'ssb_resnetd50': 1.2, 'ssb_resnetd152': 1.5},
}
"""The CPU speed targets (issue #22): the least SSB / baseline throughput ratio each model should reach, per setting
(CPU fp32 inference and training step, bf16 autocast inference, ONNX Runtime fp32 inference)."""

MODEL_PARTS = ('stem', 'layer1', 'layer2', 'layer3', 'layer4', 'head')
"""The parts of a timm ResNet that ``--stages`` times, in forward order."""

SAMPLED_MAPS = (('layer2', 512, 28, 16), ('layer3', 1024, 14, 8), ('layer4', 2048, 7, 4))
"""``(stage, channels, map side, sampled side)`` of a ResNet-D's SSB blocks at 224 x 224 with the default sizes:
the maps the sampling benchmarks time."""


def median_ms(fn: Callable[[], object], repeats: int, device: str = 'cpu') -> float:
    """Median of ``repeats`` timings of ``fn`` in ms after three warm-up calls: wall clock on the CPU, CUDA events
    on a GPU."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.startswith('cuda'):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start_s) * 1e3)
    return statistics.median(times)


def model_parts(model: nn.Module, blocks: bool = False) -> List[Tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
    """``(name, callable)`` in forward order for a timm ResNet: ``stem``, ``layer1``-``layer4`` (or, with
    ``blocks``, each of their blocks as ``layerN.i``) and ``head``."""
    stem = nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool)
    parts: List[Tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = [('stem', stem)]
    for layer in MODEL_PARTS[1:-1]:
        stage = getattr(model, layer)
        parts += [(f'{layer}.{i}', block) for i, block in enumerate(stage)] if blocks else [(layer, stage)]
    return parts + [('head', model.forward_head)]


def stage_times(
    model: nn.Module,
    x: torch.Tensor,
    rounds: int = 5,
    amp_dtype: Optional[torch.dtype] = None,
    compile: bool = False,
) -> Dict[str, float]:
    """Median inference milliseconds of each part of a timm ResNet: stem, layer1-4, head.

    Shows where time goes: the stem and layer1 are identical in an SSB model and its baseline, so
    they bound how much faster the SSB model can be, whatever its GMACs. Under autocast to ``amp_dtype`` if
    given; with ``compile``, each part compiled on its own (``torch.compile``; inductor then cannot fuse across
    the parts' boundaries, as it can in a whole compiled model), the first round, which compiles, discarded.
    """
    parts = [(name, torch.compile(part) if compile else part) for name, part in model_parts(model)]
    times: Dict[str, List[float]] = {p: [] for p, _ in parts}
    model.eval()
    autocast = torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    with torch.inference_mode(), autocast:
        for _ in range(rounds + 1):
            t = x
            for name, part in parts:
                _synchronize(x.device)
                start = time.perf_counter()
                t = part(t)
                _synchronize(x.device)
                times[name].append(time.perf_counter() - start)
    return {p: statistics.median(v[1:]) * 1e3 for p, v in times.items()}


def _build(name: str, settings: BenchSettings, device: torch.device, **kwargs: Any) -> nn.Module:
    model = timm.create_model(name, **kwargs).to(device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def benchmark_pair(name: str, settings: BenchSettings, baseline: Optional[str] = None) -> BenchResult:
    """Measure SSB model ``name`` against ``baseline`` (default: its timm baseline)."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    baseline = baseline or BASELINES[name]
    device = torch.device(settings.device)
    x = torch.randn(settings.batch_size, 3, settings.img_size, settings.img_size, device=device)
    if settings.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    models = {
        name: _build(name, settings, device, **settings.model_kwargs),
        baseline: _build(baseline, settings, device),
    }
    input_size = (3, settings.img_size, settings.img_size)
    gmacs = {n: count_gmacs(m, input_size) for n, m in models.items()}
    params = {n: count_params(m) / 1e6 for n, m in models.items()}
    for n, m in models.items():
        with torch.no_grad():
            out = m.eval()(x[:2])
        if out.shape != (min(2, len(x)), m.num_classes) or not torch.isfinite(out).all():
            raise RuntimeError(f'{n} gave {tuple(out.shape)} or non-finite values on a {tuple(x.shape[1:])} input')

    steps = {n: _make_step(m, settings, x) for n, m in models.items()}
    for step in steps.values():
        for _ in range(settings.warmup):
            step()
    memory = {n: _memory_mb(step, settings, device) for n, step in steps.items()}

    throughput: Dict[str, List[float]] = {n: [] for n in models}
    faults: Dict[str, List[float]] = {n: [] for n in models}
    for _ in range(settings.rounds):
        for n, step in steps.items():
            before = _minor_page_faults()
            throughput[n].append(settings.iters * settings.batch_size / _time(step, settings.iters, device))
            after = _minor_page_faults()
            if before is not None and after is not None:
                faults[n].append((after - before) / settings.iters)
    ratios = [a / b for a, b in zip(throughput[name], throughput[baseline], strict=True)]
    amp_dtype = getattr(torch, settings.amp_dtype) if settings.amp_dtype else None
    stages = {}
    if settings.stages:
        stages = {n: stage_times(m, x, settings.rounds, amp_dtype, settings.compile) for n, m in models.items()}
    return BenchResult(
        model=name,
        baseline=baseline,
        params_m=params[name],
        baseline_params_m=params[baseline],
        gmacs=gmacs[name],
        baseline_gmacs=gmacs[baseline],
        throughput=statistics.median(throughput[name]),
        baseline_throughput=statistics.median(throughput[baseline]),
        ratio=statistics.median(ratios),
        ratio_rounds=ratios,
        memory_mb=memory[name],
        baseline_memory_mb=memory[baseline],
        memory_kind=_memory_kind(settings, device),
        stages_ms=stages.get(name),
        baseline_stages_ms=stages.get(baseline),
        page_faults=statistics.median(faults[name]) if faults[name] else None,
        baseline_page_faults=statistics.median(faults[baseline]) if faults[baseline] else None,
    )


def _minor_page_faults() -> Optional[int]:
    """This process's minor page faults so far (``None`` where ``resource`` is missing, e.g. Windows)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else None


def _memory_kind(settings: BenchSettings, device: torch.device) -> str:
    if device.type == 'cuda':
        return 'peak allocated (MB)'
    return 'saved for backward (MB)' if settings.train else 'not measured on CPU'


def round_spread(ratios: Dict[str, Sequence[float]]) -> str:
    """A line under a table: each model's lowest and highest per-round ratio (SSB / baseline), whose median the table
    gives."""
    return "each round's SSB / baseline, lowest-highest: " + ', '.join(
        f'{model} {min(rounds):.2f}-{max(rounds):.2f}' for model, rounds in ratios.items()
    )


def format_table(results: Sequence[BenchResult], settings: BenchSettings, machine: Dict[str, Any]) -> str:
    """The results as a plain-text table with the settings and machine above it."""
    mode = 'training step' if settings.train else 'inference'
    lines = [
        f'{mode} on {settings.device} ({machine.get("gpu") or machine["processor"]}), batch {settings.batch_size}, '
        f'{settings.img_size}x{settings.img_size}, {"channels_last" if settings.channels_last else "NCHW"}, '
        f'{settings.amp_dtype or "fp32"}{" autocast" if settings.amp_dtype else ""}, '
        f'{"torch.compile" if settings.compile else "eager"}, {machine["torch_threads"]} threads; '
        f'torch {machine["torch"]}, timm {machine["timm"]}, timm-ssb {machine["timm_ssb"]}',
        f'median of {settings.rounds} interleaved rounds of {settings.iters} steps'
        + (f'; model kwargs {settings.model_kwargs}' if settings.model_kwargs else ''),
    ]
    if settings.device == 'cpu':
        env = machine.get('allocator_env') or {}
        lines.append(
            'allocator: '
            + (' '.join(f'{k}={v}' for k, v in env.items()) or 'glibc malloc defaults')
            + f'; sampling backend: {machine.get("sampling_backend", "auto")}'
        )
    header = (
        f'{"model":<16} {"baseline":<12} {"params M":>9} {"GMACs":>7} {"base":>7} {"GMACs x":>8} '
        f'{"img/s":>8} {"base":>8} {"speed x":>8} {"memory MB":>10} {"base":>8}'
    )
    lines += [header, '-' * len(header)]
    for r in results:
        mem = '-' if r.memory_mb is None else f'{r.memory_mb:.0f}'
        base_mem = '-' if r.baseline_memory_mb is None else f'{r.baseline_memory_mb:.0f}'
        lines.append(
            f'{r.model:<16} {r.baseline:<12} {r.params_m:>9.2f} {r.gmacs:>7.3f} {r.baseline_gmacs:>7.3f} '
            f'{r.gmacs_ratio:>7.2f}x {r.throughput:>8.2f} {r.baseline_throughput:>8.2f} {r.ratio:>7.2f}x '
            f'{mem:>10} {base_mem:>8}'
        )
    lines.append(f'memory: {results[0].memory_kind}' if results else 'no models')
    if results:
        lines.append(round_spread({r.model: r.ratio_rounds for r in results}))
    if settings.device == 'cpu' and any(r.page_faults is not None for r in results):
        lines.append(
            'minor page faults per step, SSB / baseline: '
            + ', '.join(f'{r.model} {r.page_faults:.0f} / {r.baseline_page_faults:.0f}' for r in results)
        )
    if settings.stages:
        each = ', each part compiled on its own' if settings.compile else ''
        lines.append(f'inference ms per part (SSB / baseline{each}):')
        lines.append(f'{"model":<16} ' + ' '.join(f'{p:>15}' for p in MODEL_PARTS))
        for r in results:
            cells = [f'{r.stages_ms[p]:.1f} / {r.baseline_stages_ms[p]:.1f}' for p in MODEL_PARTS]
            lines.append(f'{r.model:<16} ' + ' '.join(f'{c:>15}' for c in cells))
    return '\n'.join(lines)


def run_benchmark(models: Sequence[str], settings: BenchSettings, json_path: Optional[str] = None) -> List[BenchResult]:
    """Benchmark each model against its baseline, print the table and optionally write JSON."""
    results = []
    for name in models:
        results.append(benchmark_pair(name, settings))
    machine = machine_info(settings.device)
    payload = {
        'settings': asdict(settings),
        'machine': machine,
        'results': [dict(asdict(r), gmacs_ratio=r.gmacs_ratio) for r in results],
    }
    report(format_table(results, settings, machine), json_path, payload)
    return results


def require_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, *dests: str) -> None:
    """``parser.error`` (exit 2, naming the option) for the first of ``dests`` whose value is not positive: the
    benchmarks' check of their counts and sizes."""
    for dest in dests:
        if getattr(args, dest) <= 0:
            parser.error(f'--{dest.replace("_", "-")} must be positive')


def report(text: str, json_path: Optional[str], payload: Dict[str, Any]) -> None:
    """Print a benchmark's table and write ``payload`` as JSON to ``json_path`` if given: how every benchmark here
    ends."""
    print(text, flush=True)
    if json_path:
        write_json(json_path, payload)


def write_json(path: str, payload: Dict[str, Any]) -> None:
    """Write a benchmark's results as indented JSON (making the folder), as every benchmark here does."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, 'w') as f:
        json.dump(payload, f, indent=2)
        f.write('\n')
