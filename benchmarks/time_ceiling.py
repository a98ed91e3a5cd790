"""How much faster can an SSB model be than its baseline on this machine? Time every part of both.

An SSB model shares most of its network with its timm baseline: the stem, all of layer1, the first
(stride-2) block of layers 2-4 and the head are the same modules doing the same work. Only the
stride-1 blocks of layers 2-4 change. This script times every part of both models, interleaved, and
reports, per model:

* the measured speed ratio (sum of the parts);
* how long the shared parts take (they cost both models the same);
* the time and GMACs of the SSB blocks against the blocks they replace;
* ``ceiling @ GMACs``: the ratio the model would reach if its SSB blocks ran exactly their GMACs ratio
  faster than the baseline's blocks (as efficient per multiply-accumulate as the baseline's);
* ``ceiling @ branch``: the ratio if sampling cost nothing, i.e. the SSB blocks took only the time of
  their residual branch (the three convs and norms on the sampled ``s x s`` map, timed on its own);
* ``ceiling @ floor``: the ratio if the sampling ran at the memory-traffic floor of its resampling, with the
  saliency and the matrices free: each SSB block's time its residual branch's plus one read of the block's input
  (the least the way down must do) and one copy of it (what the way up must do: read the residual, write the
  output), both timed on the block's own map;
* ``ceiling @ free``: the ratio if the SSB blocks cost nothing at all;
* ``sampling ms``: what the sampling costs, the SSB blocks' time minus their residual branches' (saliency,
  matrices, down, up, residual add, ReLU), and its share of the SSB blocks' time.

Usage (inference, channels_last; fp32, or bf16 autocast with ``--amp bfloat16``):

    python benchmarks/time_ceiling.py --json benchmarks/results/cpu_time_ceiling_fp32_<cpu>_<build>.json
    python benchmarks/time_ceiling.py --amp bfloat16 --json benchmarks/results/cpu_time_ceiling_bf16_<cpu>_<build>.json
"""

import argparse
import statistics
import time
from typing import Callable, Dict, List, Optional

import timm
import torch
import torch.nn as nn

from timm_ssb import BASELINES, SSBBottleneck
from timm_ssb.benchmark import SPEED_TARGETS, machine_info, model_parts, report, require_positive
from timm_ssb.complexity import count_gmacs

CPU_INFERENCE_TARGETS = {None: SPEED_TARGETS['inference_fp32'], torch.bfloat16: SPEED_TARGETS['inference_bf16']}
"""Issue #22's CPU inference targets (SSB throughput / baseline throughput) per autocast dtype (None: fp32)."""


def memory_floor(x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The least memory traffic of resampling a map like ``x`` down and back up: one read (a sum) and one copy
    into a tensor allocated and written here, so that the copy meets no fresh pages."""
    dst = torch.zeros_like(x)

    def read_and_copy(t: torch.Tensor) -> torch.Tensor:
        t.sum()
        return dst.copy_(t)

    return read_and_copy


def time_parts(
    models: List[nn.Module], x: torch.Tensor, rounds: int, amp_dtype: Optional[torch.dtype] = None
) -> List[Dict[str, float]]:
    """Median milliseconds of every part of every model; the models take turns within each round.

    For an SSB block, ``<name>.branch`` is its residual branch alone, timed on the map its sampler made, and
    ``<name>.floor`` the memory floor of its resampling (:func:`memory_floor`) on its input.
    With ``amp_dtype``, everything runs under CPU autocast to that dtype.
    """
    times: List[Dict[str, List[float]]] = [{} for _ in models]
    autocast = torch.autocast('cpu', dtype=amp_dtype, enabled=amp_dtype is not None)
    with torch.inference_mode(), autocast:
        for r in range(rounds + 1):  # round 0 warms up
            for model, acc in zip(models, times, strict=True):
                t = x
                for name, part in model_parts(model, blocks=True):
                    timed = [(name, part, t)]
                    if isinstance(part, SSBBottleneck):
                        timed.append((f'{name}.branch', part.residual_branch, part.sampler(t)[0]))
                        timed.append((f'{name}.floor', memory_floor(t), t))
                    for key, fn, inp in reversed(timed):
                        start = time.perf_counter()
                        out = fn(inp)
                        if r:
                            acc.setdefault(key, []).append(time.perf_counter() - start)
                    t = out
    return [{k: statistics.median(v) * 1e3 for k, v in acc.items()} for acc in times]


def part_gmacs(model: nn.Module, img_size: int) -> Dict[str, float]:
    """GMACs per image of every part; the head (pooling and classifier, the same in both models) counts 0."""
    out: Dict[str, float] = {}
    t = torch.zeros(1, 3, img_size, img_size)
    with torch.no_grad():
        for name, part in model_parts(model, blocks=True):
            out[name] = count_gmacs(part, tuple(t.shape[1:])) if isinstance(part, nn.Module) else 0.0
            t = part(t)
    return out


def analyse(
    name: str, batch_size: int, img_size: int, rounds: int, amp_dtype: Optional[torch.dtype] = None
) -> Dict[str, object]:
    baseline = BASELINES[name]
    ssb = timm.create_model(name).eval().to(memory_format=torch.channels_last)  # fp32 weights, as under autocast
    base = timm.create_model(baseline).eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch_size, 3, img_size, img_size).contiguous(memory_format=torch.channels_last)
    ssb_ms, base_ms = time_parts([ssb, base], x, rounds, amp_dtype)
    ssb_gmacs, base_gmacs = part_gmacs(ssb, img_size), part_gmacs(base, img_size)
    sampled = [n for n, p in model_parts(ssb, blocks=True) if isinstance(p, SSBBottleneck)]
    shared = [n for n in base_ms if n not in sampled]
    branch_ms = {n: ssb_ms.pop(f'{n}.branch') for n in sampled}
    floor_ms = {n: ssb_ms.pop(f'{n}.floor') for n in sampled}
    total_base, total_ssb = sum(base_ms.values()), sum(ssb_ms.values())
    shared_ms = sum(base_ms[n] for n in shared)
    blocks_base_ms = sum(base_ms[n] for n in sampled)
    blocks_ssb_ms = sum(ssb_ms[n] for n in sampled)
    blocks_gmacs_ratio = sum(base_gmacs[n] for n in sampled) / sum(ssb_gmacs[n] for n in sampled)
    per_stage = {}
    for layer in ('layer2', 'layer3', 'layer4'):
        names = [n for n in sampled if n.startswith(layer + '.')]
        if names:
            per_stage[layer] = {
                'blocks': len(names),
                'base_ms': sum(base_ms[n] for n in names),
                'ssb_ms': sum(ssb_ms[n] for n in names),
                'branch_ms': sum(branch_ms[n] for n in names),
                'gmacs_ratio': sum(base_gmacs[n] for n in names) / sum(ssb_gmacs[n] for n in names),
            }
    return {
        'model': name,
        'baseline': baseline,
        'ratio': total_base / total_ssb,
        'base_ms': total_base,
        'ssb_ms': total_ssb,
        'shared_ms': shared_ms,
        'shared_share': shared_ms / total_base,
        'blocks_base_ms': blocks_base_ms,
        'blocks_ssb_ms': blocks_ssb_ms,
        'blocks_time_ratio': blocks_base_ms / blocks_ssb_ms,
        'blocks_gmacs_ratio': blocks_gmacs_ratio,
        'blocks_branch_ms': sum(branch_ms.values()),
        'sampling_ms': blocks_ssb_ms - sum(branch_ms.values()),
        'sampling_share': (blocks_ssb_ms - sum(branch_ms.values())) / blocks_ssb_ms,
        'ceiling_at_gmacs': total_base / (shared_ms + blocks_base_ms / blocks_gmacs_ratio),
        'ceiling_at_branch': total_base / (shared_ms + sum(branch_ms.values())),
        'sampling_floor_ms': sum(floor_ms.values()),
        'ceiling_at_floor': total_base / (shared_ms + sum(branch_ms.values()) + sum(floor_ms.values())),
        'ceiling_if_free': total_base / shared_ms,
        'target': CPU_INFERENCE_TARGETS[amp_dtype].get(name),
        'per_stage': per_stage,
        'parts_ms': {'ssb': ssb_ms, 'base': base_ms, 'ssb_branch': branch_ms},
    }


def format_rows(rows: List[Dict[str, object]]) -> str:
    header = (
        f'{"model":<16} {"ratio":>6} {"target":>6} {"shared ms":>10} {"share":>6} {"blocks ms":>15} '
        f'{"time x":>6} {"GMACs x":>7} {"ceiling@GMACs":>13} {"ceiling@floor":>13} {"ceiling@branch":>14} '
        f'{"ceiling@free":>12} {"sampling ms":>11} {"share":>6} {"floor ms":>8}'
    )
    lines = [header, '-' * len(header)]
    for r in rows:
        target = '-' if r['target'] is None else f'{r["target"]:.2f}'
        lines.append(
            f'{r["model"]:<16} {r["ratio"]:>6.2f} {target:>6} {r["shared_ms"]:>10.1f} {r["shared_share"]:>6.0%} '
            f'{r["blocks_ssb_ms"]:>6.1f} / {r["blocks_base_ms"]:>6.1f} {r["blocks_time_ratio"]:>6.2f} '
            f'{r["blocks_gmacs_ratio"]:>7.2f} {r["ceiling_at_gmacs"]:>13.2f} {r["ceiling_at_floor"]:>13.2f} '
            f'{r["ceiling_at_branch"]:>14.2f} {r["ceiling_if_free"]:>12.2f} {r["sampling_ms"]:>11.1f} '
            f'{r["sampling_share"]:>6.0%} {r["sampling_floor_ms"]:>8.1f}'
        )
    lines.append(
        'sampling ms: SSB blocks minus their residual branches (saliency, matrices, down, up, residual add, ReLU), '
        "and its share of the SSB blocks; floor ms: one read and one copy of each SSB block's input, the least its "
        'resampling down and up must move (ceiling@floor: the sampling at that floor, saliency and matrices free)'
    )
    lines.append('SSB blocks per stage, ms SSB / baseline (time x, GMACs x; ms of the residual branch alone):')
    for r in rows:
        stages = '   '.join(
            f'{k} x{v["blocks"]}: {v["ssb_ms"]:.1f} / {v["base_ms"]:.1f} '
            f'({v["base_ms"] / v["ssb_ms"]:.2f}x, {v["gmacs_ratio"]:.2f}x; {v["branch_ms"]:.1f})'
            for k, v in r['per_stage'].items()
        )
        lines.append(f'  {r["model"]:<16} {stages}')
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', default=list(CPU_INFERENCE_TARGETS[None]))
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--rounds', type=int, default=7)
    parser.add_argument('--amp', choices=['bfloat16'], default=None, help='CPU autocast dtype (default: fp32)')
    parser.add_argument('--json', default=None, help='write the rows, settings and machine here')
    args = parser.parse_args()
    require_positive(parser, args, 'batch_size', 'img_size', 'threads', 'rounds')
    unknown = [m for m in args.models if m not in BASELINES]
    if unknown:
        parser.error(f'--models: unknown {unknown}; choose from {sorted(BASELINES)}')
    torch.set_num_threads(args.threads)
    amp_dtype = getattr(torch, args.amp) if args.amp else None
    rows = [analyse(m, args.batch_size, args.img_size, args.rounds, amp_dtype) for m in args.models]
    machine = machine_info('cpu')
    env = machine['allocator_env']
    header = (
        f'inference on cpu ({machine["processor"]}), batch {args.batch_size}, {args.img_size}x{args.img_size}, '
        f'channels_last, {args.amp + " autocast" if args.amp else "fp32"}, eager, {args.threads} threads, '
        f'median of {args.rounds} rounds per part; '
        f'allocator: {" ".join(f"{k}={v}" for k, v in env.items()) or "glibc malloc defaults"}; '
        f'sampling backend: {machine["sampling_backend"]}'
    )
    report(f'{header}\n{format_rows(rows)}', args.json, {'settings': vars(args), 'machine': machine, 'results': rows})


if __name__ == '__main__':
    main()
