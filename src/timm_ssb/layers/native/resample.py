"""The fused sampling ops, with their fake, FLOP and autograd registrations.

``separable_resample(x, matrix_y, matrix_x, residual, relu) = relu?(residual + matrix_y @ x @ matrix_x^T)`` per sample
and channel, float32 matrices, float32 accumulation, the result channels-last in ``x``'s dtype: sampling a map down
(no residual), or mapping a result back up with the block's residual add and ReLU. Two ops with that one schema:

* ``timm_ssb::separable_resample``: the native CPU kernel (C++, :mod:`.cpu.build`), float32 and bfloat16,
  channels-last; differentiated by ``timm_ssb::separable_resample_backward`` (:func:`separable_resample_backward`,
  the whole backward in one call; the matrices' zeros are structural: their gradient is taken on each row's band);
* ``timm_ssb::separable_resample_triton``: the Triton kernel (:mod:`.triton.resample_kernel`), float32, bfloat16
  and float16, any strides; on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1``; differentiated by
  :func:`_backward` (the same op again and ``torch.bmm``).

``timm_ssb::separable_resample_saliency`` (:func:`separable_resample_saliency`) is the C++ op plus a 1x1 conv of its
output, for inference only; ``timm_ssb::separable_resample_into_residual`` (:func:`separable_resample_into_residual`)
the same written into the residual, for inference where the residual is not needed after. None has a double
backward. Registered with ``torch.library`` so that
``torch.compile(fullgraph=True)`` keeps each as one op; in eager mode the fast paths call the C++ ops themselves
(:func:`cpu_ops`, :func:`separable_resample_eager`). Why each is built as it is: docs/kernels.md.
"""

import functools
import types
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.flop_counter import register_flop_formula

from .batched_products import x_matrix_gradient, y_matrix_gradient
from .cpu.build import cpu_library
from .triton import triton_kernels

__all__ = [
    'cpu_ops',
    'custom_ops_needed',
    'separable_resample',
    'separable_resample_backward',
    'separable_resample_eager',
    'separable_resample_into_residual',
    'separable_resample_saliency',
    'separable_resample_triton',
    'TRITON_KERNEL_DTYPES',
]


@torch.library.custom_op('timm_ssb::separable_resample', mutates_args=(), device_types='cpu')
def separable_resample(x: Tensor, matrix_y: Tensor, matrix_x: Tensor, residual: Optional[Tensor], relu: bool) -> Tensor:
    """``relu?(residual + matrix_y @ x @ matrix_x^T)``: ``x (B, C, H, W)`` channels-last, ``matrix_y (B, P, H)``,
    ``matrix_x (B, Q, W)`` contiguous float32, ``residual (B, C, P, Q)`` channels-last or ``None``; the result is
    ``(B, C, P, Q)``, channels-last, in ``x``'s dtype. Raises ``RuntimeError`` if the kernel is not built."""
    cpu_library.require()
    return torch.ops.timm_ssb_cpu.separable_resample(x, matrix_y, matrix_x, residual, relu)


@torch.library.custom_op('timm_ssb::separable_resample_saliency', mutates_args=(), device_types='cpu')
def separable_resample_saliency(
    x: Tensor,
    matrix_y: Tensor,
    matrix_x: Tensor,
    residual: Optional[Tensor],
    relu: bool,
    saliency_weight: Tensor,
    saliency_bias: Tensor,
) -> Tuple[Tensor, Tensor]:
    """:func:`separable_resample`, and a 1x1 conv of its output to one channel (``saliency_weight (C,)``,
    ``saliency_bias (1,)``, float32): ``(out, logits (B, 1, P, Q) float32)``, the conv computed from each output pixel
    while it is in cache. Inference only (no autograd). Raises ``RuntimeError`` if the kernel is not built."""
    cpu_library.require()
    out, logits = torch.ops.timm_ssb_cpu.separable_resample_saliency(
        x, matrix_y, matrix_x, residual, relu, saliency_weight, saliency_bias
    )
    return out, logits


@separable_resample_saliency.register_fake
def _saliency_fake(x, matrix_y, matrix_x, residual, relu, saliency_weight, saliency_bias) -> Tuple[Tensor, Tensor]:
    out = _fake(x, matrix_y, matrix_x, residual, relu)
    return out, matrix_y.new_empty(x.shape[0], 1, matrix_y.shape[1], matrix_x.shape[1])


@torch.library.custom_op('timm_ssb::separable_resample_into_residual', mutates_args=('residual',), device_types='cpu')
def separable_resample_into_residual(
    x: Tensor,
    matrix_y: Tensor,
    matrix_x: Tensor,
    residual: Tensor,
    relu: bool,
    saliency_weight: Optional[Tensor],
    saliency_bias: Optional[Tensor],
) -> Tensor:
    """:func:`separable_resample_saliency` with its output written into ``residual`` (each value where its residual
    value was read), which must not alias ``x``: returns the logits, or an empty tensor without
    ``saliency_weight``/``saliency_bias``. For inference where the residual is dead after the call: it spares a new
    full-resolution tensor. Raises ``RuntimeError`` if the kernel is not built."""
    cpu_library.require()
    return torch.ops.timm_ssb_cpu.separable_resample_into_residual(
        x, matrix_y, matrix_x, residual, relu, saliency_weight, saliency_bias
    )


@separable_resample_into_residual.register_fake
def _into_residual_fake(x, matrix_y, matrix_x, residual, relu, saliency_weight, saliency_bias) -> Tensor:
    if saliency_weight is None:
        return matrix_y.new_empty(0)
    return matrix_y.new_empty(x.shape[0], 1, matrix_y.shape[1], matrix_x.shape[1])


@torch.library.custom_op('timm_ssb::separable_resample_backward', mutates_args=(), device_types='cpu')
def separable_resample_backward(
    grad: Tensor,
    x: Tensor,
    matrix_y: Tensor,
    matrix_x: Tensor,
    out: Optional[Tensor],
    need_x: bool,
    need_matrices: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The backward of :func:`separable_resample` from the output's gradient ``grad`` (channels-last, ``x``'s dtype):
    ``(grad_x, grad_matrix_y, grad_matrix_x, masked_grad)``, the matrices' on their nonzero entries. ``out`` is the
    forward's output where it applied the ReLU (``masked_grad`` is then ``grad`` zeroed where ``out <= 0``: the
    residual's gradient) or ``None`` (then ``masked_grad`` is empty); ``grad_x`` is empty unless ``need_x``, the
    matrices' float32 gradients unless ``need_matrices``. Raises ``RuntimeError`` if the kernels are not built."""
    cpu_library.require()
    return torch.ops.timm_ssb_cpu.separable_resample_backward(grad, x, matrix_y, matrix_x, out, need_x, need_matrices)


@separable_resample_backward.register_fake
def _backward_fake(grad, x, matrix_y, matrix_x, out, need_x, need_matrices) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    def result(like: Tensor, needed: bool, layout: torch.memory_format) -> Tensor:
        if not needed:
            return like.new_empty(0)
        return torch.empty(like.shape, dtype=like.dtype, device=like.device, memory_format=layout)

    return (
        result(x, need_x, torch.channels_last),
        result(matrix_y, need_matrices, torch.contiguous_format),
        result(matrix_x, need_matrices, torch.contiguous_format),
        result(grad, out is not None, torch.channels_last),
    )


@register_flop_formula(torch.ops.timm_ssb.separable_resample_backward)
def _backward_flops(
    grad_shape, x_shape, matrix_y_shape, matrix_x_shape, mask_shape, need_x, need_matrices, *args, **kwargs
):
    """The dense products of the backward: ``u = g matrix_x`` and, as needed, ``matrix_y^T u`` (``x``'s gradient),
    ``<u, x>`` (``matrix_y``'s) and ``matrix_x``'s: mapping down (``height >= rows``, the kernel's pass over ``x``'s
    rows) from ``G = matrix_y^T g`` and ``<x, G>``, else from ``matrix_y x`` and ``<g, matrix_y x>``."""
    batch_size, channels, height, width = x_shape
    rows, cols = matrix_y_shape[1], matrix_x_shape[1]
    macs = rows * width * cols + (rows * height * width if need_x else 0)
    if need_matrices:
        macs += rows * height * width
        macs += height * cols * (rows + width) if height >= rows else rows * width * (height + cols)
    return 2 * batch_size * channels * macs


TRITON_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""The map dtypes the Triton kernel takes (the matrices are float32)."""


@torch.library.custom_op('timm_ssb::separable_resample_triton', mutates_args=())
def separable_resample_triton(
    x: Tensor, matrix_y: Tensor, matrix_x: Tensor, residual: Optional[Tensor], relu: bool
) -> Tensor:
    """``relu?(residual + matrix_y @ x @ matrix_x^T)`` in the Triton kernel: ``x (B, C, H, W)`` float32, bfloat16 or
    float16, any strides, ``matrix_y (B, P, H)``, ``matrix_x (B, Q, W)``, ``residual (B, C, P, Q)`` of ``x``'s dtype or
    ``None``, all on one device; the result is ``(B, C, P, Q)``, channels-last, in ``x``'s dtype. Inputs that do
    not fit are a ``ValueError``/``TypeError`` naming the argument (the kernel does not check its reads)."""
    module = triton_kernels.require().resample
    if x.device.type == 'cpu' and not module.INTERPRETED:
        raise RuntimeError(
            "timm_ssb: the Triton sampling kernel runs CPU tensors only under Triton's interpreter "
            '(TRITON_INTERPRET=1 before its first use); on the CPU the sampling backend "auto" uses the C++ kernel'
        )
    _check_inputs(x, matrix_y, matrix_x, residual)
    return module.launch(x, matrix_y.float().contiguous(), matrix_x.float().contiguous(), residual, relu)


def _check_inputs(x: Tensor, matrix_y: Tensor, matrix_x: Tensor, residual: Optional[Tensor]) -> None:
    if x.dtype not in TRITON_KERNEL_DTYPES:
        raise TypeError(f'x must be float32, bfloat16 or float16; got {x.dtype}')
    if x.dim() != 4:
        raise ValueError(f'x must be a (B, C, H, W) map; got shape {list(x.shape)}')
    batch_size, channels, height, width = x.shape
    for name, matrix, length in (('matrix_y', matrix_y, height), ('matrix_x', matrix_x, width)):
        if matrix.dim() != 3 or matrix.shape[0] != batch_size or matrix.shape[2] != length:
            raise ValueError(
                f'{name} must be ({batch_size}, n, {length}) for x of shape {list(x.shape)}; got {list(matrix.shape)}'
            )
    tensors = {'matrix_y': matrix_y, 'matrix_x': matrix_x}
    if residual is not None:
        expected = [batch_size, channels, matrix_y.shape[1], matrix_x.shape[1]]
        if list(residual.shape) != expected:
            raise ValueError(f"residual must have the output's shape {expected}; got {list(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual must have x's dtype {x.dtype}; got {residual.dtype}")
        tensors['residual'] = residual
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}; got {t.device}")


def _fake(x: Tensor, matrix_y: Tensor, matrix_x: Tensor, residual: Optional[Tensor], relu: bool) -> Tensor:
    shape = (x.shape[0], x.shape[1], matrix_y.shape[1], matrix_x.shape[1])
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


def _flops(x_shape, matrix_y_shape, matrix_x_shape, residual_shape, relu, *args, **kwargs) -> int:
    """The FLOPs of the dense products this op replaces, y axis first as the paper counts them: on a square map
    (every order costs the same) ``FlopCounterMode`` counts a model the same whichever path its sampling takes."""
    batch_size, channels, height, width = x_shape
    rows, cols = matrix_y_shape[1], matrix_x_shape[1]
    return 2 * batch_size * channels * rows * width * (height + cols)


def _setup_context(ctx, inputs, output) -> None:
    x, matrix_y, matrix_x, residual, relu = inputs
    ctx.relu = relu
    ctx.save_for_backward(x, matrix_y, matrix_x, output if relu else None)


def _rows(t: Tensor) -> Tensor:
    """A channels-last ``(B, C, H, W)`` map as its contiguous ``(B, H, W, C)`` rows (a view)."""
    return t.permute(0, 2, 3, 1)


def _identity(batch_size: int, length: int, like: Tensor) -> Tensor:
    return torch.eye(length, dtype=torch.float32, device=like.device).expand(batch_size, length, length).contiguous()


def _native_backward(ctx, grad: Tensor, backward_op: Callable[..., Tuple[Tensor, ...]] = separable_resample_backward):
    """The C++ op's backward: one call of :func:`separable_resample_backward` (``backward_op``: the custom op, or
    in eager mode the C++ op itself)."""
    x, matrix_y, matrix_x, out = ctx.saved_tensors
    grad = grad.to(x.dtype).contiguous(memory_format=torch.channels_last)
    need_x, need_matrix_y, need_matrix_x, need_residual = ctx.needs_input_grad[:4]
    grad_x, grad_matrix_y, grad_matrix_x, masked = backward_op(
        grad, x, matrix_y, matrix_x, out, need_x, need_matrix_y or need_matrix_x
    )
    return (
        grad_x if need_x else None,
        grad_matrix_y if need_matrix_y else None,
        grad_matrix_x if need_matrix_x else None,
        (masked if ctx.relu else grad) if need_residual else None,
        None,
    )


def custom_ops_needed() -> bool:
    """Whether the fused C++ ops must be called through their ``torch.library`` custom ops, with the fake, FLOP and
    autograd registrations that ``torch.compile`` and dispatch modes (``FlopCounterMode``, fake tensors) need: while
    compiling or under such a mode. Elsewhere (eager mode) the C++ ops are called themselves: a custom op's Python
    dispatch cost ~45 us a call, and with its autograd wrapper 0.2-0.4 ms a forward + backward, 5-16% of one of the
    way down at layers 2-4 (fp32, batch 16, 2 threads, Zen 4, ad hoc)."""
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


def cpu_ops():
    """Where the fused resampling ops are called from (:func:`custom_ops_needed`): their custom ops, or the C++ ops
    themselves (``torch.ops.timm_ssb_cpu``, the same names and schemas). Raises ``RuntimeError`` if the kernels are
    not built."""
    if custom_ops_needed():
        return _CUSTOM_OPS
    cpu_library.require()
    return torch.ops.timm_ssb_cpu


class _EagerNativeResample(torch.autograd.Function):
    """:func:`separable_resample` with its backward, for eager mode: the C++ ops called directly (:func:`cpu_ops`)."""

    @staticmethod
    def forward(ctx, x: Tensor, matrix_y: Tensor, matrix_x: Tensor, residual: Optional[Tensor], relu: bool) -> Tensor:
        out = torch.ops.timm_ssb_cpu.separable_resample(x, matrix_y, matrix_x, residual, relu)
        _setup_context(ctx, (x, matrix_y, matrix_x, residual, relu), out)
        return out

    @staticmethod
    @once_differentiable  # as the custom op: no double backward
    def backward(ctx, grad: Tensor):
        return _native_backward(ctx, grad, torch.ops.timm_ssb_cpu.separable_resample_backward)


def separable_resample_eager(
    x: Tensor, matrix_y: Tensor, matrix_x: Tensor, residual: Optional[Tensor], relu: bool
) -> Tensor:
    """:func:`separable_resample` in eager mode (:func:`cpu_ops`): the same values and gradients, without the
    custom op's dispatch. Raises ``RuntimeError`` if the kernels are not built."""
    if custom_ops_needed():
        return separable_resample(x, matrix_y, matrix_x, residual, relu)
    cpu_library.require()
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, matrix_y, matrix_x, residual)):
        return _EagerNativeResample.apply(x, matrix_y, matrix_x, residual, relu)
    return torch.ops.timm_ssb_cpu.separable_resample(x, matrix_y, matrix_x, residual, relu)


def _backward(op, ctx, grad: Tensor):
    """The Triton op's backward. With ``g`` the output's gradient (zero where the ReLU cut): ``x`` gets
    ``matrix_y^T g matrix_x`` (the same op, transposed matrices), the residual ``g``; the matrices get products of
    ``g`` and ``x`` each resampled along the other axis (``torch.bmm``), only when they need gradients (a learned
    sampler), dense: zeroing them off the matrices' support as the C++ op does would cost two more launches per
    matrix, for values the samplers' own backward multiplies by zero."""
    x, matrix_y, matrix_x, out = ctx.saved_tensors
    if ctx.relu:
        grad = torch.ops.aten.threshold_backward(grad, out, 0)
    grad = grad.to(x.dtype).contiguous(memory_format=torch.channels_last)
    batch_size, width, rows = x.shape[0], x.shape[3], matrix_y.shape[1]
    matrix_y_t, matrix_x_t = matrix_y.transpose(1, 2).contiguous(), matrix_x.transpose(1, 2).contiguous()
    grad_x = grad_matrix_y = grad_matrix_x = None
    if ctx.needs_input_grad[0]:
        grad_x = op(grad, matrix_y_t, matrix_x_t, None, False)
    if ctx.needs_input_grad[1]:
        along_x = op(grad, _identity(batch_size, rows, x), matrix_x_t, None, False)  # (B, C, P, W)
        grad_matrix_y = y_matrix_gradient(_rows(along_x), _rows(x)).float()
    if ctx.needs_input_grad[2]:
        along_y = op(x, matrix_y, _identity(batch_size, width, x), None, False)  # (B, C, P, W)
        grad_matrix_x = x_matrix_gradient(_rows(grad), _rows(along_y)).float()
    grad_residual = grad if ctx.needs_input_grad[3] else None
    return grad_x, grad_matrix_y, grad_matrix_x, grad_residual, None


_CUSTOM_OPS = types.SimpleNamespace(
    separable_resample=separable_resample,
    separable_resample_saliency=separable_resample_saliency,
    separable_resample_into_residual=separable_resample_into_residual,
    separable_resample_backward=separable_resample_backward,
)

for _op, _packet, _op_backward in (
    (separable_resample, torch.ops.timm_ssb.separable_resample, _native_backward),
    (
        separable_resample_triton,
        torch.ops.timm_ssb.separable_resample_triton,
        functools.partial(_backward, separable_resample_triton),
    ),
):
    _op.register_fake(_fake)
    register_flop_formula(_packet)(_flops)
    _op.register_autograd(_op_backward, setup_context=_setup_context)
