"""The Triton kernel of ``separable_resample``: ``relu?(residual + matrix_y @ x @ matrix_x^T)`` in one pass.

Imported only when the op first runs on a Triton path (Triton is optional; ``TRITON_INTERPRET`` is read when the
kernel is defined, i.e. at this module's import).

One program computes one output row ``p`` of one sample for a tile of ``BLOCK_Q`` columns and ``BLOCK_C``
channels, all in registers:

1. the band of ``matrix_y``'s row ``p`` (its first and last nonzero tap) and the band of columns the tile's rows of
   ``matrix_x`` touch, from the matrices themselves (no host sync, no data-dependent shapes);
2. for each chunk of ``BLOCK_W`` input columns in that band: ``t = sum_h matrix_y[p, h] * x[h, chunk, :]`` over the
   band's rows (float32), then ``acc += matrix_x[tile, chunk] @ t`` (``tl.dot``);
3. the residual added, the ReLU applied, the tile written once.

So the map is read only where the matrices have weight, the residual once and the output written once. The
``tl.dot`` runs in float32 at full precision (``'ieee'``) for float32 maps and in TF32 for 16-bit maps; it
accumulates in float32 (why: docs/kernels.md).
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.jit import JITFunction

__all__ = ['separable_resample_kernel', 'launch', 'INTERPRETED']


@triton.jit
def separable_resample_kernel(
    x_ptr,
    matrix_y_ptr,
    matrix_x_ptr,
    residual_ptr,
    out_ptr,
    channels,
    height,
    width,
    rows,
    cols,
    x_stride_b,
    x_stride_c,
    x_stride_h,
    x_stride_w,
    residual_stride_b,
    residual_stride_c,
    residual_stride_p,
    residual_stride_q,
    out_stride_b,
    out_stride_c,
    out_stride_p,
    out_stride_q,
    HAS_RESIDUAL: tl.constexpr,
    RELU: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    sample_row = tl.program_id(0)  # b * rows + p
    b = (sample_row // rows).to(tl.int64)
    p = sample_row % rows
    qs = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    cs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    q_in = qs < cols
    c_in = cs < channels

    # The rows of x that matrix_y's row p weighs: [h_lo, h_hi).
    matrix_y_row = matrix_y_ptr + sample_row.to(tl.int64) * height
    hs = tl.arange(0, BLOCK_H)
    taps = tl.load(matrix_y_row + hs, mask=hs < height, other=0.0)
    h_lo = tl.min(tl.where(taps != 0.0, hs, BLOCK_H), axis=0)
    h_hi = tl.max(tl.where(taps != 0.0, hs + 1, 0), axis=0)

    # The columns of x that the tile's rows of matrix_x weigh: [w_lo, w_hi).
    matrix_x_tile = matrix_x_ptr + b * cols * width + qs[:, None] * width
    w_lo = width
    w_hi = 0
    for w0 in range(0, width, BLOCK_W):
        ws = w0 + tl.arange(0, BLOCK_W)
        weights = tl.load(matrix_x_tile + ws[None, :], mask=q_in[:, None] & (ws < width)[None, :], other=0.0)
        w_lo = tl.minimum(w_lo, tl.min(tl.min(tl.where(weights != 0.0, ws[None, :], width), axis=1), axis=0))
        w_hi = tl.maximum(w_hi, tl.max(tl.max(tl.where(weights != 0.0, ws[None, :] + 1, 0), axis=1), axis=0))

    x_sample = x_ptr + b * x_stride_b + cs[None, :] * x_stride_c
    acc = tl.zeros((BLOCK_Q, BLOCK_C), dtype=tl.float32)
    for w0 in range(w_lo, w_hi, BLOCK_W):
        ws = w0 + tl.arange(0, BLOCK_W)
        w_in = ws < w_hi
        x_chunk = x_sample + ws[:, None] * x_stride_w
        chunk_mask = w_in[:, None] & c_in[None, :]
        t = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
        for h in range(h_lo, h_hi):
            tap = tl.load(matrix_y_row + h)
            t += tap * tl.load(x_chunk + h * x_stride_h, mask=chunk_mask, other=0.0).to(tl.float32)
        weights = tl.load(matrix_x_tile + ws[None, :], mask=q_in[:, None] & w_in[None, :], other=0.0)
        acc += tl.dot(weights, t, input_precision=DOT_PRECISION)

    out_mask = q_in[:, None] & c_in[None, :]
    if HAS_RESIDUAL:
        residual = residual_ptr + b * residual_stride_b + p * residual_stride_p
        offsets = qs[:, None] * residual_stride_q + cs[None, :] * residual_stride_c
        acc += tl.load(residual + offsets, mask=out_mask, other=0.0).to(tl.float32)
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # NaN stays NaN, as torch.relu keeps it
    out = out_ptr + b * out_stride_b + p * out_stride_p
    tl.store(out + qs[:, None] * out_stride_q + cs[None, :] * out_stride_c, acc.to(out_ptr.dtype.element_ty), out_mask)


INTERPRETED = not isinstance(separable_resample_kernel, JITFunction)
"""Whether Triton's interpreter defined the kernel (``TRITON_INTERPRET`` at this module's import): then it runs
CPU tensors, as NumPy, and only then."""


def _block(length: int, largest: int) -> int:
    """A power-of-two tile edge covering ``length`` up to ``largest``, at least 16 (``tl.dot``'s smallest)."""
    return max(16, min(largest, triton.next_power_of_2(length)))


def launch(x: Tensor, matrix_y: Tensor, matrix_x: Tensor, residual: Optional[Tensor], relu: bool) -> Tensor:
    """Launch the kernel: ``x (B, C, H, W)`` any strides, ``matrix_y (B, P, H)`` and ``matrix_x (B, Q, W)`` contiguous
    float32, ``residual (B, C, P, Q)`` or ``None``; returns ``(B, C, P, Q)`` channels-last in ``x``'s dtype."""
    batch_size, channels, height, width = x.shape
    rows, cols = matrix_y.shape[1], matrix_x.shape[1]
    out = torch.empty(
        (batch_size, channels, rows, cols), dtype=x.dtype, device=x.device, memory_format=torch.channels_last
    )
    if out.numel() == 0:
        return out
    block_q, block_c = _block(cols, 64), _block(channels, 32)
    grid = (batch_size * rows, triton.cdiv(cols, block_q), triton.cdiv(channels, block_c))
    res = residual if residual is not None else out  # not read without a residual
    separable_resample_kernel[grid](
        x,
        matrix_y,
        matrix_x,
        res,
        out,
        channels,
        height,
        width,
        rows,
        cols,
        *x.stride(),
        *res.stride(),
        *out.stride(),
        HAS_RESIDUAL=residual is not None,
        RELU=relu,
        DOT_PRECISION='ieee' if x.dtype == torch.float32 else 'tf32',
        BLOCK_H=triton.next_power_of_2(max(height, 16)),
        BLOCK_W=_block(width, 64),
        BLOCK_Q=block_q,
        BLOCK_C=block_c,
    )
    return out
