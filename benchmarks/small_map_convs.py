"""The residual branch's convolutions on the sampled maps: oneDNN's convolution against the matrix products of
``timm_ssb.layers.small_map_conv``.

For each SSB stage of an SSB-ResNet-D (its channels, and the bottleneck's width) at each of the paper's three
sampled sides (presets ``(12, 6, 3)``, ``(16, 8, 4)``, ``(20, 10, 5)``), this times the block's three convs
(1x1 in, 3x3, 1x1 out) on a channels-last map, in float32 or (``--dtype bfloat16``) under bf16 autocast as the
models run, as ``F.conv2d`` and as ``conv2d_as_product``: forward, and forward + backward (the map's and the
weights' gradients). ``rule`` says which the models take (``products``: at most ``SMALL_MAP_POSITIONS``).
Each figure is the median of its own repeats, all in this one process (warm caches: the same map over and over).

Usage (``ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2`` in front for the AVX2 code paths):

    python benchmarks/small_map_convs.py --json benchmarks/results/cpu_small_map_convs_float32.json
"""

import argparse
import os
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from timm_ssb.benchmark import machine_info, median_ms, report, require_positive
from timm_ssb.layers.small_map_conv import SMALL_MAP_POSITIONS, conv2d_as_product

STAGES = (('layer2', 512, 128, (12, 16, 20)), ('layer3', 1024, 256, (6, 8, 10)), ('layer4', 2048, 512, (3, 4, 5)))
"""``(stage, channels, width, sampled sides)`` of a ResNet-D's SSB blocks and the paper's sampled sizes."""

CONVS = (('conv1', 1), ('conv2', 3), ('conv3', 1))

LIBRARY_ISA_ENV = ('ONEDNN_MAX_CPU_ISA', 'DNNL_MAX_CPU_ISA', 'MKL_ENABLE_INSTRUCTIONS', 'MKL_DEBUG_CPU_TYPE')
"""Environment that holds oneDNN (the convs) or MKL (the products) to an instruction set, e.g. AVX2 on an AVX-512
CPU: the code paths an AVX2-only CPU takes."""


def _conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, w, padding=w.shape[-1] // 2)


def _product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return conv2d_as_product(x, w, None)


def row(stage: str, channels: int, width: int, side: int, args: argparse.Namespace) -> Dict[str, object]:
    amp = args.dtype == 'bfloat16'
    in_chs = {'conv1': channels, 'conv2': width, 'conv3': width}
    out_chs = {'conv1': width, 'conv2': width, 'conv3': channels}
    result: Dict[str, object] = {
        'stage': stage,
        'channels': channels,
        'width': width,
        'side': side,
        'rule': 'products' if side * side <= SMALL_MAP_POSITIONS else 'conv',
    }
    for name, kernel in CONVS:
        x = torch.randn(args.batch_size, in_chs[name], side, side).contiguous(memory_format=torch.channels_last)
        if amp:
            x = x.bfloat16()
        w = (torch.randn(out_chs[name], in_chs[name], kernel, kernel) / (in_chs[name] * kernel**2) ** 0.5).contiguous(
            memory_format=torch.channels_last
        )
        for label, fn in (('conv', _conv), ('product', _product)):
            result[f'{name}_{label}_ms'] = _time(fn, x, w, amp, args.repeats, backward=False)
            result[f'{name}_{label}_fwd_bwd_ms'] = _time(fn, x, w, amp, args.repeats, backward=True)
    for suffix, ratio in (('ms', 'branch_ratio_fwd'), ('fwd_bwd_ms', 'branch_ratio_fwd_bwd')):
        for label in ('conv', 'product'):
            result[f'branch_{label}_{suffix}'] = sum(result[f'{n}_{label}_{suffix}'] for n, _ in CONVS)
        result[ratio] = result[f'branch_product_{suffix}'] / result[f'branch_conv_{suffix}']
    return result


def _time(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    w: torch.Tensor,
    amp: bool,
    repeats: int,
    backward: bool,
) -> float:
    if not backward:

        def forward() -> None:
            with torch.inference_mode(), torch.autocast('cpu', torch.bfloat16, enabled=amp):
                fn(x, w)

        return median_ms(forward, repeats)
    xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
    with torch.autocast('cpu', torch.bfloat16, enabled=amp):
        grad = torch.randn_like(fn(xg, wg))

    def step() -> None:
        with torch.autocast('cpu', torch.bfloat16, enabled=amp):
            out = fn(xg, wg)
        torch.autograd.grad(out, (xg, wg), grad)

    return median_ms(step, repeats)


def format_rows(rows: List[Dict[str, object]]) -> str:
    header = (
        f'{"stage":<7} {"C":>5} {"width":>5} {"s":>3} {"rule":>8} '
        + ' '.join(f'{n + " conv/prod ms":>18}' for n, _ in CONVS)
        + f' {"branch prod/conv":>16} {"f+b conv/prod ms":>17} {"f+b prod/conv":>13}'
    )
    lines = [header, '-' * len(header)]
    for r in rows:
        lines.append(
            f'{r["stage"]:<7} {r["channels"]:>5} {r["width"]:>5} {r["side"]:>3} {r["rule"]:>8} '
            + ' '.join(f'{r[n + "_conv_ms"]:>8.3f}/{r[n + "_product_ms"]:<9.3f}' for n, _ in CONVS)
            + f' {r["branch_ratio_fwd"]:>16.2f} {r["branch_conv_fwd_bwd_ms"]:>8.2f}/'
            f'{r["branch_product_fwd_bwd_ms"]:<8.2f} {r["branch_ratio_fwd_bwd"]:>13.2f}'
        )
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=20)
    parser.add_argument('--dtype', choices=['float32', 'bfloat16'], default='float32', help='float32, or bf16 autocast')
    parser.add_argument('--json', default=None, help='write the rows, settings and machine here')
    args = parser.parse_args()
    require_positive(parser, args, 'batch_size', 'threads', 'repeats')
    torch.set_num_threads(args.threads)
    rows = [row(stage, channels, width, side, args) for stage, channels, width, sides in STAGES for side in sides]
    machine = machine_info('cpu')
    isa_env = {k: os.environ[k] for k in LIBRARY_ISA_ENV if k in os.environ}
    header = (
        f'SSB branch convs on the sampled maps, on cpu ({machine["processor"]}, {machine["cpu_isa"]}), '
        f'batch {args.batch_size}, {args.dtype}{" autocast" if args.dtype == "bfloat16" else ""}, channels_last, '
        f'{args.threads} threads, median of {args.repeats}; '
        f'{" ".join(f"{k}={v}" for k, v in isa_env.items()) or "libraries at their own ISA choice"}; '
        'ms conv / product, ratios product over conv'
    )
    payload = {'settings': {**vars(args), 'library_isa_env': isa_env}, 'machine': machine, 'results': rows}
    report(f'{header}\n{format_rows(rows)}', args.json, payload)


if __name__ == '__main__':
    main()
