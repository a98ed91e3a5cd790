"""The Triton kernel of the adaptive sampler's matrices, for inference on a GPU.

Built from the saliency logits in PyTorch, the four matrices take about 140 small tensor ops per SSB block. On a
GPU each is a kernel launch of a few microseconds of work, and the host, launching them one after another, sets
the pace: on an H200 an SSB block took about 2 ms whatever its map's size. This kernel computes, for one axis of
one sample per program, what :func:`timm_ssb.layers.sampling_matrices.adaptive_matrices` computes (the same
float32 maths, in registers): the log-saliency marginal along the axis, the positions the saliency attracts the
samples to (:func:`~timm_ssb.layers.sampling_matrices.saliency_positions`, with its replicate-padded extension of
the marginal) and the two Gaussian matrices at those positions
(:func:`~timm_ssb.layers.sampling_matrices.gaussian_matrices`). Two launches (one per axis) replace the 140 ops.

It has no backward: the sampler uses it only where no gradient is needed, and PyTorch's ops otherwise.
Imported with the resampling kernel (:func:`.ops.load_triton_kernels`).
"""

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ['adaptive_matrices', 'fits']

from ..sampling_matrices import KERNEL_WEIGHT_LOG, SMALLEST_WEIGHT_LOG

# The softmax cuts, as the kernel reads globals: the saliency positions' and the Gaussian matrices'.
POSITIONS_CUT = tl.constexpr(SMALLEST_WEIGHT_LOG)
MATRICES_CUT = tl.constexpr(KERNEL_WEIGHT_LOG)


@triton.jit
def _tailless_softmax(logits, axis: tl.constexpr, smallest_weight_log: tl.constexpr):
    """``softmax(logits, axis)`` with entries below ``exp(smallest_weight_log)`` of the largest set to zero
    (``-inf`` entries are masked-out ones)."""
    peak = tl.max(logits, axis=axis, keep_dims=True)
    peak = tl.where(peak == float('-inf'), 0.0, peak)  # a row wholly masked out: zeros, not NaNs
    logits = tl.where(logits < peak + smallest_weight_log, float('-inf'), logits)
    weights = tl.exp(logits - peak)
    total = tl.sum(weights, axis=axis, keep_dims=True)
    return weights / tl.where(total == 0.0, 1.0, total)


@triton.jit
def _axis_matrices_kernel(
    logits_ptr,
    down_ptr,
    up_ptr,
    length,
    across,
    stride_along,
    stride_across,
    size,
    sigma_g,
    sigma_down,
    sigma_up,
    BLOCK_EXTENDED: tl.constexpr,
    BLOCK_ACROSS: tl.constexpr,
    BLOCK_LENGTH: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    logits = logits_ptr + b * length * across

    # The logits as (extended index j along the axis, index across), j in [0, 3L): row j holds the logits of
    # pixel clamp(j - L, 0, L - 1), the replicate padding of the reference's marginal.
    js = tl.arange(0, BLOCK_EXTENDED)
    j_in = js < 3 * length
    rows = tl.minimum(tl.maximum(js - length, 0), length - 1)
    ks = tl.arange(0, BLOCK_ACROSS)
    mask = j_in[:, None] & (ks < across)[None, :]
    values = tl.load(logits + rows[:, None] * stride_along + ks[None, :] * stride_across, mask=mask, other=0.0)
    values = tl.where(mask, values, float('-inf'))
    # The log marginal along the axis less its largest, as the reference has it (logsumexp across; the
    # log-softmax's normaliser, which the reference subtracts first, cancels in that difference).
    row_peak = tl.max(values, axis=1)
    row_peak = tl.where(j_in, row_peak, 0.0)
    row_sum = tl.where(j_in, tl.sum(tl.exp(values - row_peak[:, None]), axis=1), 1.0)
    log_marginal = tl.where(j_in, tl.log(row_sum) + row_peak, float('-inf'))
    log_marginal = log_marginal - tl.max(tl.where(j_in, log_marginal, float('-inf')), axis=0)

    # Positions: u_i = p_i + sum_j (w_ij - w0_ij) q_j (saliency_positions).
    i_s = tl.arange(0, BLOCK_SIZE)
    targets = (i_s.to(tl.float32) + 0.5) / size
    extended = ((js - length).to(tl.float32) + 0.5) / length
    kernel = (
        (targets[:, None] - extended[None, :]) * (targets[:, None] - extended[None, :]) * (-0.5 / (sigma_g * sigma_g))
    )
    kernel = tl.where(j_in[None, :], kernel, float('-inf'))
    weights = _tailless_softmax(log_marginal[None, :] + kernel, 1, POSITIONS_CUT)
    uniform_weights = _tailless_softmax(kernel, 1, POSITIONS_CUT)
    shift = tl.sum(tl.where(j_in[None, :], (weights - uniform_weights) * extended[None, :], 0.0), axis=1)
    positions = tl.minimum(tl.maximum(targets + shift, 0.0), 1.0)

    # The Gaussian matrices at those positions (gaussian_matrices): down (s, L) over L, up (L, s) over s.
    ls = tl.arange(0, BLOCK_LENGTH)
    i_in = i_s < size
    l_in = ls < length
    centres = (ls.to(tl.float32) + 0.5) / length
    sq_dist = (positions[:, None] - centres[None, :]) * (positions[:, None] - centres[None, :])
    both_in = i_in[:, None] & l_in[None, :]
    down = _tailless_softmax(
        tl.where(both_in, sq_dist * (-0.5 / (sigma_down * sigma_down)), float('-inf')), 1, MATRICES_CUT
    )
    up = _tailless_softmax(tl.where(both_in, sq_dist * (-0.5 / (sigma_up * sigma_up)), float('-inf')), 0, MATRICES_CUT)
    tl.store(down_ptr + b * size * length + i_s[:, None] * length + ls[None, :], down, mask=both_in)
    tl.store(up_ptr + b * length * size + ls[None, :] * size + i_s[:, None], up, mask=both_in)


MAX_TILE = 1 << 16
"""The most values (the extended axis by the other, each rounded up to a power of two) one program holds in
registers. Maps up to 128 x 128 fit (a ResNet-D's layer2 at inputs up to 1024 x 1024); larger ones take PyTorch's
ops."""


def fits(height: int, width: int) -> bool:
    """Whether the kernel takes ``(B, H, W)`` logits (:data:`MAX_TILE`)."""
    tile = max(triton.next_power_of_2(3 * a) * triton.next_power_of_2(b) for a, b in ((height, width), (width, height)))
    return tile <= MAX_TILE


def adaptive_matrices(
    logits: Tensor, size: int, sigma_g: float, sigma_down: float, sigma_up: float
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launch the kernel once per axis: ``logits (B, H, W)`` contiguous float32, ``0 < size < min(H, W)``;
    returns ``(down_y (B, s, H), down_x (B, s, W), up_y (B, H, s), up_x (B, W, s))``, float32."""
    batch_size, height, width = logits.shape
    out = []
    for length, across, stride_along, stride_across in ((height, width, width, 1), (width, height, 1, width)):
        down = torch.empty(batch_size, size, length, device=logits.device, dtype=torch.float32)
        up = torch.empty(batch_size, length, size, device=logits.device, dtype=torch.float32)
        if batch_size:
            _axis_matrices_kernel[(batch_size,)](
                logits,
                down,
                up,
                length,
                across,
                stride_along,
                stride_across,
                size,
                float(sigma_g),
                float(sigma_down),
                float(sigma_up),
                BLOCK_EXTENDED=triton.next_power_of_2(3 * length),
                BLOCK_ACROSS=triton.next_power_of_2(across),
                BLOCK_LENGTH=triton.next_power_of_2(length),
                BLOCK_SIZE=triton.next_power_of_2(size),
            )
        out.append((down, up))
    (down_y, up_y), (down_x, up_x) = out
    return down_y, down_x, up_y, up_x
