"""What subnormal sampling weights cost on this CPU: the sampling down of each SSB stage's map with the
Gaussian matrices as a plain softmax makes them (their far tails underflow to ~1e-40) and as the package
makes them (``tailless_softmax``: tails below exp(-50) of the peak are exact zeros).

Intel CPUs take a microcode assist for every multiply with a subnormal operand (issue #11 measured the
sampling products up to 10x slower there); other CPUs may not. Both forms are timed in the same process,
interleaved, fp32, channels-last, batch 16 (the median of ``--rounds`` rounds).

    python benchmarks/subnormal_products.py --json benchmarks/results/cpu_subnormal_products.json
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from timm_ssb.benchmark import SAMPLED_MAPS, machine_info, write_json
from timm_ssb.layers import resample
from timm_ssb.layers.sampling_matrices import pixel_centres, tailless_softmax

"""(stage, channels, map side, sampled side) of an SSB-ResNet-D at 224 x 224."""


def down_matrix(side: int, size: int, batch_size: int, tailless: bool) -> torch.Tensor:
    """The uniform sampler's ``(B, s, L)`` read-out matrix, with or without its far tail cut."""
    sigma = 0.5 / size
    logits = -(pixel_centres(size, 'cpu')[:, None] - pixel_centres(side, 'cpu')[None]).square() / (2 * sigma**2)
    matrix = tailless_softmax(logits, -1) if tailless else torch.softmax(logits, -1)
    return matrix.expand(batch_size, size, side)


def time_ms(x: torch.Tensor, matrix: torch.Tensor, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        resample(x, matrix, matrix)
    return (time.perf_counter() - start) / iters * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--rounds', type=int, default=7)
    parser.add_argument('--iters', type=int, default=5)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--json', default=None, metavar='PATH')
    args = parser.parse_args()
    for flag in ('batch_size', 'rounds', 'iters', 'threads'):
        if getattr(args, flag) <= 0:
            parser.error(f'--{flag.replace("_", "-")} must be a positive int')
    torch.set_num_threads(args.threads)
    tiny = torch.finfo(torch.float32).tiny
    rows = []
    for stage, channels, side, size in SAMPLED_MAPS:
        x = torch.randn(args.batch_size, channels, side, side).contiguous(memory_format=torch.channels_last)
        plain = down_matrix(side, size, args.batch_size, tailless=False)
        cut = down_matrix(side, size, args.batch_size, tailless=True)
        for matrix in (plain, cut):
            time_ms(x, matrix, 2)  # warm-up
        times = {'plain': [], 'tailless': []}
        for _ in range(args.rounds):
            times['plain'].append(time_ms(x, plain, args.iters))
            times['tailless'].append(time_ms(x, cut, args.iters))
        plain_ms, cut_ms = statistics.median(times['plain']), statistics.median(times['tailless'])
        rows.append(
            dict(
                stage=stage,
                channels=channels,
                side=side,
                size=size,
                subnormal_weights=int(((plain[0] != 0) & (plain[0] < tiny)).sum()),
                weights=plain[0].numel(),
                plain_ms=plain_ms,
                tailless_ms=cut_ms,
                speedup=plain_ms / cut_ms,
                rounds=times,
            )
        )
    machine = machine_info('cpu')
    lines = [
        f'sampling down, fp32, channels-last, batch {args.batch_size}, {args.threads} threads, {machine["processor"]}',
        f'{"stage":<8} {"map":>12} {"subnormal":>10} {"plain ms":>9} {"cut ms":>8} {"plain/cut":>10}',
    ]
    for r in rows:
        lines.append(
            f'{r["stage"]:<8} {r["channels"]:>5} {r["side"]:>2}->{r["size"]:<3} '
            f'{r["subnormal_weights"]:>4}/{r["weights"]:<5} {r["plain_ms"]:>9.2f} {r["tailless_ms"]:>8.2f} '
            f'{r["speedup"]:>9.2f}x'
        )
    print('\n'.join(lines))
    if args.json:
        payload = dict(settings=vars(args), machine=machine, rows=rows)
        write_json(args.json, payload)
        Path(args.json).with_suffix('.txt').write_text('\n'.join(lines) + '\n')


if __name__ == '__main__':
    main()
