"""How fast the sampling runs, against how fast this machine multiplies matrices at all.

For the map of each SSB stage of an SSB-ResNet-D at 224 x 224 (layer2: 512 channels, 28 x 28 sampled to
16 x 16; layer3: 1024, 14 -> 8; layer4: 2048, 7 -> 4), fp32 or (``--dtype bfloat16``) bf16, channels-last, this times

* the saliency conv (1x1, C -> 1) on the full-resolution map;
* building the adaptive sampler's four matrices from the ``(B, 1, H, W)`` saliency logits, forward, and
  forward + backward (a training step's share), and the same with PyTorch's ops (``ref``) in this process;
* ``resample``: the map down to ``s x s``, and the same with PyTorch's products (``ref``) in this process;
* ``resample_residual``: a result back up, plus the residual, then a ReLU, and the same in PyTorch's (``ref``);
* the map's memory-traffic floors: one read of it (a sum) -- the least the way down can do -- and a copy (a read
  and a write) -- the least the way up can do;
* the down and up passes' forward + backward with learned matrices (a training step's share: the map's, the
  residual's and the matrices' gradients), and the same with PyTorch's ops (``ref``) in this process;
* each resampling op's floor, the least time it can take here (``<op>_floor_ms``, and over PyTorch's time
  ``<op>_floor_ratio``): its memory traffic or its multiply-adds at ``torch.mm``'s rate in the map's dtype,
  whichever takes longer, forward and backward each. The forward ops' traffic is timed on the map (a read, a copy);
  for forward + backward it is a stand-in that does only that traffic, called through autograd as the op is and
  taking its turn in the same rounds (``<op>_least_traffic_ms``): the way down reads the map forward, reads it again
  and writes its gradient backward; the way up reads the residual and writes the output forward, reads the output's
  gradient and writes the residual's backward (the ReLU's mask taken as free); autograd then accumulates the map's
  gradient into ``x.grad``, as for either path (the same passes timed one by one, ``add_ms`` the accumulation's
  add, took less: their sum leaves out what autograd adds to them). The multiply-adds are those on the matrices'
  nonzero entries (:func:`band_macs`), the backward's twice the forward's (the input's gradient is the same two
  products transposed; each matrix's gradient one product, with the forward's intermediate kept). An op whose floor
  is above half of PyTorch's time cannot reach 0.5 of it on this machine;

each in the sampling backend chosen (``TIMM_SSB_SAMPLING_BACKEND``: by default the native fused kernel; with
``reference`` two batched matrix products, ``torch.bmm``, and for the way back an add and a ReLU in place). The
four resampling ops alternate with PyTorch's call by call, and each has a ratio, the median of the per-pair
ratios (``<op>_ratio`` in the JSON), as ``timm-ssb bench`` has for models; with ``--processes N``, the medians
over N fresh processes (each process's ratios in ``<op>_ratios``);

and, as the machine's references, a 2048^3 ``torch.mm`` (Intel MKL in PyTorch's CPU build, like
``torch.bmm``) and the same multiply-accumulates as a 1x1 convolution (oneDNN, like the models' convs).
GMAC/s of the sampling count its products' multiply-accumulates, ``B * C * s * W * (H + s)`` each way.

A micro-benchmark on the same map over and over, each resampling call after one of PyTorch's (which leaves
its own data in the cache): inside a model the map comes from the layer before. Its use is comparing the
products with the references, and runs with and without ``benchmarks/run_cpu_mkl_avx512.sh``'s shim, which gives
MKL its AVX-512 kernels on non-Intel CPUs.

Usage:

    python benchmarks/sampling_products.py --json benchmarks/results/cpu_sampling_products.json
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from timm_ssb.benchmark import SAMPLED_MAPS, machine_info, median_ms, report, require_positive
from timm_ssb.layers import adaptive_matrices, resample, resample_residual, uniform_matrices
from timm_ssb.layers.native import get_sampling_backend, set_sampling_backend
from timm_ssb.layers.native.calibration import interleaved_times
from timm_ssb.layers.samplers import DEFAULT_SIGMA_G


def matrices_ms(batch_size: int, side: int, size: int, repeats: int) -> Dict[str, float]:
    """Building the adaptive sampler's matrices from random logits: forward (no autograd), and forward + backward;
    in the backend chosen, and (``reference_`` keys) in PyTorch's, in this one process, each the median of its own
    repeats."""
    chosen = get_sampling_backend()
    times = {}
    try:
        for prefix, backend in (('', chosen), ('reference_', 'reference')):
            set_sampling_backend(backend)
            forward, forward_backward = _matrices_times(batch_size, side, size, repeats)
            times[f'{prefix}matrices_ms'] = forward
            times[f'{prefix}matrices_fwd_bwd_ms'] = forward_backward
    finally:
        set_sampling_backend(chosen)
    return times


def _matrices_times(batch_size: int, side: int, size: int, repeats: int) -> Tuple[float, float]:
    def build(t: torch.Tensor) -> List[torch.Tensor]:
        return adaptive_matrices(t, size, DEFAULT_SIGMA_G, 0.5 / size, 0.5 / size)

    with torch.inference_mode(False), torch.enable_grad():
        logits = torch.randn(batch_size, 1, side, side) * 2.0
        grads = [torch.randn_like(m) for m in build(logits)]

        def step() -> None:
            torch.autograd.backward(build(logits.requires_grad_()), grads)

        forward_backward = median_ms(step, repeats)
    with torch.no_grad():
        forward = median_ms(lambda: build(logits), repeats)
    return forward, forward_backward


def paired_ms(
    fn: Callable[[], object], repeats: int, least_traffic: Optional[Callable[[], object]] = None
) -> Dict[str, float]:
    """``fn`` in the backend chosen and in PyTorch's (``reference``), alternating call by call, which of the two goes
    first alternating too (the calibration's :func:`interleaved_times`): ``ms`` and ``reference_ms``, the median of
    each, and ``ratio``, the median of the ``repeats`` per-pair ratios (chosen / reference). Timed in blocks one
    after the other, the two met different machine states: PyTorch's own time of one op moved up to 2x between
    processes, and a ratio with it. ``least_traffic``, where given, takes its turn in the same rounds
    (``least_traffic_ms``)."""
    chosen = get_sampling_backend()

    def run(backend: str) -> Callable[[], None]:
        def call() -> None:
            set_sampling_backend(backend)
            fn()

        return call

    candidates = {'chosen': run(chosen), 'reference': run('reference')}
    if least_traffic is not None:
        candidates['least_traffic'] = least_traffic
    try:
        times = interleaved_times(candidates, repeats, warmup=3)
    finally:
        set_sampling_backend(chosen)
    ratios = [a / b for a, b in zip(times['chosen'], times['reference'], strict=True)]
    return {
        'ms': statistics.median(times['chosen']),
        'reference_ms': statistics.median(times['reference']),
        'ratio': statistics.median(ratios),
        **({'least_traffic_ms': statistics.median(times['least_traffic'])} if least_traffic is not None else {}),
    }


def _keyed(name: str, timing: Dict[str, float]) -> Dict[str, float]:
    """:func:`paired_ms`'s result under the op's keys: ``<name>_ms``, ``reference_<name>_ms``, ``<name>_ratio`` and
    ``<name>_least_traffic_ms``."""
    return {
        (f'reference_{name}_ms' if key == 'reference_ms' else f'{name}_{key}'): value for key, value in timing.items()
    }


class _LeastTrafficDown(torch.autograd.Function):
    """The least memory traffic of the way down's forward + backward, and nothing else: the forward reads the map
    once (a sum), the backward reads it again (the matrices' gradients need it) and writes the map's gradient, a new
    tensor as any backward returns; then autograd accumulates that into ``x.grad``, as for the op."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.sum(dim=(2, 3), keepdim=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return torch.mul(x, 0.5)


class _LeastTrafficUp(torch.autograd.Function):
    """The least memory traffic of the way up's forward + backward: the forward reads the residual and writes the
    output, the backward reads the output's gradient and writes the residual's (the ReLU's mask taken as free);
    then autograd accumulates that into the residual's ``x.grad``, as for the op."""

    @staticmethod
    def forward(ctx, residual: torch.Tensor) -> torch.Tensor:
        return residual.clone(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.clone(memory_format=torch.channels_last)


def resample_training_ms(x: torch.Tensor, matrices: List[torch.Tensor], repeats: int) -> Dict[str, float]:
    """Forward + backward of the way down (``x`` and its two matrices need gradients) and of the way back up with
    the residual and ReLU (the small map, the residual ``x`` and the two matrices), paired with PyTorch's path
    (:func:`paired_ms`), each with its least memory traffic through autograd taking its turn in the same rounds
    (:class:`_LeastTrafficDown`, :class:`_LeastTrafficUp`)."""
    with torch.inference_mode(False), torch.enable_grad():
        x = x.clone().requires_grad_()
        down_y, down_x, up_y, up_x = (m.clone().requires_grad_() for m in matrices)
        z = resample(x, down_y, down_x).detach().requires_grad_()
        grad_z, grad_out = torch.randn_like(z), torch.randn_like(x)

        def down() -> None:
            torch.autograd.backward(resample(x, down_y, down_x), grad_z)

        def up() -> None:
            torch.autograd.backward(resample_residual(z, up_y, up_x, x, relu=True), grad_out)

        grad_sums = torch.randn(x.shape[0], x.shape[1], 1, 1, dtype=x.dtype)

        def down_least_traffic() -> None:
            torch.autograd.backward(_LeastTrafficDown.apply(x), grad_sums)

        def up_least_traffic() -> None:
            torch.autograd.backward(_LeastTrafficUp.apply(x), grad_out)

        return {
            **_keyed('down_fwd_bwd', paired_ms(down, repeats, down_least_traffic)),
            **_keyed('up_fwd_bwd', paired_ms(up, repeats, up_least_traffic)),
        }


def floors_ms(x: torch.Tensor, repeats: int) -> Dict[str, float]:
    """The map's memory-traffic floors: one read (a sum over it), a copy (a read and a write, what mapping up must
    do) and, to compare with the least-traffic stand-ins' time through autograd, an add into a map (two reads and a
    write: autograd accumulating the map's gradient) timed alone."""
    total, addend = torch.zeros_like(x), torch.randn_like(x)
    return {
        'read_ms': median_ms(lambda: x.sum(dim=(2, 3)), repeats),
        'copy_ms': median_ms(lambda: x.clone(memory_format=torch.channels_last), repeats),
        'add_ms': median_ms(lambda: total.add_(addend), repeats),
    }


def band_macs(matrix_y: torch.Tensor, matrix_x: torch.Tensor, channels: int) -> int:
    """The multiply-adds of ``matrix_y @ X @ matrix_x^T`` over the batch and ``channels`` on the ``(B, P, H)`` and
    ``(B, Q, W)`` matrices' nonzero entries only, in the cheaper order of the two products: the least a kernel that
    skips the zeros must do."""
    rows, height = matrix_y.shape[1:]
    cols, width = matrix_x.shape[1:]
    nonzero_y, nonzero_x = int(torch.count_nonzero(matrix_y)), int(torch.count_nonzero(matrix_x))
    return channels * min(nonzero_y * width + nonzero_x * rows, nonzero_x * height + nonzero_y * cols)


def with_floors(row: Dict[str, Any], gmacs_per_s: float) -> Dict[str, Any]:
    """``row`` with each resampling op's floor (``<op>_floor_ms``) and its share of PyTorch's time
    (``<op>_floor_ratio``): per pass, the longer of its memory traffic and its multiply-adds (:func:`band_macs`, at
    ``gmacs_per_s``: ``torch.mm``'s in the map's dtype). The forward ops' traffic is timed on the map (a read, a
    copy); that of forward + backward is the least-traffic stand-in's time through autograd
    (``<op>_least_traffic_ms``), to which a pass whose multiply-adds take longer than its traffic adds the
    difference."""
    macs_per_ms = gmacs_per_s * 1e6
    down, up = row['down_band_macs'] / macs_per_ms, row['up_band_macs'] / macs_per_ms
    read, copy = row['read_ms'], row['copy_ms']
    # Forward, the way down reads the map; the way up reads the residual and writes its output. Backward, the way
    # down reads the map and writes its gradient; the way up reads the output's gradient and writes the residual's.
    floors = {
        'down': max(read, down),
        'up_residual_relu': max(copy, up),
        'down_fwd_bwd': row['down_fwd_bwd_least_traffic_ms'] + max(0.0, down - read) + max(0.0, 2 * down - copy),
        'up_fwd_bwd': row['up_fwd_bwd_least_traffic_ms'] + max(0.0, up - copy) + max(0.0, 2 * up - copy),
    }
    out = dict(row)
    for op, floor in floors.items():
        out[f'{op}_floor_ms'] = floor
        out[f'{op}_floor_ratio'] = floor / row[f'reference_{op}_ms']
    return out


def stage_row(
    stage: str, channels: int, side: int, size: int, batch_size: int, repeats: int, dtype: torch.dtype
) -> Dict[str, object]:
    x = torch.randn(batch_size, channels, side, side).to(dtype).contiguous(memory_format=torch.channels_last)
    down_y, down_x, up_y, up_x = uniform_matrices(x, size, 0.5 / size, 0.5 / size)
    z = resample(x, down_y, down_x)
    saliency_weight = (torch.randn(1, channels, 1, 1) / channels**0.5).to(dtype)
    saliency_bias = torch.zeros(1, dtype=dtype)
    gmacs = batch_size * channels * size * side * (side + size) / 1e9
    saliency_ms = median_ms(lambda: F.conv2d(x, saliency_weight, saliency_bias), repeats)
    down = _keyed('down', paired_ms(lambda: resample(x, down_y, down_x), repeats))
    up = _keyed('up_residual_relu', paired_ms(lambda: resample_residual(z, up_y, up_x, x, relu=True), repeats))
    return {
        **matrices_ms(batch_size, side, size, repeats),
        **down,
        **up,
        **floors_ms(x, repeats),
        **resample_training_ms(x, [down_y, down_x, up_y, up_x], repeats),
        'down_band_macs': band_macs(down_y, down_x, channels),
        'up_band_macs': band_macs(up_y, up_x, channels),
        'stage': stage,
        'channels': channels,
        'side': side,
        'size': size,
        'gmacs_each_way': gmacs,
        'saliency_ms': saliency_ms,
        'down_gmacs_per_s': gmacs / down['down_ms'] * 1e3,
        'up_gmacs_per_s': gmacs / up['up_residual_relu_ms'] * 1e3,
    }


def references(repeats: int, dtype: torch.dtype) -> Dict[str, float]:
    """GMAC/s of a 2048^3 product as ``torch.mm`` (MKL) and as a 1x1 convolution (oneDNN), in float32; and
    ``floor_gmacs_per_s``, the rate of the floors' multiply-adds: ``torch.mm``'s in the map's ``dtype``."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    x = torch.randn(1, n, 32, n // 32).contiguous(memory_format=torch.channels_last)
    w = torch.randn(n, n, 1, 1)
    gmacs = n**3 / 1e9
    mm = gmacs / median_ms(lambda: torch.mm(a, b), repeats) * 1e3
    if dtype != torch.float32:
        a, b = a.to(dtype), b.to(dtype)
    return {
        'mm_gmacs_per_s': mm,
        'conv1x1_gmacs_per_s': gmacs / median_ms(lambda: F.conv2d(x, w), repeats) * 1e3,
        'floor_gmacs_per_s': mm if dtype == torch.float32 else gmacs / median_ms(lambda: torch.mm(a, b), repeats) * 1e3,
    }


def format_rows(rows: List[Dict[str, object]], refs: Dict[str, float]) -> str:
    header = (
        f'{"stage":<7} {"C":>5} {"H=W":>4} {"s":>3} {"saliency ms":>11} {"matrices ms (ref)":>17} '
        f'{"f+b ms (ref)":>13} {"down ms (ref)":>15} {"GMAC/s":>7} {"up+res+relu ms (ref)":>20} {"GMAC/s":>7} '
        f'{"read ms":>7} {"copy ms":>7} {"down f+b ms (ref)":>17} {"up f+b ms (ref)":>17}'
    )
    lines = [header, '-' * len(header)]
    for r in rows:
        lines.append(
            f'{r["stage"]:<7} {r["channels"]:>5} {r["side"]:>4} {r["size"]:>3} {r["saliency_ms"]:>11.3f} '
            f'{r["matrices_ms"]:>8.3f} ({r["reference_matrices_ms"]:.3f}) '
            f'{r["matrices_fwd_bwd_ms"]:>6.3f} ({r["reference_matrices_fwd_bwd_ms"]:.3f}) {r["down_ms"]:>7.3f} '
            f'({r["reference_down_ms"]:.3f}) {r["down_gmacs_per_s"]:>7.0f} {r["up_residual_relu_ms"]:>12.3f} '
            f'({r["reference_up_residual_relu_ms"]:.3f}) {r["up_gmacs_per_s"]:>7.0f} {r["read_ms"]:>7.3f} '
            f'{r["copy_ms"]:>7.3f} '
            f'{r["down_fwd_bwd_ms"]:>8.3f} ({r["reference_down_fwd_bwd_ms"]:.3f}) '
            f'{r["up_fwd_bwd_ms"]:>8.3f} ({r["reference_up_fwd_bwd_ms"]:.3f})'
        )
    lines.append('native / PyTorch, the median of the per-pair ratios: down, up+res+relu, down f+b, up f+b')
    for r in rows:
        ratios = (r[f'{name}_ratio'] for name in RATIO_OPS)
        lines.append(f'{r["stage"]:<7} ' + ' '.join(f'{ratio:5.2f}' for ratio in ratios))
    lines.append(
        "floor / PyTorch's time (the least each op can take here: memory traffic, for f+b through autograd, or "
        "multiply-adds at torch.mm's rate): down, up+res+relu, down f+b, up f+b"
    )
    for r in rows:
        lines.append(f'{r["stage"]:<7} ' + ' '.join(f'{r[f"{name}_floor_ratio"]:5.2f}' for name in RATIO_OPS))
    if 'down_ratios' in rows[0]:
        lines.append('the same in each process (lowest-highest)')
        for r in rows:
            spans = (r[f'{name}_ratios'] for name in RATIO_OPS)
            lines.append(f'{r["stage"]:<7} ' + ' '.join(f'{min(s):.2f}-{max(s):.2f}' for s in spans))
    lines.append(
        f'machine: torch.mm 2048^3 (MKL) {refs["mm_gmacs_per_s"]:.0f} GMAC/s; '
        f'the same as a 1x1 conv (oneDNN) {refs["conv1x1_gmacs_per_s"]:.0f} GMAC/s; '
        f"in the map's dtype (the floors' rate) {refs['floor_gmacs_per_s']:.0f} GMAC/s"
    )
    return '\n'.join(lines)


RATIO_OPS = ('down', 'up_residual_relu', 'down_fwd_bwd', 'up_fwd_bwd')


def measure_in_processes(args: argparse.Namespace) -> Tuple[List[Dict[str, Any]], Dict[str, float]]:
    """This benchmark in ``args.processes`` fresh processes, one after the other: each stage's times and ratios are
    the medians over the processes, and ``<op>_ratios`` lists each process's ratio. The same op's ratio moved up to
    2x between processes on one machine (the Zen 4's fp32 way down at layer3: 0.88 and 1.01 in two runs of both
    builds, 0.5 in processes between them), far more than within a process: one process's cell says little."""
    runs = []
    with tempfile.TemporaryDirectory() as directory:
        for i in range(args.processes):
            path = os.path.join(directory, f'run{i}.json')
            command = [sys.executable, os.path.abspath(__file__), '--processes', '1', '--json', path]
            for name in ('batch_size', 'threads', 'repeats', 'dtype'):
                command += [f'--{name.replace("_", "-")}', str(getattr(args, name))]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            with open(path) as f:
                runs.append(json.load(f))
    rows = []
    for stage_rows in zip(*(run['results'] for run in runs), strict=True):
        row = dict(stage_rows[0])
        for key, value in row.items():
            if isinstance(value, float):
                row[key] = statistics.median(r[key] for r in stage_rows)
        for op in RATIO_OPS:
            row[f'{op}_ratios'] = [r[f'{op}_ratio'] for r in stage_rows]
        rows.append(row)
    refs = {key: statistics.median(run['references'][key] for run in runs) for key in runs[0]['references']}
    return rows, refs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=30)
    parser.add_argument('--dtype', choices=['float32', 'bfloat16'], default='float32', help="the map's dtype")
    parser.add_argument(
        '--processes', type=int, default=1, help='measure in this many fresh processes; report the medians over them'
    )
    parser.add_argument('--json', default=None, help='write the rows, settings and machine here')
    args = parser.parse_args()
    require_positive(parser, args, 'batch_size', 'threads', 'repeats', 'processes')
    torch.set_num_threads(args.threads)
    if args.processes > 1:
        rows, refs = measure_in_processes(args)
    else:
        with torch.inference_mode():
            rows = [
                stage_row(stage, channels, side, size, args.batch_size, args.repeats, getattr(torch, args.dtype))
                for stage, channels, side, size in SAMPLED_MAPS
            ]
            refs = references(args.repeats, getattr(torch, args.dtype))
    rows = [with_floors(row, refs['floor_gmacs_per_s']) for row in rows]
    machine = machine_info('cpu')
    env = machine['allocator_env']
    header = (
        f'sampling ({machine["sampling_backend"]} backend) on cpu ({machine["processor"]}, {machine["cpu_isa"]}, '
        f'kernels -march={machine["kernel_arch"]}), batch {args.batch_size}, {args.dtype}, channels_last, '
        f"{args.threads} threads, median of {args.repeats} (the resampling ops alternating with PyTorch's)"
        f'{f", medians over {args.processes} processes" if args.processes > 1 else ""}; '
        'environment: '
        f'{" ".join(f"{k}={v}" for k, v in env.items()) or "defaults"}'
    )
    payload = {'settings': vars(args), 'machine': machine, 'results': rows, 'references': refs}
    report(f'{header}\n{format_rows(rows, refs)}', args.json, payload)


if __name__ == '__main__':
    main()
