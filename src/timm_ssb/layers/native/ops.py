"""``timm_ssb::separable_resample``: the fused sampling op, with its fake and autograd registrations.

``separable_resample(x, a_y, a_x, residual, relu) = relu?(residual + a_y @ x @ a_x^T)`` per sample and channel,
on channels-last CPU maps in float32 or bfloat16 (float32 accumulation), float32 matrices. It samples a map
down (no residual), maps a result back up with the block's residual add and ReLU (the output written once),
and -- with transposed matrices -- computes the gradients of both. Registered with ``torch.library`` so that
``torch.compile(fullgraph=True)`` keeps it as one op (its fake gives the output's shape, dtype and layout)
and autograd differentiates it through :func:`_backward`.
"""

from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .build import load_cpu_library

__all__ = ['separable_resample']


@torch.library.custom_op('timm_ssb::separable_resample', mutates_args=(), device_types='cpu')
def separable_resample(x: Tensor, a_y: Tensor, a_x: Tensor, residual: Optional[Tensor], relu: bool) -> Tensor:
    """``relu?(residual + a_y @ x @ a_x^T)``: ``x (B, C, H, W)`` channels-last, ``a_y (B, P, H)``,
    ``a_x (B, Q, W)`` contiguous float32, ``residual (B, C, P, Q)`` channels-last or ``None``; the result is
    ``(B, C, P, Q)``, channels-last, in ``x``'s dtype. Raises ``RuntimeError`` if the kernel is not built."""
    if not load_cpu_library():
        raise RuntimeError('timm_ssb: the native CPU sampling kernel is not available (see the warning above)')
    return torch.ops.timm_ssb_cpu.separable_resample(x, a_y, a_x, residual, relu)


@separable_resample.register_fake
def _(x: Tensor, a_y: Tensor, a_x: Tensor, residual: Optional[Tensor], relu: bool) -> Tensor:
    shape = (x.shape[0], x.shape[1], a_y.shape[1], a_x.shape[1])
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


@register_flop_formula(torch.ops.timm_ssb.separable_resample)
def _flops(x_shape, a_y_shape, a_x_shape, residual_shape, relu, *args, **kwargs) -> int:
    """The FLOPs of the dense products this op replaces (y axis first, as :func:`resample_reference` and the
    paper count them), so ``FlopCounterMode`` counts a model the same whichever path its sampling takes."""
    batch_size, channels, height, width = x_shape
    rows, cols = a_y_shape[1], a_x_shape[1]
    return 2 * batch_size * channels * rows * width * (height + cols)


def _setup_context(ctx, inputs, output) -> None:
    x, a_y, a_x, residual, relu = inputs
    ctx.relu = relu
    ctx.save_for_backward(x, a_y, a_x, output if relu else None)


def _identity(batch_size: int, length: int, like: Tensor) -> Tensor:
    return torch.eye(length, dtype=torch.float32, device=like.device).expand(batch_size, length, length).contiguous()


def _backward(ctx, grad: Tensor):
    """With ``g`` the output's gradient (zero where the ReLU cut): ``x`` gets ``a_y^T g a_x`` (the same op,
    transposed matrices), the residual ``g``; the matrices get products of ``g`` and ``x`` each resampled along
    the other axis (``torch.bmm``), only when they need gradients (a learned sampler)."""
    x, a_y, a_x, out = ctx.saved_tensors
    if ctx.relu:
        grad = torch.ops.aten.threshold_backward(grad, out, 0)
    grad = grad.to(x.dtype).contiguous(memory_format=torch.channels_last)
    batch_size, channels, height, width = x.shape
    rows, cols = a_y.shape[1], a_x.shape[1]
    a_y_t, a_x_t = a_y.transpose(1, 2).contiguous(), a_x.transpose(1, 2).contiguous()
    grad_x = grad_a_y = grad_a_x = None
    if ctx.needs_input_grad[0]:
        grad_x = separable_resample(grad, a_y_t, a_x_t, None, False)
    if ctx.needs_input_grad[1]:
        along_x = separable_resample(grad, _identity(batch_size, rows, x), a_x_t, None, False)  # (B, C, P, W)
        grad_a_y = torch.bmm(
            along_x.permute(0, 2, 3, 1).reshape(batch_size, rows, width * channels),
            x.permute(0, 2, 3, 1).reshape(batch_size, height, width * channels).transpose(1, 2),
        ).float()
    if ctx.needs_input_grad[2]:
        along_y = separable_resample(x, a_y, _identity(batch_size, width, x), None, False)  # (B, C, P, W)
        grad_a_x = torch.bmm(
            grad.permute(0, 2, 3, 1).reshape(batch_size * rows, cols, channels),
            along_y.permute(0, 2, 3, 1).reshape(batch_size * rows, width, channels).transpose(1, 2),
        )
        grad_a_x = grad_a_x.view(batch_size, rows, cols, width).sum(1).float()
    grad_residual = grad if ctx.needs_input_grad[3] else None
    return grad_x, grad_a_y, grad_a_x, grad_residual, None


separable_resample.register_autograd(_backward, setup_context=_setup_context)
