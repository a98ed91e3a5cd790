"""The sampling on a GPU: each backend against the floor memory traffic sets.

For the map of each SSB stage of an SSB-ResNet-D at 224 x 224 (layer2: 512 channels, 28 x 28 sampled to
16 x 16; layer3: 1024, 14 -> 8; layer4: 2048, 7 -> 4), channels-last, batch 256 by default, this times, in each
sampling backend (``triton``: the fused kernel; ``reference``: PyTorch's batched products and separate passes):

* the saliency conv (1x1, C -> 1) on the full-resolution map (PyTorch's conv either way);
* ``resample``: the map down to ``s x s`` (the floor: reading the map once);
* ``resample_residual``: a result back up, plus the residual, then a ReLU (the floor: reading the residual
  and writing the output once, a copy's traffic);
* both of them forward and backward (gradients of the map, the sampled map and the residual);
* the adaptive sampler's four matrices from the saliency logits (``triton``: one kernel per axis, its backward
  one more; ``reference``: about 140 small ops each way), forward, and forward and backward;

and, as the floor, a copy of the full-resolution map (``Tensor.copy_``: one read, one write), timed on the same
GPU: the down-sampling cannot take less than half of it, the way back not less than all of it.

Usage (a CUDA GPU):

    python benchmarks/gpu_sampling.py --dtype bfloat16 --json benchmarks/results/gpu_sampling_bfloat16.json
"""

import argparse
from typing import Dict, List

import torch

from timm_ssb.benchmark import SAMPLED_MAPS, machine_info, median_ms, report, require_positive
from timm_ssb.layers import adaptive_matrices, resample, resample_residual, uniform_matrices
from timm_ssb.layers.native import get_sampling_backend, set_sampling_backend
from timm_ssb.layers.samplers import DEFAULT_SIGMA_G

BACKENDS = ('triton', 'reference')


def stage_row(stage: str, channels: int, side: int, size: int, args: argparse.Namespace) -> Dict[str, object]:
    dtype = getattr(torch, args.dtype)
    x = torch.randn(args.batch_size, channels, side, side, device='cuda', dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    down_y, down_x, up_y, up_x = uniform_matrices(x, size, 0.5 / size, 0.5 / size)
    saliency = torch.nn.Conv2d(channels, 1, 1).to('cuda', dtype).to(memory_format=torch.channels_last)
    copy = torch.empty_like(x)
    row: Dict[str, object] = {
        'stage': stage,
        'channels': channels,
        'side': side,
        'size': size,
        'map_mb': x.numel() * x.element_size() / 2**20,
        'copy_ms': median_ms(lambda: copy.copy_(x), args.repeats, 'cuda'),
    }
    with torch.no_grad():
        row['saliency_ms'] = median_ms(lambda: saliency(x), args.repeats, 'cuda')
        z = resample(x, down_y, down_x)
        logits = saliency(x).float()  # a randomly initialised conv's: not the uniform sampler's constant logits
    logits_grad = logits.detach().requires_grad_()
    x_grad = x.detach().requires_grad_()
    for backend in BACKENDS:
        set_sampling_backend(backend)
        with torch.no_grad():
            row[f'{backend}_down_ms'] = median_ms(lambda: resample(x, down_y, down_x), args.repeats, 'cuda')
            row[f'{backend}_up_ms'] = median_ms(lambda: resample_residual(z, up_y, up_x, x, True), args.repeats, 'cuda')

        def forward_backward() -> None:
            z = resample(x_grad, down_y, down_x) * 2.0
            resample_residual(z, up_y, up_x, x_grad, True).sum().backward()

        row[f'{backend}_forward_backward_ms'] = median_ms(forward_backward, args.repeats, 'cuda')

        def matrices_forward_backward() -> None:
            matrices = adaptive_matrices(logits_grad, size, DEFAULT_SIGMA_G, 0.5 / size, 0.5 / size)
            sum(m.sum() for m in matrices).backward()

        with torch.no_grad():
            row[f'{backend}_matrices_ms'] = median_ms(
                lambda: adaptive_matrices(logits, size, DEFAULT_SIGMA_G, 0.5 / size, 0.5 / size), args.repeats, 'cuda'
            )
        row[f'{backend}_matrices_forward_backward_ms'] = median_ms(matrices_forward_backward, args.repeats, 'cuda')
    return row


def format_rows(rows: List[Dict[str, object]]) -> str:
    header = f'{"stage":<7} {"C":>5} {"H=W":>4} {"s":>3} {"map MB":>7} {"copy ms":>8} {"saliency":>9} ' + ' '.join(
        f'{f"{b} down":>12} {f"{b} up":>10} {f"{b} f+b":>11} {f"{b} mat":>11} {f"{b} mat f+b":>15}' for b in BACKENDS
    )
    lines = [header, '-' * len(header)]
    for r in rows:
        cells = ' '.join(
            f'{r[f"{b}_down_ms"]:>12.3f} {r[f"{b}_up_ms"]:>10.3f} {r[f"{b}_forward_backward_ms"]:>11.3f} '
            f'{r[f"{b}_matrices_ms"]:>11.3f} {r[f"{b}_matrices_forward_backward_ms"]:>15.3f}'
            for b in BACKENDS
        )
        lines.append(
            f'{r["stage"]:<7} {r["channels"]:>5} {r["side"]:>4} {r["size"]:>3} {r["map_mb"]:>7.1f} '
            f'{r["copy_ms"]:>8.3f} {r["saliency_ms"]:>9.3f} {cells}'
        )
    lines.append('ms, median; floors: down >= copy / 2 (one read of the map), up >= copy (one read, one write);')
    lines.append('mat: the adaptive matrices from the saliency logits, forward (no grad) and forward + backward')
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch-size', type=int, default=256)
    parser.add_argument('--dtype', choices=['bfloat16', 'float16', 'float32'], default='bfloat16')
    parser.add_argument('--repeats', type=int, default=30)
    parser.add_argument('--json', default=None, help='write the rows, settings and machine here')
    args = parser.parse_args()
    require_positive(parser, args, 'batch_size', 'repeats')
    if not torch.cuda.is_available():
        parser.error('needs a CUDA GPU')
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference's fp32 products at full precision, like the kernel
    saved = get_sampling_backend()
    try:
        rows = [stage_row(stage, channels, side, size, args) for stage, channels, side, size in SAMPLED_MAPS]
    finally:
        set_sampling_backend(saved)
    machine = machine_info('cuda')
    header = f'sampling on {machine.get("gpu")}, batch {args.batch_size}, {args.dtype}, channels_last'
    report(f'{header}\n{format_rows(rows)}', args.json, {'settings': vars(args), 'machine': machine, 'results': rows})


if __name__ == '__main__':
    main()
