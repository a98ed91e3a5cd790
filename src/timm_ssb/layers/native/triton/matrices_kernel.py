"""The Triton kernels of the adaptive sampler's matrices on a GPU, forward and backward.

Built from the saliency logits in PyTorch, the four matrices take about 140 small tensor ops per SSB block. On a
GPU each is a kernel launch of a few microseconds of work, and the host, launching them one after another, sets
the pace: on an H200 an SSB block took about 2 ms whatever its map's size. This kernel computes, for one axis of
one sample per program, what :func:`timm_ssb.layers.sampling_matrices.adaptive_matrices` computes (the same
float32 maths, in registers): the log-saliency marginal along the axis, the positions the saliency attracts the
samples to (:func:`~timm_ssb.layers.sampling_matrices.saliency_positions`, with its replicate-padded extension of
the marginal) and the two Gaussian matrices at those positions
(:func:`~timm_ssb.layers.sampling_matrices.gaussian_matrices`). Two launches (one per axis) replace the 140 ops.
The backward is one more launch, one program per sample: it recomputes both axes and takes the matrices'
gradients back to the logits. Imported with the resampling kernel (:data:`.triton_kernels`).
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...tail_cuts import KERNEL_WEIGHT_LOG, SMALLEST_WEIGHT_LOG

__all__ = ['axis_matrices_kernel', 'matrices_backward_kernel', 'fits', 'launch', 'launch_backward']

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
def _axis_positions(
    logits,
    length,
    across,
    stride_along,
    stride_across,
    size,
    sigma_g,
    BLOCK_EXTENDED: tl.constexpr,
    BLOCK_ACROSS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One sample's positions along one axis (saliency_positions): ``(weights (s, 3L), extended (3L), unclamped (s),
    positions (s))``, with ``weights`` the saliency-weighted neighbourhoods of the uniform targets."""
    # The logits as (extended index j along the axis, index across), j in [0, 3L): row j holds the logits of
    # pixel clamp(j - L, 0, L - 1), the replicate padding of the reference's marginal.
    js = tl.arange(0, BLOCK_EXTENDED)
    j_in = js < 3 * length
    rows = tl.minimum(tl.maximum(js - length, 0), length - 1)
    ks = tl.arange(0, BLOCK_ACROSS)
    mask = j_in[:, None] & (ks < across)[None, :]
    values = tl.load(logits + rows[:, None] * stride_along + ks[None, :] * stride_across, mask=mask, other=0.0)
    values = tl.where(mask, values, float('-inf'))
    # A NaN or +inf logit makes the reference's log-softmax NaN for the whole sample: so its matrices here.
    not_finite = mask & ((values != values) | (values == float('inf')))
    poisoned = tl.sum(tl.sum(not_finite.to(tl.int32), axis=1), axis=0) > 0
    # The log marginal along the axis less its largest, as the reference has it (logsumexp across; the
    # log-softmax's normaliser, which the reference subtracts first, cancels in that difference).
    row_peak = tl.max(values, axis=1)
    row_peak = tl.where(j_in, row_peak, 0.0)
    row_sum = tl.where(j_in, tl.sum(tl.exp(values - row_peak[:, None]), axis=1), 1.0)
    log_marginal = tl.where(j_in, tl.log(row_sum) + row_peak, float('-inf'))
    log_marginal = log_marginal - tl.max(tl.where(j_in, log_marginal, float('-inf')), axis=0)

    # u_i = p_i + sum_j (w_ij - w0_ij) q_j.
    i_s = tl.arange(0, BLOCK_SIZE)
    targets = (i_s.to(tl.float32) + 0.5) / size
    extended = ((js - length).to(tl.float32) + 0.5) / length
    offsets = targets[:, None] - extended[None, :]
    kernel = tl.where(j_in[None, :], offsets * offsets * (-0.5 / (sigma_g * sigma_g)), float('-inf'))
    weights = _tailless_softmax(log_marginal[None, :] + kernel, 1, POSITIONS_CUT)
    uniform_weights = _tailless_softmax(kernel, 1, POSITIONS_CUT)
    shift = tl.sum(tl.where(j_in[None, :], (weights - uniform_weights) * extended[None, :], 0.0), axis=1)
    unclamped = tl.where(poisoned, float('nan'), targets + shift)
    positions = tl.where(poisoned, float('nan'), tl.minimum(tl.maximum(unclamped, 0.0), 1.0))  # (min/max drop NaN)
    return weights, extended, unclamped, positions


@triton.jit
def _axis_gaussians(
    positions, length, size, sigma_down, sigma_up, BLOCK_LENGTH: tl.constexpr, BLOCK_SIZE: tl.constexpr
):
    """The Gaussian matrices at the positions (gaussian_matrices), both as (s, L): ``down`` a softmax over L, ``up``
    (stored transposed) over s; and ``u_i - c_l``."""
    i_s = tl.arange(0, BLOCK_SIZE)
    ls = tl.arange(0, BLOCK_LENGTH)
    both_in = (i_s < size)[:, None] & (ls < length)[None, :]
    offsets = positions[:, None] - ((ls.to(tl.float32) + 0.5) / length)[None, :]
    sq_dist = offsets * offsets
    down = _tailless_softmax(
        tl.where(both_in, sq_dist * (-0.5 / (sigma_down * sigma_down)), float('-inf')), 1, MATRICES_CUT
    )
    up = _tailless_softmax(tl.where(both_in, sq_dist * (-0.5 / (sigma_up * sigma_up)), float('-inf')), 0, MATRICES_CUT)
    return down, up, offsets, both_in


@triton.jit
def axis_matrices_kernel(
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
    _, _, _, positions = _axis_positions(
        logits, length, across, stride_along, stride_across, size, sigma_g, BLOCK_EXTENDED, BLOCK_ACROSS, BLOCK_SIZE
    )
    down, up, _, both_in = _axis_gaussians(positions, length, size, sigma_down, sigma_up, BLOCK_LENGTH, BLOCK_SIZE)
    i_s = tl.arange(0, BLOCK_SIZE)
    ls = tl.arange(0, BLOCK_LENGTH)
    tl.store(down_ptr + b * size * length + i_s[:, None] * length + ls[None, :], down, mask=both_in)
    tl.store(up_ptr + b * length * size + ls[None, :] * size + i_s[:, None], up, mask=both_in)


@triton.jit
def _axis_marginal_gradient(
    logits,
    grad_down,
    grad_up,
    length,
    across,
    stride_along,
    stride_across,
    size,
    sigma_g,
    sigma_down,
    sigma_up,
    HAS_GRAD_DOWN: tl.constexpr,
    HAS_GRAD_UP: tl.constexpr,
    BLOCK_EXTENDED: tl.constexpr,
    BLOCK_ACROSS: tl.constexpr,
    BLOCK_LENGTH: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """The gradient of one axis's log marginal (L) from its matrices' gradients: through the Gaussian softmaxes,
    the clamp (passing at the bounds, as ``torch.clamp``) and the neighbourhood softmaxes (the marginal's largest,
    subtracted before them, gets none: each softmax row's gradient sums to zero)."""
    weights, extended, unclamped, positions = _axis_positions(
        logits, length, across, stride_along, stride_across, size, sigma_g, BLOCK_EXTENDED, BLOCK_ACROSS, BLOCK_SIZE
    )
    down, up, offsets, both_in = _axis_gaussians(
        positions, length, size, sigma_down, sigma_up, BLOCK_LENGTH, BLOCK_SIZE
    )
    i_s = tl.arange(0, BLOCK_SIZE)
    ls = tl.arange(0, BLOCK_LENGTH)
    d_positions = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    if HAS_GRAD_DOWN:  # down[i, l] = softmax_l(-a (u_i - c_l)^2)
        g = tl.load(grad_down + i_s[:, None] * length + ls[None, :], mask=both_in, other=0.0)
        d_logit = down * (g - tl.sum(down * g, axis=1, keep_dims=True))
        d_positions += tl.sum(d_logit * offsets, axis=1) * (-1.0 / (sigma_down * sigma_down))
    if HAS_GRAD_UP:  # up[l, i] = softmax_i(-a (u_i - c_l)^2), held as (s, L)
        g = tl.load(grad_up + ls[None, :] * size + i_s[:, None], mask=both_in, other=0.0)
        d_logit = up * (g - tl.sum(up * g, axis=0, keep_dims=True))
        d_positions += tl.sum(d_logit * offsets, axis=1) * (-1.0 / (sigma_up * sigma_up))
    d_positions = tl.where((unclamped >= 0.0) & (unclamped <= 1.0), d_positions, 0.0)
    # u_i depends on the extended log marginal z_j through w_ij: d u_i / d z_j = w_ij (e_j - mean_i).
    means = tl.sum(weights * extended[None, :], axis=1)
    d_extended = tl.sum(weights * (extended[None, :] - means[:, None]) * d_positions[:, None], axis=0)
    # Extended point j replicates pixel clamp(j - L, 0, L - 1): gather its gradient back to the pixel.
    js = tl.arange(0, BLOCK_EXTENDED)
    sources = tl.minimum(tl.maximum(js - length, 0), length - 1)
    replicates = (sources[None, :] == ls[:, None]) & (js < 3 * length)[None, :]
    return tl.sum(tl.where(replicates, d_extended[None, :], 0.0), axis=1)


@triton.jit
def matrices_backward_kernel(
    logits_ptr,
    grad_down_y_ptr,
    grad_down_x_ptr,
    grad_up_y_ptr,
    grad_up_x_ptr,
    grad_logits_ptr,
    height,
    width,
    size,
    sigma_g,
    sigma_down,
    sigma_up,
    HAS_GRAD_DOWN_Y: tl.constexpr,
    HAS_GRAD_DOWN_X: tl.constexpr,
    HAS_GRAD_UP_Y: tl.constexpr,
    HAS_GRAD_UP_X: tl.constexpr,
    BLOCK_EXTENDED_Y: tl.constexpr,
    BLOCK_EXTENDED_X: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    logits = logits_ptr + b * height * width
    d_marginal_y = _axis_marginal_gradient(
        logits,
        grad_down_y_ptr + b * size * height,
        grad_up_y_ptr + b * height * size,
        height,
        width,
        width,
        1,
        size,
        sigma_g,
        sigma_down,
        sigma_up,
        HAS_GRAD_DOWN_Y,
        HAS_GRAD_UP_Y,
        BLOCK_EXTENDED_Y,
        BLOCK_W,
        BLOCK_H,
        BLOCK_SIZE,
    )
    d_marginal_x = _axis_marginal_gradient(
        logits,
        grad_down_x_ptr + b * size * width,
        grad_up_x_ptr + b * width * size,
        width,
        height,
        1,
        width,
        size,
        sigma_g,
        sigma_down,
        sigma_up,
        HAS_GRAD_DOWN_X,
        HAS_GRAD_UP_X,
        BLOCK_EXTENDED_X,
        BLOCK_H,
        BLOCK_W,
        BLOCK_SIZE,
    )
    # The log marginals are log-sum-exps of the log-saliency map along each axis: d lm_y[h] / d ls[h, w] is row
    # h's softmax, likewise for columns; then the log-softmax over all positions takes the logits to ls.
    hs = tl.arange(0, BLOCK_H)
    ws = tl.arange(0, BLOCK_W)
    mask = (hs < height)[:, None] & (ws < width)[None, :]
    offsets = hs[:, None] * width + ws[None, :]
    values = tl.load(logits + offsets, mask=mask, other=float('-inf'))
    e = tl.exp(values - tl.max(tl.max(values, axis=1), axis=0))
    row_sums = tl.sum(e, axis=1)
    col_sums = tl.sum(e, axis=0)
    d_saliency = e * (
        d_marginal_y[:, None] / tl.where(row_sums > 0.0, row_sums, 1.0)[:, None]
        + d_marginal_x[None, :] / tl.where(col_sums > 0.0, col_sums, 1.0)[None, :]
    )
    total = tl.sum(tl.sum(e, axis=1), axis=0)
    d_logits = d_saliency - e / total * tl.sum(tl.sum(d_saliency, axis=1), axis=0)
    tl.store(grad_logits_ptr + b * height * width + offsets, d_logits, mask=mask)


MAX_TILE = 1 << 16
"""The most values (the extended axis by the other, each rounded up to a power of two) one program holds in
registers. Maps up to 128 x 128 fit (a ResNet-D's layer2 at inputs up to 1024 x 1024); larger ones take PyTorch's
ops."""


def fits(height: int, width: int) -> bool:
    """Whether the kernel takes ``(B, H, W)`` logits (:data:`MAX_TILE`)."""
    tile = max(triton.next_power_of_2(3 * a) * triton.next_power_of_2(b) for a, b in ((height, width), (width, height)))
    return tile <= MAX_TILE


def launch(
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
            axis_matrices_kernel[(batch_size,)](
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


def launch_backward(
    logits: Tensor,
    grads: Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]],
    size: int,
    sigma_g: float,
    sigma_down: float,
    sigma_up: float,
) -> Tensor:
    """The logits' gradient from the gradients of ``(down_y, down_x, up_y, up_x)`` (``None``: zero), recomputing
    the forward; one program per sample."""
    batch_size, height, width = logits.shape
    grad_logits = torch.empty_like(logits)
    if batch_size:
        given = [g.float().contiguous() if g is not None else logits for g in grads]  # not read where None
        matrices_backward_kernel[(batch_size,)](
            logits,
            *given,
            grad_logits,
            height,
            width,
            size,
            float(sigma_g),
            float(sigma_down),
            float(sigma_up),
            HAS_GRAD_DOWN_Y=grads[0] is not None,
            HAS_GRAD_DOWN_X=grads[1] is not None,
            HAS_GRAD_UP_Y=grads[2] is not None,
            HAS_GRAD_UP_X=grads[3] is not None,
            BLOCK_EXTENDED_Y=triton.next_power_of_2(3 * height),
            BLOCK_EXTENDED_X=triton.next_power_of_2(3 * width),
            BLOCK_H=triton.next_power_of_2(height),
            BLOCK_W=triton.next_power_of_2(width),
            BLOCK_SIZE=triton.next_power_of_2(size),
        )
    return grad_logits
