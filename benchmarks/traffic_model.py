"""How many bytes the GPU resampling kernel moves, against the floor of one read and one write: a traffic model.

For each SSB stage's map (ResNet-D at 224 x 224, the sampler's matrices at uniform saliency) and each way (down;
up with residual and ReLU), this counts what ``separable_resample_kernel`` (``triton/resample_kernel.py``) loads
and stores from global memory, program by program, as its code reads: one program per (sample, output row,
column tile, channel tile) reads its output row's band of input rows times its column tile's band of input
columns, for its channels, plus the matrices' rows it scans and the residual, and stores its tile once. Loads
that several programs repeat count each time (an upper bound: L2 may serve some of them). The floor is one read of
every input byte the op needs and one write of its output (and one read of the residual).

    python benchmarks/traffic_model.py [--batch-size 256] [--dtype bfloat16] [--measured GPU_JSON] [--json PATH]

``/ copy`` (the bytes moved over those of one copy of the full-resolution map) is what the kernel's time over a copy
should come to if memory traffic bounds it; ``--measured`` puts beside it what ``gpu_sampling.py`` measured on a GPU
(issue #23: each op within 1.5x of the copy of the map it reads), so a kernel slower than its traffic explains shows.
"""

import argparse
import json
import math
from typing import Dict, List

import torch

from timm_ssb.benchmark import SAMPLED_MAPS
from timm_ssb.layers.native.dispatch import set_sampling_backend
from timm_ssb.layers.sampling_matrices import uniform_matrices

BLOCK_Q, BLOCK_C, BLOCK_W = 64, 32, 64  # the launcher's largest tiles (``_block``)


def _bands(matrix: torch.Tensor) -> List[range]:
    """Each row's nonzero band ``[first, last + 1)`` of a ``(rows, cols)`` matrix."""
    bands = []
    for row in matrix:
        nonzero = torch.nonzero(row).flatten().tolist()
        bands.append(range(nonzero[0], nonzero[-1] + 1) if nonzero else range(0))
    return bands


def _tile(length: int, largest: int) -> int:
    return max(16, min(largest, 1 << (length - 1).bit_length()))


def kernel_traffic(
    matrix_y: torch.Tensor, matrix_x: torch.Tensor, channels: int, itemsize: int, residual: bool
) -> Dict[str, float]:
    """Bytes one sample's op moves in the current kernel (``loads``, ``stores``) and at the floor, for
    ``matrix_y (P, H)`` and ``matrix_x (Q, W)`` (one sample's) on a ``(C, H, W)`` map of ``itemsize`` bytes."""
    rows, height = matrix_y.shape
    cols, width = matrix_x.shape
    block_q, block_c = _tile(cols, BLOCK_Q), _tile(channels, BLOCK_C)
    bands_y, bands_x = _bands(matrix_y), _bands(matrix_x)
    channel_tiles = math.ceil(channels / block_c)
    loads = 0.0
    for p in range(rows):
        for q0 in range(0, cols, block_q):
            tile = [bands_x[q] for q in range(q0, min(q0 + block_q, cols)) if len(bands_x[q])]
            w_span = (max(b.stop for b in tile) - min(b.start for b in tile)) if tile else 0
            q_count = min(block_q, cols - q0)
            x_bytes = len(bands_y[p]) * w_span * channels * itemsize  # over all channel tiles
            matrices = (height + len(bands_y[p])) * 4 + q_count * (width + w_span) * 4  # per channel tile
            loads += x_bytes + matrices * channel_tiles
            if residual:
                loads += q_count * channels * itemsize
    stores = rows * cols * channels * itemsize
    needed_rows = set().union(*(set(b) for b in bands_y))
    needed_cols = set().union(*(set(b) for b in bands_x))
    floor = len(needed_rows) * len(needed_cols) * channels * itemsize + stores
    if residual:
        floor += stores
    full_map = max(height * width, rows * cols) * channels * itemsize  # the full-resolution side
    return {'loads': loads, 'stores': stores, 'floor': floor, 'full_map_bytes': full_map}


def model_rows(batch_size: int, dtype: torch.dtype) -> List[Dict[str, object]]:
    itemsize = torch.empty((), dtype=dtype).element_size()
    set_sampling_backend('reference')  # the matrices as the PyTorch reference builds them
    rows = []
    for stage, channels, side, size in SAMPLED_MAPS:
        x = torch.empty(1, channels, side, side)
        down_y, down_x, up_y, up_x = (m[0] for m in uniform_matrices(x, size, 0.5 / size, 0.5 / size))
        for way, (matrix_y, matrix_x, residual) in {
            'down': (down_y, down_x, False),
            'up + residual + ReLU': (up_y, up_x, True),
        }.items():
            traffic = kernel_traffic(matrix_y, matrix_x, channels, itemsize, residual)
            moved = traffic['loads'] + traffic['stores']
            rows.append(
                dict(
                    stage=stage,
                    way=way,
                    channels=channels,
                    side=side,
                    size=size,
                    kernel_mb=moved * batch_size / 1e6,
                    floor_mb=traffic['floor'] * batch_size / 1e6,
                    copy_mb=2 * traffic['full_map_bytes'] * batch_size / 1e6,
                    kernel_over_floor=moved / traffic['floor'],
                    kernel_over_copy=moved / (2 * traffic['full_map_bytes']),
                )
            )
    return rows


def add_measured(rows: List[Dict[str, object]], path: str) -> None:
    """Each row's measured time over the copy of its full-resolution map, from a ``gpu_sampling.py`` JSON of the
    same batch and dtype (``measured_over_copy``)."""
    measured = {r['stage']: r for r in json.loads(open(path).read())['results']}
    for row in rows:
        stage = measured.get(row['stage'])
        if stage is not None:
            key = 'triton_down_ms' if row['way'] == 'down' else 'triton_up_ms'
            row['measured_over_copy'] = stage[key] / stage['copy_ms']


def format_rows(rows: List[Dict[str, object]]) -> str:
    header = (
        f'{"stage":<7} {"way":<21} {"kernel MB":>10} {"floor MB":>9} {"copy MB":>8} {"/ floor":>8} {"/ copy":>7} '
        f'{"measured / copy":>15}'
    )
    lines = [header, '-' * len(header)]
    for r in rows:
        measured = f'{r["measured_over_copy"]:>15.2f}' if 'measured_over_copy' in r else f'{"-":>15}'
        lines.append(
            f'{r["stage"]:<7} {r["way"]:<21} {r["kernel_mb"]:>10.1f} {r["floor_mb"]:>9.1f} {r["copy_mb"]:>8.1f} '
            f'{r["kernel_over_floor"]:>8.2f} {r["kernel_over_copy"]:>7.2f} {measured}'
        )
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch-size', type=int, default=256)
    parser.add_argument('--dtype', choices=['bfloat16', 'float16', 'float32'], default='bfloat16')
    parser.add_argument('--measured', default=None, help='a gpu_sampling.py JSON of the same batch and dtype')
    parser.add_argument('--json', default=None, help='write the rows and settings here')
    args = parser.parse_args()
    if args.batch_size <= 0:
        parser.error('--batch-size must be positive')
    rows = model_rows(args.batch_size, getattr(torch, args.dtype))
    if args.measured:
        add_measured(rows, args.measured)
    print(f'traffic model of the Triton resampling kernel, batch {args.batch_size}, {args.dtype}, uniform saliency')
    print(format_rows(rows))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'settings': vars(args), 'tiles': [BLOCK_Q, BLOCK_C, BLOCK_W], 'results': rows}, f, indent=2)


if __name__ == '__main__':
    main()
