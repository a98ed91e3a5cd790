"""SSB models against their baselines exported to ONNX and run in onnxruntime on the CPU, in one process.

Each model is exported (``torch.onnx.export``; the sampling takes its PyTorch path, standard ops only) with a live
adaptive sampler (random saliency convs, so the samples move), run in an onnxruntime CPU session (intra-op threads
as given, all graph optimisations), and timed in interleaved rounds against its baseline; the ratio is the median
over rounds of SSB throughput / baseline throughput. Also counts the exported graph's nodes and, with ``--profile``,
adds up onnxruntime's kernel time per operator type over a few more runs of each model (where an SSB model's time
goes: its convolutions, the resampling's ``MatMul``s, the matrices' many small ops). With ``--sampling-floor`` each
SSB model is also timed (in the same rounds) with its resampling at the memory-traffic floor that standard ops allow
(:class:`MemoryFloorSampler`): the ratio it would reach if the resampling cost only that, with the saliency and the
matrices free. With ``--matrices-free`` it is also timed with the uniform sampler in place of the adaptive one (the
same resampling products; no saliency, and matrices that do not depend on the input, which onnxruntime folds into
constants): the ratio the model would reach if the saliency and the matrices cost nothing, the rest as it is.

Usage:

    python benchmarks/onnx_inference.py --json benchmarks/results/onnx_inference_<cpu>.json
"""

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
import onnxruntime
import timm
import torch
from torch import nn

from timm_ssb import SSBBottleneck  # importing timm_ssb registers the models
from timm_ssb.benchmark import machine_info, report, require_positive, round_spread
from timm_ssb.models import baseline_of


def with_live_saliency(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random saliency convs (timm-ssb initialises them to zero: uniform sampling), so the samples move."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d) and name.endswith('saliency'):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 2.0 / fan_in**0.5)
    return model


class MemoryFloorSampler(nn.Module):
    """An SSB block's sampler at the least memory traffic of its resampling in standard ops, for timing only: down,
    one read of the map (its mean, broadcast to the ``size x size`` map the residual branch runs on: ``ReduceMean``,
    ``Expand``); up, the small map's mean added to the residual by broadcasting, then the ReLU, as the model's own
    graph adds and rectifies: the residual read and the output written once, what a way up fused with the add must
    do. No saliency conv, no matrices. The branch computes on constant maps: the values mean nothing, the convs'
    cost is the model's. (A nearest ``Resize`` up in place of the broadcast took onnxruntime longer than the
    model's own products.)"""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        return x.mean((2, 3), keepdim=True).expand(-1, -1, self.size, self.size), []

    def inverse_residual(
        self, y: torch.Tensor, state: List[torch.Tensor], residual: torch.Tensor, relu: bool
    ) -> torch.Tensor:
        out = residual + y.mean((2, 3), keepdim=True)
        return torch.relu(out) if relu else out


def with_sampling_floor(model: nn.Module) -> nn.Module:
    """``model`` with every SSB block's sampler a :class:`MemoryFloorSampler` of its size."""
    for module in model.modules():
        if isinstance(module, SSBBottleneck):
            module.sampler = MemoryFloorSampler(module.sampler.size)
    return model


VARIANTS = {
    'floor': 'sampling floor',
    'uniform': 'matrices free',
}
"""The SSB model's variants timed beside it: ``export``'s ``variant`` and the label each has in the rows."""


def export(name: str, batch_size: int, img_size: int, dynamo: bool, folder: Path, variant: str = '') -> Path:
    """``name`` exported to ``folder``, live; ``variant`` (:data:`VARIANTS`): ``floor`` with every sampler a
    :class:`MemoryFloorSampler`, ``uniform`` built with the uniform sampler."""
    if variant and variant not in VARIANTS:
        raise ValueError(f'variant must be one of {", ".join(repr(v) for v in VARIANTS)} or empty; got {variant!r}')
    kwargs = {'ssb_sampler': 'uniform'} if variant == 'uniform' else {}
    model = with_live_saliency(timm.create_model(name, **kwargs).eval())
    if variant == 'floor':
        model = with_sampling_floor(model)
    x = torch.randn(batch_size, 3, img_size, img_size)
    path = folder / f'{name}{"_" + variant if variant else ""}.onnx'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo, input_names=['x'], output_names=['logits'])
    return path


def session(path: Path, threads: int) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])


def operator_times(path: Path, threads: int, x: np.ndarray, runs: int) -> Dict[str, float]:
    """onnxruntime's kernel time per operator type, ms per run, largest first."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(''))
    profiled = onnxruntime.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
    for _ in range(runs):
        profiled.run(None, {'x': x})
    events = json.loads(Path(profiled.end_profiling()).read_text())
    totals: Dict[str, float] = {}
    for event in events:
        if event.get('cat') == 'Node' and event['name'].endswith('_kernel_time'):
            op = event['args']['op_name']
            totals[op] = totals.get(op, 0.0) + event['dur'] / 1e3 / runs
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def pair_row(name: str, args: argparse.Namespace, folder: Path) -> Dict[str, object]:
    baseline = baseline_of(name)
    dynamo = args.exporter == 'dynamo'
    paths = {m: export(m, args.batch_size, args.img_size, dynamo, folder) for m in (name, baseline)}
    labels = {variant: f'{name} ({label})' for variant, label in VARIANTS.items()}
    for variant, wanted in (('floor', args.sampling_floor), ('uniform', args.matrices_free)):
        if wanted:
            paths[labels[variant]] = export(name, args.batch_size, args.img_size, dynamo, folder, variant)
    sessions = {m: session(p, args.threads) for m, p in paths.items()}
    x = np.random.default_rng(0).standard_normal((args.batch_size, 3, args.img_size, args.img_size), np.float32)
    for s in sessions.values():
        for _ in range(args.warmup):
            s.run(None, {'x': x})
    throughput: Dict[str, List[float]] = {m: [] for m in sessions}
    for _ in range(args.rounds):
        for m, s in sessions.items():
            start = time.perf_counter()
            for _ in range(args.iters):
                s.run(None, {'x': x})
            throughput[m].append(args.batch_size * args.iters / (time.perf_counter() - start))

    def median_ratio(model: str) -> Optional[float]:
        if model not in throughput:
            return None
        return statistics.median(a / b for a, b in zip(throughput[model], throughput[baseline], strict=True))

    ratios = [a / b for a, b in zip(throughput[name], throughput[baseline], strict=True)]
    profiles = {m: operator_times(p, args.threads, x, args.iters) for m, p in paths.items()} if args.profile else {}
    return {
        'model': name,
        'baseline': baseline,
        'throughput': statistics.median(throughput[name]),
        'baseline_throughput': statistics.median(throughput[baseline]),
        'ratio': statistics.median(ratios),
        'ratios': ratios,
        'sampling_floor_ratio': median_ratio(labels['floor']),
        'matrices_free_ratio': median_ratio(labels['uniform']),
        'nodes': len(onnx.load(str(paths[name])).graph.node),
        'baseline_nodes': len(onnx.load(str(paths[baseline])).graph.node),
        'operator_ms': profiles.get(name),
        'baseline_operator_ms': profiles.get(baseline),
        'sampling_floor_operator_ms': profiles.get(labels['floor']),
        'matrices_free_operator_ms': profiles.get(labels['uniform']),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', default=['ssb_resnetd50', 'ssb_resnetd152'])
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--rounds', type=int, default=7)
    parser.add_argument('--iters', type=int, default=2)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--exporter', choices=['torchscript', 'dynamo'], default='torchscript')
    parser.add_argument('--profile', action='store_true', help="also time onnxruntime's operators by type")
    parser.add_argument(
        '--sampling-floor',
        action='store_true',
        help='also time each SSB model with its resampling at its memory floor in standard ops (MemoryFloorSampler)',
    )
    parser.add_argument(
        '--matrices-free',
        action='store_true',
        help='also time each SSB model with the uniform sampler: no saliency, matrices folded into constants',
    )
    parser.add_argument('--json', default=None, help='write the rows, settings and machine here')
    args = parser.parse_args()
    require_positive(parser, args, 'batch_size', 'img_size', 'threads', 'rounds', 'iters', 'warmup')
    unknown = [m for m in args.models if baseline_of(m) is None]
    if unknown:
        parser.error(f'--models must be SSB models with a baseline; got {", ".join(unknown)}')
    with tempfile.TemporaryDirectory() as folder:
        rows = [pair_row(name, args, Path(folder)) for name in args.models]
    machine = machine_info('cpu')
    lines = [
        f'onnxruntime {onnxruntime.__version__} inference on cpu ({machine["processor"]}, {machine["cpu_isa"]}), '
        f'batch {args.batch_size}, {args.img_size}x{args.img_size}, fp32, {args.threads} threads, {args.exporter} '
        f'exporter; median of {args.rounds} interleaved rounds of {args.iters} runs',
        f'{"model":<17} {"baseline":<12} {"img/s":>8} {"base":>8} {"speed x":>8} {"nodes":>6} {"base":>6}',
    ]
    lines += [
        f'{r["model"]:<17} {r["baseline"]:<12} {r["throughput"]:>8.2f} {r["baseline_throughput"]:>8.2f} '
        f'{r["ratio"]:>7.2f}x {r["nodes"]:>6} {r["baseline_nodes"]:>6}'
        for r in rows
    ]
    lines.append(round_spread({r['model']: r['ratios'] for r in rows}))
    for r in rows:
        if r['matrices_free_ratio'] is not None:
            lines.append(f'{r["model"]} with its saliency and matrices free: {r["matrices_free_ratio"]:.2f}x')
        if r['sampling_floor_ratio'] is not None:
            lines.append(f'{r["model"]} with its resampling at the memory floor: {r["sampling_floor_ratio"]:.2f}x')
    for r in rows:
        for model, key in (
            (r['model'], 'operator_ms'),
            (r['baseline'], 'baseline_operator_ms'),
            (f'{r["model"]} ({VARIANTS["uniform"]})', 'matrices_free_operator_ms'),
            (f'{r["model"]} ({VARIANTS["floor"]})', 'sampling_floor_operator_ms'),
        ):
            if r[key]:
                top = ', '.join(f'{op} {ms:.1f}' for op, ms in list(r[key].items())[:6])
                lines.append(f'{model}: ms per run by operator: {top} (all: {sum(r[key].values()):.1f})')
    settings = {**vars(args), 'onnxruntime': onnxruntime.__version__, 'onnx': onnx.__version__}
    report('\n'.join(lines), args.json, {'settings': settings, 'machine': machine, 'results': rows})


if __name__ == '__main__':
    main()
