"""Samplers: take a feature map down to a small map and bring a result of that map back.

A sampler is the reusable part of an SSB block. ``z, state = sampler(x)`` samples ``x``;
``sampler.inverse(y, state, x)`` maps ``y`` (computed from ``z``) back to ``x``'s spatial size.
Any architecture can wrap a sub-network this way; :mod:`timm_ssb.models.ssb_resnet` wraps the
residual branch of a ResNet bottleneck.

Four samplers, the supplementary's ablation methods:

* ``adaptive`` (the SSB method): separable Gaussian sampling at positions attracted by a learned
  saliency map (``k x k`` conv ``C -> 1``, zero-initialised so a fresh model samples uniformly);
* ``uniform``: the same matrices at the uniform grid, no parameters;
* ``bilinear``: bilinear interpolation down and up, written as matrices, no parameters;
* ``dconv``: a 5x5 stride-2 depthwise conv + norm down, bilinear interpolation up.
"""

import math
from typing import Any, Dict, List, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function

from .sampling_matrices import (
    SamplingMatrices,
    _exporting,
    _exports_nhwc,
    _is_channels_last,
    adaptive_matrices,
    add_residual,
    bilinear_matrices,
    resample,
    resample_residual,
    resample_residual_saliency,
    uniform_matrices,
)

__all__ = [
    'SAMPLERS',
    'SpatialSampler',
    'MatrixSampler',
    'GaussianSampler',
    'AdaptiveSampler',
    'UniformSampler',
    'BilinearSampler',
    'DConvSampler',
    'apply_sampling',
    'apply_sampling_residual',
    'saliency_conv1x1',
    'has_forward_hooks',
    'create_sampler',
    'check_saliency_kernel',
    'check_sampler',
    'check_sigma',
    'MIN_SIGMA',
]

DEFAULT_SIGMA_G = 0.18


class SpatialSampler(nn.Module):
    """Interface of a sampler: ``forward`` samples, ``inverse`` maps back."""

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Return the sampled map and the state :meth:`inverse` needs (a matrix sampler's is its
        :class:`~.sampling_matrices.SamplingMatrices`)."""
        raise NotImplementedError

    def inverse(self, y: torch.Tensor, state: List[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """Map ``y`` back to the spatial size of ``like`` (the map that was sampled)."""
        raise NotImplementedError

    def inverse_residual(
        self, y: torch.Tensor, state: List[torch.Tensor], residual: torch.Tensor, relu: bool
    ) -> torch.Tensor:
        """``residual + inverse(y)``, then a ReLU if ``relu``: where a residual block ends.

        ``residual`` is the map that was sampled. Samplers with a fused form override this.
        """
        return add_residual(self.inverse(y, state, residual), residual, relu)

    @torch.jit.unused
    def inverse_residual_saliency(
        self,
        y: torch.Tensor,
        state: List[torch.Tensor],
        residual: torch.Tensor,
        relu: bool,
        saliency: Optional[nn.Conv2d],
        into_residual: bool = False,
    ) -> Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """:meth:`inverse_residual` fused with ``saliency`` of its result (and, with ``into_residual``, written into
        ``residual``), for inference: ``(out, logits)``, or ``None`` where the sampler has no such form (then the
        caller runs :meth:`inverse_residual` and the conv). Samplers with one override this."""
        return None


@register_notrace_function
def apply_sampling(x: torch.Tensor, matrix_y: torch.Tensor, matrix_x: torch.Tensor) -> torch.Tensor:
    """:func:`resample`, except where the map is left as it is.

    A :class:`MatrixSampler` gives a square matrix for an axis only when it does not resample it (the
    identity). With both axes so, ``x`` is returned without the two identity products; when gradients
    are recorded it is tied to the matrices by an exact zero, so that their parameters (saliency) still
    get their (zero) gradient.
    """
    if _is_identity(matrix_y, matrix_x):
        return _tie_to_matrices(x, matrix_y, matrix_x)
    return resample(x, matrix_y, matrix_x)


@register_notrace_function
def apply_sampling_residual(
    x: torch.Tensor, matrix_y: torch.Tensor, matrix_x: torch.Tensor, residual: torch.Tensor, relu: bool
) -> torch.Tensor:
    """:func:`resample_residual`, except where the map is left as it is (see :func:`apply_sampling`)."""
    if _is_identity(matrix_y, matrix_x):
        return add_residual(_tie_to_matrices(x, matrix_y, matrix_x), residual, relu)
    return resample_residual(x, matrix_y, matrix_x, residual, relu)


@register_notrace_function
def saliency_conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.conv2d(x, weight, bias)`` for a 1x1 conv to one channel (``weight`` of shape ``(1, C, 1, 1)``).

    A channels-last CPU map takes it as what it is there, a matrix-vector product over the channels: the forward
    reads the map once; the backward writes the map's gradient once and reads the map once for the weight's.
    oneDNN's convolution with a single output channel took 2-4x that time in float32 (forward and backward, 2
    threads, batch 8-16, the maps of stages 2-4), about as long as the backward of the block's resampling. The
    result has the conv's dtype (also under autocast). Export and tracing record a product too, over the NCHW map's
    channels: ONNX Runtime ran the conv in its blocked layout, which cost each block's input a full-resolution
    layout change and the conv 16 output channels for one. On the maps whose resampling export records in NHWC order
    (:data:`~.sampling_matrices.EXPORT_NHWC_MAX_POSITIONS`) the product reads that order too, as the weight row times
    the transposed ``(H*W, C)`` map: ONNX Runtime fuses the transpose into the product, where the map times a
    one-column matrix took 14x as long (16 x 14 x 14 x 1024, one measurement). Other layouts and devices (not
    measured there; on a GPU the product's backward is two more kernel launches) and TorchScript take the conv.
    """
    if not torch.jit.is_scripting():
        if _saliency_product_serves(x):
            logits = (x.permute(0, 2, 3, 1) @ weight.reshape(-1)).unsqueeze(1)
            return logits if bias is None else logits + bias.to(logits.dtype)
        if _exporting():
            batch, channels, height, width = x.shape
            if _exports_nhwc(height, width):
                rows = x.permute(0, 2, 3, 1).reshape(batch, height * width, channels).transpose(1, 2)
            else:
                rows = x.reshape(batch, channels, height * width)
            logits = torch.matmul(weight.reshape(1, channels), rows).reshape(batch, 1, height, width)
            return logits if bias is None else logits + bias.to(logits.dtype)
    return F.conv2d(x, weight, bias)


@torch.jit.unused
def _saliency_product_serves(x: torch.Tensor) -> bool:
    """Whether :func:`saliency_conv1x1` computes the conv as a product for ``x``: a channels-last CPU map, no export."""
    return x.device.type == 'cpu' and not _exporting() and _is_channels_last(x)


class _SaliencyGradientIntoInput(torch.autograd.Function):
    """``(x, logits)`` unchanged; the backward adds the saliency conv's gradient with respect to the map,
    ``grad_logits * weight``, into the map's gradient from the way down, in place.

    The saliency logits are computed from ``x.detach()`` (so their backward gives the conv's parameters their
    gradients only), and the way down reads this function's ``x``. Their two gradients with respect to the map then
    meet here, where the one from the way down is a fresh tensor of the resampling's backward that nothing else
    holds: one pass over it, where autograd would write the conv's gradient as a new full-resolution tensor and add
    it to the other (in a training step, each new tensor of that size can cost page faults as well).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, logits: torch.Tensor, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(weight)
        return x.view_as(x), logits.view_as(logits)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_x: Optional[torch.Tensor], grad_logits: Optional[torch.Tensor]):
        (weight,) = ctx.saved_tensors
        if grad_logits is not None:
            term = weight.reshape(1, -1, 1, 1)
            if grad_x is None:
                grad_x = grad_logits * term
            else:
                grad_x.addcmul_(grad_logits.to(grad_x.dtype), term.to(grad_x.dtype))
        return grad_x, grad_logits, None


@torch.jit.unused
def has_forward_hooks(module: nn.Module, include_global: bool = False) -> bool:
    """Whether calling ``module`` runs forward (pre-)hooks: its own, and with ``include_global`` the global
    ones. A path that computes a module's result without calling it must not skip them."""
    if module._forward_hooks or module._forward_pre_hooks:
        return True
    if not include_global:
        return False
    return bool(torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks)


def _is_identity(matrix_y: torch.Tensor, matrix_x: torch.Tensor) -> bool:
    return matrix_y.shape[-1] == matrix_y.shape[-2] and matrix_x.shape[-1] == matrix_x.shape[-2]


def _tie_to_matrices(x: torch.Tensor, matrix_y: torch.Tensor, matrix_x: torch.Tensor) -> torch.Tensor:
    """``x``, tied by an exact zero to matrices that carry gradients (else ``x`` itself)."""
    if torch.is_grad_enabled() and (matrix_y.requires_grad or matrix_x.requires_grad):
        return x + (matrix_y.sum() + matrix_x.sum()).to(x.dtype) * 0.0
    return x


class MatrixSampler(SpatialSampler):
    """A sampler whose down and up mappings are separable matrices (see :mod:`.sampling_matrices`).

    :meth:`matrices` returns a square matrix for an axis only when that axis is not resampled (the
    identity); :func:`apply_sampling` relies on it.

    Args:
        size: side ``s`` of the sampled map. An axis not longer than ``s`` is left as it is.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f'size must be a positive int, got {size!r}')
        self.size = size

    def matrices(self, x: torch.Tensor) -> SamplingMatrices:
        """The four matrices for ``x``; they are the state :meth:`inverse` takes."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, SamplingMatrices]:
        mats = self.matrices(x)
        return apply_sampling(x, mats.down_y, mats.down_x), mats

    def inverse(self, y: torch.Tensor, state: SamplingMatrices, like: torch.Tensor) -> torch.Tensor:
        return apply_sampling(y, state.up_y, state.up_x)

    def inverse_residual(
        self, y: torch.Tensor, state: SamplingMatrices, residual: torch.Tensor, relu: bool
    ) -> torch.Tensor:
        return apply_sampling_residual(y, state.up_y, state.up_x, residual, relu)

    @torch.jit.unused
    def inverse_residual_saliency(
        self,
        y: torch.Tensor,
        state: SamplingMatrices,
        residual: torch.Tensor,
        relu: bool,
        saliency: Optional[nn.Conv2d],
        into_residual: bool = False,
    ) -> Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """:meth:`inverse_residual` and ``saliency`` (a 1x1 conv to one channel, e.g. the next block's; ``None``:
        no logits) of its result in one pass, for inference: ``(out, logits)``; with ``into_residual`` written into
        ``residual``, which the caller no longer needs; ``None`` where that does not apply (an axis not resampled,
        a map the native kernel does not serve). See
        :func:`~timm_ssb.layers.sampling_matrices.resample_residual_saliency`."""
        if _is_identity(state.up_y, state.up_x):
            return None
        return resample_residual_saliency(y, state.up_y, state.up_x, residual, relu, saliency, into_residual)

    def extra_repr(self) -> str:
        return f'size={self.size}'


class GaussianSampler(MatrixSampler):
    """Shared kernel widths of the Gaussian read-out (``sigma_down``) and scatter (``sigma_up``) kernels.

    Both default to half the sample spacing, ``0.5 / size``, in normalised coordinates.
    """

    def __init__(self, size: int, sigma_down: Optional[float] = None, sigma_up: Optional[float] = None) -> None:
        super().__init__(size)
        for name, value in (('sigma_down', sigma_down), ('sigma_up', sigma_up)):
            if value is not None:
                check_sigma(name, value)
        self.sigma_down = float(sigma_down) if sigma_down is not None else 0.5 / size
        self.sigma_up = float(sigma_up) if sigma_up is not None else 0.5 / size


class UniformSampler(GaussianSampler):
    """Gaussian sampling on the uniform ``size x size`` grid; no parameters."""

    def matrices(self, x: torch.Tensor) -> SamplingMatrices:
        return uniform_matrices(x, self.size, self.sigma_down, self.sigma_up)


class AdaptiveSampler(GaussianSampler):
    """The SSB sampler: Gaussian sampling where a learned saliency map puts its mass.

    Args:
        in_chs: channels of the sampled map.
        size: side ``s`` of the sampled map.
        saliency_kernel: kernel size ``k`` of the saliency conv (positive odd int).
        sigma_g: width of the kernel that attracts samples to saliency (normalised coordinates).
        sigma_down, sigma_up: see :class:`GaussianSampler`.
    """

    def __init__(
        self,
        in_chs: int,
        size: int,
        saliency_kernel: int = 1,
        sigma_g: float = DEFAULT_SIGMA_G,
        sigma_down: Optional[float] = None,
        sigma_up: Optional[float] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(size, sigma_down=sigma_down, sigma_up=sigma_up)
        check_saliency_kernel(saliency_kernel)
        check_sigma('sigma_g', sigma_g)
        self.sigma_g = float(sigma_g)
        self.saliency = nn.Conv2d(
            in_chs, 1, saliency_kernel, padding=saliency_kernel // 2, bias=True, device=device, dtype=dtype
        )
        self.reset_saliency()

    def reset_saliency(self) -> None:
        """Zero the saliency conv: constant saliency, so the sampler samples uniformly until it learns."""
        nn.init.zeros_(self.saliency.weight)
        nn.init.zeros_(self.saliency.bias)

    def saliency_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` saliency logits: the conv's, by :func:`saliency_conv1x1` where it is 1x1 and has no
        hooks to run. TorchScript and FX tracing call the conv (an FX graph keeps it as a module)."""
        conv = self.saliency
        if not torch.jit.is_scripting() and self._saliency_as_product():
            return saliency_conv1x1(x, conv.weight, conv.bias)
        return conv(x)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, SamplingMatrices]:
        if not torch.jit.is_scripting() and self._fuses_saliency_gradient(x):
            return self._forward_fusing_saliency_gradient(x)
        mats = self.matrices(x)  # MatrixSampler.forward's (TorchScript does not compile super())
        return apply_sampling(x, mats.down_y, mats.down_x), mats

    @torch.jit.unused
    def _fuses_saliency_gradient(self, x: torch.Tensor) -> bool:
        """Whether :meth:`forward` adds the saliency conv's gradient into the way down's
        (:class:`_SaliencyGradientIntoInput`): eager training on a map the saliency product serves and the way down
        resamples (its gradient with respect to ``x`` is then a fresh tensor of the resampling's backward)."""
        return (
            torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and self._saliency_as_product()  # first: it also rules out FX tracing, where x is a proxy
            and x.requires_grad
            and (x.shape[-2] > self.size or x.shape[-1] > self.size)
            and _saliency_product_serves(x)
        )

    @torch.jit.unused
    def _forward_fusing_saliency_gradient(self, x: torch.Tensor) -> Tuple[torch.Tensor, SamplingMatrices]:
        conv = self.saliency
        logits = saliency_conv1x1(x.detach(), conv.weight, conv.bias)
        x, logits = _SaliencyGradientIntoInput.apply(x, logits, conv.weight.detach())
        return self.forward_with_logits(x, logits)

    @torch.jit.unused
    def _saliency_as_product(self) -> bool:
        return (
            self.saliency.kernel_size == (1, 1)
            and not has_forward_hooks(self.saliency, include_global=True)
            and not torch.fx._symbolic_trace.is_fx_symbolic_tracing()
        )

    def matrices(self, x: torch.Tensor) -> SamplingMatrices:
        return self.matrices_from_logits(self.saliency_logits(x))

    def matrices_from_logits(self, saliency_logits: torch.Tensor) -> SamplingMatrices:
        """:meth:`matrices` from the map's saliency logits, computed elsewhere (e.g. fused into the block before)."""
        return adaptive_matrices(saliency_logits, self.size, self.sigma_g, self.sigma_down, self.sigma_up)

    @torch.jit.unused
    def forward_with_logits(
        self, x: torch.Tensor, saliency_logits: torch.Tensor
    ) -> Tuple[torch.Tensor, SamplingMatrices]:
        """``self(x)`` given ``x``'s saliency logits."""
        mats = self.matrices_from_logits(saliency_logits)
        return apply_sampling(x, mats.down_y, mats.down_x), mats

    def extra_repr(self) -> str:
        return f'size={self.size}, sigma_g={self.sigma_g}'


class BilinearSampler(MatrixSampler):
    """Bilinear interpolation to ``size x size`` and back, as matrices; no parameters."""

    def matrices(self, x: torch.Tensor) -> SamplingMatrices:
        return bilinear_matrices(x, self.size)


@register_notrace_function
def upsample_bilinear_like(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bilinear interpolation of ``y`` to the spatial size of ``like``."""
    return F.interpolate(y, size=(like.shape[-2], like.shape[-1]), mode='bilinear', align_corners=False)


class DConvSampler(SpatialSampler):
    """The supplementary's ``dconv`` ablation: 5x5 depthwise conv, stride 2, + norm down; bilinear up.

    The sampled side is ``ceil(L / 2)`` of the input side ``L`` (14, 7, 4 for a 224 x 224 input).
    """

    def __init__(
        self,
        in_chs: int,
        norm_layer: Type[nn.Module] = nn.BatchNorm2d,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_chs, in_chs, 5, stride=2, padding=2, groups=in_chs, bias=False, device=device, dtype=dtype
        )
        self.bn = norm_layer(in_chs, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        return self.bn(self.conv(x)), []

    def inverse(self, y: torch.Tensor, state: List[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        return upsample_bilinear_like(y, like)


SAMPLERS = ('adaptive', 'uniform', 'bilinear', 'dconv')
"""Names accepted by :func:`create_sampler` and by the models' ``ssb_sampler``."""


MIN_SIGMA = 1e-6
"""Smallest kernel width accepted (normalised coordinates): a millionth of the map's side. A narrower
Gaussian picks the nearest pixel at any map size, and far narrower ones overflow float32 (all-NaN maps)."""


def check_sigma(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number of at least :data:`MIN_SIGMA`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not MIN_SIGMA <= value < math.inf:
        raise ValueError(
            f'{name} must be a finite number >= {MIN_SIGMA:g} (a kernel width in normalised coordinates, '
            f'where the map side is 1); got {value!r}'
        )


def check_sampler(name: Any, param: str = 'name') -> None:
    """Raise ``ValueError`` naming ``param`` unless ``name`` is one of :data:`SAMPLERS`."""
    if name not in SAMPLERS:
        raise ValueError(f'{param} must be one of {", ".join(repr(s) for s in SAMPLERS)}; got {name!r}')


def check_saliency_kernel(kernel: Any, param: str = 'saliency_kernel') -> None:
    """Raise ``ValueError`` naming ``param`` unless ``kernel`` is a positive odd int (1, 3, 5, ...)."""
    if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel <= 0 or kernel % 2 == 0:
        raise ValueError(f'{param} must be a positive odd int (1, 3, 5, ...); got {kernel!r}')


def create_sampler(
    name: str,
    in_chs: int,
    size: Optional[int],
    saliency_kernel: int = 1,
    norm_layer: Type[nn.Module] = nn.BatchNorm2d,
    sampler_args: Optional[Dict[str, Any]] = None,
    device=None,
    dtype=None,
) -> SpatialSampler:
    """Build the sampler called ``name`` for a map of ``in_chs`` channels sampled to ``size x size``.

    ``size`` is ignored by ``dconv`` (its stride sets the size); ``saliency_kernel`` is used by
    ``adaptive`` only; ``sampler_args`` go to the sampler class (e.g. ``sigma_g`` for ``adaptive``).
    """
    check_sampler(name)
    sampler_args = sampler_args or {}
    if name == 'dconv':
        return DConvSampler(in_chs, norm_layer=norm_layer, device=device, dtype=dtype, **sampler_args)
    if size is None:
        raise ValueError(f'size is required by sampler {name!r}')
    if name == 'adaptive':
        return AdaptiveSampler(in_chs, size, saliency_kernel, device=device, dtype=dtype, **sampler_args)
    if name == 'uniform':
        return UniformSampler(size, **sampler_args)
    return BilinearSampler(size, **sampler_args)
