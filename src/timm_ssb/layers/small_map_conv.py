"""Convolutions on maps of a few positions, computed as matrix products.

An SSB block runs its whole residual branch on the sampled ``s x s`` map, and stage 4's is 3 x 3, 4 x 4 or 5 x 5 with
the paper's sizes: 9-25 positions a sample. oneDNN's convolution (PyTorch's CPU path) is slow on maps that small:
at 4 x 4, 12 of the 16 positions of a 3x3 conv lie on the border, and its blocked kernels are tiled for wider rows
(its 512-channel 3x3 conv ran at half the rate it has at 8 x 8). As the matrix products below, stage 4's three
convs took 0.49 / 0.67 / 0.81x the convs' time at sides 3 / 4 / 5 in float32 (0.47-0.78x with their backward),
0.48-0.77x under bf16 autocast, and 0.68-0.88x with oneDNN and MKL held to AVX2 (Intel Xeon, AVX-512 + AMX, 2
threads, batch 16, channels-last: ``benchmarks/small_map_convs.py``, ``benchmarks/results/cpu_small_map_convs_*``).
From 6 x 6 (stage 3's maps) the products were no faster (1.00-1.64x), chiefly the 3x3 one: hence the rule, a map
of at most :data:`SMALL_MAP_POSITIONS` positions.

A 1x1 conv on a channels-last map is a linear map of its channels: ``F.linear`` on the ``(B, H, W, C)`` view. A 3x3
conv (stride 1, padding 1) is one over the nine shifted copies of the zero-padded map, stacked in the order the
weight's memory has (taps then channels for a channels-last weight, else channels then taps), so the weight is
never copied. Both are differentiable as they stand (autograd's own backward), and run under autocast as the conv
would (``F.linear`` is on autocast's lower-precision list too).
"""

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .samplers import has_forward_hooks
from .sampling_matrices import _exporting, _in_autocast_dtype, _is_channels_last

__all__ = ['SMALL_MAP_POSITIONS', 'conv2d_as_product', 'convs_run_as_products']

SMALL_MAP_POSITIONS = 25
"""The most positions (``H * W``) a map may have for :func:`convs_run_as_products` to take the products."""


@torch.jit.unused
def conv2d_as_product(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=k // 2)`` for a 1x1 or 3x3 ``weight`` (stride 1, no groups or dilation),
    as a matrix product over the channels-last view of ``x``; the result is channels-last.

    Args:
        x: ``(B, C, H, W)`` map; channels-last, else the view is copied.
        weight: ``(O, C, 1, 1)`` or ``(O, C, 3, 3)``, in either memory format.
        bias: ``(O,)`` or ``None``.
    """
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(
            f'x and weight must be 4-D, (B, C, H, W) and (O, C, kH, kW); got {x.dim()}-D and {weight.dim()}-D'
        )
    out_chs, _, kh, kw = weight.shape
    if (kh, kw) == (1, 1):
        return F.linear(x.permute(0, 2, 3, 1), weight.reshape(out_chs, -1), bias).permute(0, 3, 1, 2)
    if (kh, kw) != (3, 3):
        raise ValueError(f'weight must be 1x1 or 3x3, got {kh}x{kw}')
    batch, _, height, width = x.shape
    padded = F.pad(_in_autocast_dtype(x).permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))
    taps = [padded[:, i : i + height, j : j + width] for i in range(3) for j in range(3)]
    if weight.is_contiguous(memory_format=torch.channels_last):  # memory (O, kh, kw, C)
        cols = torch.stack(taps, dim=3)
        matrix = weight.permute(0, 2, 3, 1).reshape(out_chs, -1)
    else:  # memory (O, C, kh, kw)
        cols = torch.stack(taps, dim=4)
        matrix = weight.reshape(out_chs, -1)
    return F.linear(cols.reshape(batch, height, width, -1), matrix, bias).permute(0, 3, 1, 2)


@torch.jit.unused
def convs_run_as_products(convs: Sequence[nn.Module], x: torch.Tensor) -> bool:
    """Whether convs that keep ``x``'s size are computed by :func:`conv2d_as_product` on ``x`` (and maps of its
    size): eager code on the CPU, a channels-last map (not also NCHW-contiguous, as a 1 x 1 map is) of at most
    :data:`SMALL_MAP_POSITIONS` positions, and every conv a plain :class:`~torch.nn.Conv2d` (1x1, or 3x3 with
    padding 1; stride 1, no groups or dilation, zero padding) with no hooks to run. FX tracing (the graph keeps
    the conv modules), TorchScript, exports and ``torch.compile`` call the convs."""
    if (
        torch.fx._symbolic_trace.is_fx_symbolic_tracing()
        or torch.compiler.is_compiling()
        or _exporting()
        or x.device.type != 'cpu'
        or x.dim() != 4
        or x.shape[-2] * x.shape[-1] > SMALL_MAP_POSITIONS
        or not _is_channels_last(x)
    ):
        return False
    return all(_is_plain_conv(conv) for conv in convs)


def _is_plain_conv(conv: nn.Module) -> bool:
    if type(conv) is not nn.Conv2d or has_forward_hooks(conv, include_global=True):
        return False
    shape_padding = {(1, 1): (0, 0), (3, 3): (1, 1)}
    return (
        shape_padding.get(conv.kernel_size) == conv.padding
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == 'zeros'
    )
