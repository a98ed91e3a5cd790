"""The Triton kernel of ``separable_resample``: ``relu?(residual + a_y @ x @ a_x^T)`` in one pass.

Imported only when the op first runs on a Triton path (Triton is optional; ``TRITON_INTERPRET`` is read when the
kernel is defined, i.e. at this module's import).

On a GPU the sampling is bound by memory traffic, and the matrix units have arithmetic to spare. So the kernel
does not apply the two matrices one after the other (few operations, but each program re-reading the rows of the
map its output row weighs, from cache, without the matrix units): it applies, per sample, their Kronecker
product ``A[(p, q), (h, w)] = a_y[p, h] * a_x[q, w]`` as one matrix product ``(P*Q, H*W) @ (H*W, C)`` on the
matrix units. One program computes a tile of ``BLOCK_M`` output pixels by ``BLOCK_C`` channels of one sample:

1. the band of input rows the tile's rows of ``a_y`` weigh (first and last nonzero tap), from the matrices
   themselves (no host sync, no data-dependent shapes);
2. for each chunk of ``BLOCK_K`` input pixels in that band: the tile of ``A`` made in registers from the two
   small matrices (never written to memory), then ``acc += A @ x[chunk, channels]`` (``tl.dot``, float32
   accumulation);
3. the residual added, the ReLU applied, the tile written once.

So the map is read about once (only where the matrices have weight), the residual once, and the output written
once. The ``tl.dot`` operands are the map's dtype for 16-bit maps (the weights rounded to it, as the PyTorch
reference's matrix products round them under autocast) and float32 for float32 maps, at full precision
(``'ieee'``) unless PyTorch's float32 matmul precision allows TF32. Under Triton's interpreter 16-bit maps take
float32 operands too (Triton 3.8's interpreter multiplies bfloat16 operands wrongly; the interpreter is how this
kernel is tested without a GPU), so it checks the indexing and the epilogue, and the GPU tests the 16-bit
products.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.jit import JITFunction

__all__ = ['separable_resample', 'INTERPRETED']


@triton.jit
def _separable_resample_kernel(
    x_ptr,
    a_y_ptr,
    a_x_ptr,
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
    DOT_IN_MAP_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    m_tiles = tl.cdiv(rows * cols, BLOCK_M)
    b = (tl.program_id(0) // m_tiles).to(tl.int64)  # a sample's tiles run side by side: they share its map in cache
    ms = (tl.program_id(0) % m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixels p * cols + q
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_in = ms < rows * cols
    c_in = cs < channels
    ps = ms // cols
    qs = ms % cols
    a_y_rows = a_y_ptr + b * rows * height + ps * height
    a_x_rows = a_x_ptr + b * cols * width + qs * width

    # The rows of x that the tile's rows of a_y weigh: [h_lo, h_hi).
    h_lo = height
    h_hi = 0
    for h0 in range(0, height, BLOCK_K):
        hs = h0 + tl.arange(0, BLOCK_K)
        taps = tl.load(a_y_rows[:, None] + hs[None, :], mask=m_in[:, None] & (hs < height)[None, :], other=0.0)
        h_lo = tl.minimum(h_lo, tl.min(tl.min(tl.where(taps != 0.0, hs[None, :], height), axis=1), axis=0))
        h_hi = tl.maximum(h_hi, tl.max(tl.max(tl.where(taps != 0.0, hs[None, :] + 1, 0), axis=1), axis=0))

    x_sample = x_ptr + b * x_stride_b + cs[None, :] * x_stride_c
    k_end = h_hi * width
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for k0 in range(h_lo * width, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # input pixels h * width + w
        k_in = ks < k_end
        hs = ks // width
        ws = ks % width
        a_mask = m_in[:, None] & k_in[None, :]
        a = tl.load(a_y_rows[:, None] + hs[None, :], mask=a_mask, other=0.0)
        a *= tl.load(a_x_rows[:, None] + ws[None, :], mask=a_mask, other=0.0)
        x_tile = tl.load(
            x_sample + hs[:, None] * x_stride_h + ws[:, None] * x_stride_w,
            mask=k_in[:, None] & c_in[None, :],
            other=0.0,
        )
        if DOT_IN_MAP_DTYPE:
            acc += tl.dot(a.to(x_ptr.dtype.element_ty), x_tile)
        else:
            acc += tl.dot(a, x_tile.to(tl.float32), input_precision=DOT_PRECISION)

    out_mask = m_in[:, None] & c_in[None, :]
    if HAS_RESIDUAL:
        residual = residual_ptr + b * residual_stride_b + cs[None, :] * residual_stride_c
        offsets = ps[:, None] * residual_stride_p + qs[:, None] * residual_stride_q
        acc += tl.load(residual + offsets, mask=out_mask, other=0.0).to(tl.float32)
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # NaN stays NaN, as torch.relu keeps it
    out = out_ptr + b * out_stride_b + cs[None, :] * out_stride_c
    offsets = ps[:, None] * out_stride_p + qs[:, None] * out_stride_q
    tl.store(out + offsets, acc.to(out_ptr.dtype.element_ty), out_mask)


INTERPRETED = not isinstance(_separable_resample_kernel, JITFunction)
"""Whether Triton's interpreter defined the kernel (``TRITON_INTERPRET`` at this module's import): then it runs
CPU tensors, as NumPy, and only then."""


def _block(length: int, largest: int) -> int:
    """A power-of-two tile edge covering ``length`` up to ``largest``, at least 16 (``tl.dot``'s smallest)."""
    return max(16, min(largest, triton.next_power_of_2(length)))


def _float32_dot_precision() -> str:
    """``'tf32'`` where PyTorch's float32 matmuls may use TF32 (``torch.backends.cuda.matmul.allow_tf32``, or
    ``torch.set_float32_matmul_precision('high'/'medium')``), else ``'ieee'``."""
    return 'tf32' if torch.backends.cuda.matmul.allow_tf32 and not INTERPRETED else 'ieee'


def separable_resample(x: Tensor, a_y: Tensor, a_x: Tensor, residual: Optional[Tensor], relu: bool) -> Tensor:
    """Launch the kernel: ``x (B, C, H, W)`` any strides, ``a_y (B, P, H)`` and ``a_x (B, Q, W)`` contiguous
    float32, ``residual (B, C, P, Q)`` or ``None``; returns ``(B, C, P, Q)`` channels-last in ``x``'s dtype."""
    batch_size, channels, height, width = x.shape
    rows, cols = a_y.shape[1], a_x.shape[1]
    out = torch.empty(
        (batch_size, channels, rows, cols), dtype=x.dtype, device=x.device, memory_format=torch.channels_last
    )
    if out.numel() == 0:
        return out
    block_m, block_c = _block(rows * cols, 128), _block(channels, 128 if rows * cols > 64 else 64)
    block_k = _block(height * width, 64 if block_m * block_c <= 64 * 64 else 32)
    grid = (batch_size * triton.cdiv(rows * cols, block_m), triton.cdiv(channels, block_c))
    res = residual if residual is not None else out  # not read without a residual
    _separable_resample_kernel[grid](
        x,
        a_y,
        a_x,
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
        DOT_IN_MAP_DTYPE=x.dtype != torch.float32 and not INTERPRETED,
        DOT_PRECISION=_float32_dot_precision() if x.dtype == torch.float32 else 'ieee',
        BLOCK_M=block_m,
        BLOCK_K=block_k,
        BLOCK_C=block_c,
        num_warps=8 if block_m * block_c >= 128 * 128 else 4,
    )
    return out
