"""The adaptive sampler's matrices as one native op: C++ on the CPU, Triton on a GPU.

``adaptive_matrices_cpu(logits, size, sigma_g, sigma_down, sigma_up) -> (down_y, down_x, up_y, up_x)`` (the op
``torch.ops.timm_ssb.adaptive_matrices``) computes what :func:`timm_ssb.layers.sampling_matrices.adaptive_matrices` (the
reference) computes from ``(B, H, W)`` saliency logits, for maps whose two sides are both longer than ``size``: one C++
call (``cpu/matrices.cpp``, built with the resampling kernel by :mod:`.cpu.build`) instead of about a hundred small
tensor ops, whose dispatch is most of what they cost; its backward is one more call, instead of as many small ops again.
float32 and float64 logits; the matrices come out in their dtype.

``adaptive_matrices_triton`` is the same for float32 logits on a GPU (:mod:`.triton.matrices_kernel`: two launches
instead of about 140 ops, whose launches set an eager GPU model's pace), its backward one more launch.
"""

import math
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .cpu.build import cpu_library
from .resample import custom_ops_needed
from .triton import triton_kernels

__all__ = [
    'adaptive_matrices_cpu',
    'adaptive_matrices_cpu_backward',
    'adaptive_matrices_eager',
    'adaptive_matrices_triton',
    'adaptive_matrices_triton_backward',
    'triton_matrices_fit',
]


@torch.library.custom_op('timm_ssb::adaptive_matrices', mutates_args=(), device_types='cpu')
def adaptive_matrices_cpu(
    logits: Tensor, size: int, sigma_g: float, sigma_down: float, sigma_up: float
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(down_y (B, s, H), down_x (B, s, W), up_y (B, H, s), up_x (B, W, s))`` from contiguous ``(B, H, W)``
    float32 or float64 logits, ``0 < size < min(H, W)``. Raises ``RuntimeError`` if the kernels are not built."""
    cpu_library.require()
    down_y, down_x, up_y, up_x = torch.ops.timm_ssb_cpu.adaptive_matrices(logits, size, sigma_g, sigma_down, sigma_up)
    return down_y, down_x, up_y, up_x


@torch.library.custom_op('timm_ssb::adaptive_matrices_backward', mutates_args=(), device_types='cpu')
def adaptive_matrices_cpu_backward(
    logits: Tensor,
    grad_down_y: Optional[Tensor],
    grad_down_x: Optional[Tensor],
    grad_up_y: Optional[Tensor],
    grad_up_x: Optional[Tensor],
    size: int,
    sigma_g: float,
    sigma_down: float,
    sigma_up: float,
) -> Tensor:
    """The logits' gradient from the matrices' (``None``: zero); the forward is recomputed from the logits."""
    cpu_library.require()
    return torch.ops.timm_ssb_cpu.adaptive_matrices_backward(
        logits, grad_down_y, grad_down_x, grad_up_y, grad_up_x, size, sigma_g, sigma_down, sigma_up
    )


@adaptive_matrices_cpu.register_fake
def _adaptive_matrices_fake(
    logits: Tensor, size: int, sigma_g: float, sigma_down: float, sigma_up: float
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    batch_size, height, width = logits.shape
    return (
        logits.new_empty(batch_size, size, height),
        logits.new_empty(batch_size, size, width),
        logits.new_empty(batch_size, height, size),
        logits.new_empty(batch_size, width, size),
    )


@adaptive_matrices_cpu_backward.register_fake
def _adaptive_matrices_backward_fake(logits: Tensor, *args) -> Tensor:
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output) -> None:
    logits, *ctx.args = inputs
    ctx.save_for_backward(logits)


def _backward(ctx, grad_down_y, grad_down_x, grad_up_y, grad_up_x, backward_op=adaptive_matrices_cpu_backward):
    (logits,) = ctx.saved_tensors
    grad = backward_op(logits, grad_down_y, grad_down_x, grad_up_y, grad_up_x, *ctx.args)
    return grad, None, None, None, None


adaptive_matrices_cpu.register_autograd(_backward, setup_context=_setup_context)


class _EagerAdaptiveMatrices(torch.autograd.Function):
    """:func:`adaptive_matrices_cpu` with its backward, for eager mode: the C++ ops called directly."""

    @staticmethod
    def forward(ctx, logits: Tensor, size: int, sigma_g: float, sigma_down: float, sigma_up: float):
        # A matrix without a gradient reaches the backward as None, as it does the custom op's
        ctx.set_materialize_grads(False)
        _setup_context(ctx, (logits, size, sigma_g, sigma_down, sigma_up), None)
        # A tuple: autograd tracks a Function's outputs in a tuple, not in the op's list (Tensor[])
        return tuple(torch.ops.timm_ssb_cpu.adaptive_matrices(logits, size, sigma_g, sigma_down, sigma_up))

    @staticmethod
    @once_differentiable  # as the custom op: no double backward
    def backward(ctx, grad_down_y, grad_down_x, grad_up_y, grad_up_x):
        backward_op = torch.ops.timm_ssb_cpu.adaptive_matrices_backward
        return _backward(ctx, grad_down_y, grad_down_x, grad_up_y, grad_up_x, backward_op)


def adaptive_matrices_eager(
    logits: Tensor, size: int, sigma_g: float, sigma_down: float, sigma_up: float
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`adaptive_matrices_cpu` in eager mode: the C++ ops called themselves, without the custom op's dispatch
    (:func:`.resample.custom_ops_needed`); the same values and gradients. Raises ``RuntimeError`` if the kernels are
    not built."""
    if custom_ops_needed():
        return adaptive_matrices_cpu(logits, size, sigma_g, sigma_down, sigma_up)
    cpu_library.require()
    if torch.is_grad_enabled() and logits.requires_grad:
        return _EagerAdaptiveMatrices.apply(logits, size, sigma_g, sigma_down, sigma_up)
    return tuple(torch.ops.timm_ssb_cpu.adaptive_matrices(logits, size, sigma_g, sigma_down, sigma_up))


def _check_triton_arguments(
    logits: Tensor, size: int, sigma_g: float, sigma_down: float, sigma_up: float, **grads: Optional[Tensor]
) -> None:
    """The Triton kernels do not bound their reads: the arguments are checked here, each error naming one."""
    if logits.device.type == 'cpu' and not triton_kernels.require().resample.INTERPRETED:
        raise RuntimeError("timm_ssb: the Triton matrices kernel runs CPU tensors only under Triton's interpreter")
    if logits.dtype != torch.float32 or logits.dim() != 3 or not logits.is_contiguous():
        raise ValueError(f'logits must be contiguous float32 (B, H, W); got {logits.dtype} {list(logits.shape)}')
    batch_size, height, width = logits.shape
    if not 0 < size < min(height, width):
        raise ValueError(f'size must be in (0, {min(height, width)}) for logits of shape {list(logits.shape)}')
    for name, sigma in (('sigma_g', sigma_g), ('sigma_down', sigma_down), ('sigma_up', sigma_up)):
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f'{name} must be a positive finite number; got {sigma}')
    shapes = {
        'grad_down_y': [batch_size, size, height],
        'grad_down_x': [batch_size, size, width],
        'grad_up_y': [batch_size, height, size],
        'grad_up_x': [batch_size, width, size],
    }
    for name, grad in grads.items():
        if grad is not None and (list(grad.shape) != shapes[name] or grad.device != logits.device):
            raise ValueError(
                f'{name} must be {shapes[name]} on {logits.device}; got {list(grad.shape)} on {grad.device}'
            )


@torch.library.custom_op('timm_ssb::adaptive_matrices_triton', mutates_args=())
def adaptive_matrices_triton(
    logits: Tensor, size: int, sigma_g: float, sigma_down: float, sigma_up: float
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`adaptive_matrices_cpu` in Triton, for contiguous float32 ``(B, H, W)`` logits with ``0 < size < min(H,
    W)`` that :func:`triton_matrices_fit`; on CUDA, or on CPU tensors under Triton's interpreter."""
    module = triton_kernels.require().matrices
    _check_triton_arguments(logits, size, sigma_g, sigma_down, sigma_up)
    return module.launch(logits, size, sigma_g, sigma_down, sigma_up)


@torch.library.custom_op('timm_ssb::adaptive_matrices_triton_backward', mutates_args=())
def adaptive_matrices_triton_backward(
    logits: Tensor,
    grad_down_y: Optional[Tensor],
    grad_down_x: Optional[Tensor],
    grad_up_y: Optional[Tensor],
    grad_up_x: Optional[Tensor],
    size: int,
    sigma_g: float,
    sigma_down: float,
    sigma_up: float,
) -> Tensor:
    """The logits' gradient from the matrices' (``None``: zero), in one Triton launch that recomputes the
    forward."""
    module = triton_kernels.require().matrices
    _check_triton_arguments(
        logits,
        size,
        sigma_g,
        sigma_down,
        sigma_up,
        grad_down_y=grad_down_y,
        grad_down_x=grad_down_x,
        grad_up_y=grad_up_y,
        grad_up_x=grad_up_x,
    )
    grads = (grad_down_y, grad_down_x, grad_up_y, grad_up_x)
    return module.launch_backward(logits, grads, size, sigma_g, sigma_down, sigma_up)


adaptive_matrices_triton.register_fake(_adaptive_matrices_fake)
adaptive_matrices_triton_backward.register_fake(_adaptive_matrices_backward_fake)


def _triton_backward(ctx, grad_down_y, grad_down_x, grad_up_y, grad_up_x):
    (logits,) = ctx.saved_tensors
    grad = adaptive_matrices_triton_backward(logits, grad_down_y, grad_down_x, grad_up_y, grad_up_x, *ctx.args)
    return grad, None, None, None, None


adaptive_matrices_triton.register_autograd(_triton_backward, setup_context=_setup_context)


def triton_matrices_fit(height: int, width: int) -> bool:
    """Whether :func:`adaptive_matrices_triton` takes ``(B, height, width)`` logits (one program holds an axis)."""
    return triton_kernels() and triton_kernels.value.matrices.fits(height, width)
