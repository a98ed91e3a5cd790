"""Separable sampling matrices and their application to feature maps.

A sampler maps an ``H x W`` feature map to an ``s x s`` map with one matrix per axis
(``down_y: (B, s, H)``, ``down_x: (B, s, W)``) and maps a result back with another pair
(``up_y: (B, H, s)``, ``up_x: (B, W, s)``): ``z = down_y @ x @ down_x^T``. The matrices are
tiny; the cost is in applying them to every channel, which :func:`resample` does as batched
matrix products in the memory layout the input already has.

Conventions shared by all matrices here:

* coordinates are normalised to ``[0, 1]``; pixel ``j`` of an axis of length ``L`` has its
  centre at ``(j + 1/2) / L`` and output sample ``i`` of ``s`` its uniform target at ``(i + 1/2) / s``;
* an axis whose length is not larger than ``s`` is not resampled: its matrices are the identity,
  so a sampled block runs at full resolution on it (exactly a plain bottleneck when both axes are);
* matrices are built in float32, whatever the input's dtype, and cast to it only when applied.

Every function is registered with timm as an FX leaf (``register_notrace_function``): they branch
on shapes and layouts, which symbolic tracing cannot follow, and they hold no parameters.
"""

from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function
from torch import nn

from .native import (
    BatchedProductsResample,
    cpu_ops,
    native_matrices_op,
    native_op,
    separable_resample,
    separable_resample_eager,
)
from .tail_cuts import KERNEL_WEIGHT_LOG, SMALLEST_WEIGHT_LOG

__all__ = [
    'SamplingMatrices',
    'pixel_centres',
    'identity_matrices',
    'gaussian_matrices',
    'tailless_softmax',
    'SMALLEST_WEIGHT_LOG',
    'KERNEL_WEIGHT_LOG',
    'saliency_positions',
    'separable_matrices',
    'uniform_matrices',
    'adaptive_matrices',
    'adaptive_positions',
    'log_saliency_map',
    'bilinear_matrix',
    'bilinear_matrices',
    'resample',
    'resample_reference',
    'resample_nhwc',
    'EXPORT_NHWC_MAX_POSITIONS',
    'resample_residual',
    'add_residual',
]


class SamplingMatrices(NamedTuple):
    """A sampler's four matrices for a ``(B, C, H, W)`` map sampled to ``s x s``: down ``z = down_y @ x @ down_x^T``,
    up ``y = up_y @ z @ up_x^T``. An axis not resampled has the identity for both of its matrices."""

    down_y: torch.Tensor  # (B, s, H)
    down_x: torch.Tensor  # (B, s, W)
    up_y: torch.Tensor  # (B, H, s)
    up_x: torch.Tensor  # (B, W, s)


def pixel_centres(length: int, device: torch.device, start: int = 0, end: int = -1) -> torch.Tensor:
    """Normalised centres ``(j + 1/2) / length`` for ``j`` in ``[start, end)`` (``end=-1``: ``length``)."""
    end = length if end < 0 else end
    return (torch.arange(start, end, device=device, dtype=torch.float32) + 0.5) / length


def identity_matrices(length: int, batch_size: int, device: torch.device) -> List[torch.Tensor]:
    """``[down, up]`` for an axis that is not resampled: both the ``length x length`` identity."""
    eye = torch.eye(length, device=device, dtype=torch.float32).expand(batch_size, length, length)
    return [eye, eye]


def tailless_softmax(logits: torch.Tensor, dim: int, smallest_weight_log: float = SMALLEST_WEIGHT_LOG) -> torch.Tensor:
    """``softmax(logits, dim)`` with the entries below ``exp(smallest_weight_log)`` of the largest set to zero
    (:mod:`.tail_cuts`)."""
    floor = logits.amax(dim=dim, keepdim=True) + smallest_weight_log
    return torch.softmax(logits.masked_fill(logits < floor, float('-inf')), dim=dim)


def gaussian_matrices(
    positions: torch.Tensor,
    length: int,
    sigma_down: float,
    sigma_up: float,
    kernel_weight_log: float = KERNEL_WEIGHT_LOG,
) -> List[torch.Tensor]:
    """Gaussian read-out and scatter-back matrices for samples at ``positions``.

    Args:
        positions: ``(B, s)`` normalised sample positions along one axis (or ``(..., s)``: any leading dimensions).
        length: the axis length ``L`` of the full map.
        sigma_down: width of the read-out kernel; ``down[i, j] = softmax_j(-(u_i - q_j)^2 / 2 sigma_down^2)``.
        sigma_up: width of the scatter kernel; ``up[j, i] = softmax_i(-(q_j - u_i)^2 / 2 sigma_up^2)``.

    Returns:
        ``[down (..., s, L), up (..., L, s)]``, each row a probability distribution, its tail beyond ~6 sigma
        exactly zero (see :data:`KERNEL_WEIGHT_LOG`).
    """
    centres = pixel_centres(length, positions.device)
    sq_dist = (positions.unsqueeze(-1) - centres).square()  # (B, s, L)
    down = tailless_softmax(sq_dist * (-0.5 / sigma_down**2), dim=-1, smallest_weight_log=kernel_weight_log)
    up = tailless_softmax(sq_dist * (-0.5 / sigma_up**2), dim=-2, smallest_weight_log=kernel_weight_log)
    up = up.transpose(-1, -2)
    return [down, up]


def saliency_positions(log_marginal: torch.Tensor, size: int, sigma_g: float) -> torch.Tensor:
    """Sample positions attracted by saliency along one axis (the Saliency Sampler, per axis).

    ``u_i = p_i + sum_j (w_ij - w0_ij) q~_j`` with ``w_i = softmax_j(log m~_j - (p_i - q~_j)^2 / 2 sigma_g^2)``
    the saliency-weighted Gaussian neighbourhood of the uniform target ``p_i`` and ``w0`` the same
    neighbourhood under constant saliency. The marginal ``m`` and the coordinates ``q`` are extended
    by ``L`` pixels on each side (``m`` by replicate padding, ``q`` linearly), so that constant saliency
    keeps samples at their uniform targets instead of pulling them towards the centre. Subtracting
    ``w0`` removes the kernel-truncation bias of that extension, so constant saliency gives
    ``u = p`` *exactly*: a fresh (zero-initialised) adaptive sampler is the uniform sampler.
    Positions are clamped to ``[0, 1]``. Works in log space, so any logits give finite results.

    Args:
        log_marginal: ``(..., L)`` log of the saliency marginal along the axis, up to an additive constant (the
            positions do not depend on it); any leading dimensions (``(B, L)``, or ``(B, 2, L)`` for both axes of a
            square map at once).
        size: number of samples ``s``.
        sigma_g: width of the attraction kernel in normalised coordinates.

    Returns:
        ``(..., s)`` positions in ``[0, 1]``.
    """
    length = log_marginal.shape[-1]
    device = log_marginal.device
    targets = pixel_centres(size, device)  # (s,)
    extended = pixel_centres(length, device, start=-length, end=2 * length)  # (3L,)
    kernel = (targets.unsqueeze(-1) - extended).square() * (-0.5 / sigma_g**2)  # (s, 3L)
    log_m = log_marginal - log_marginal.amax(dim=-1, keepdim=True)
    replicate = torch.arange(-length, 2 * length, device=device).clamp(0, length - 1)
    log_m = log_m.index_select(-1, replicate)  # (..., 3L): replicate padding
    weights = tailless_softmax(log_m.unsqueeze(-2) + kernel, dim=-1)  # (..., s, 3L)
    uniform_weights = tailless_softmax(kernel, dim=-1)
    shift = torch.matmul(weights - uniform_weights, extended)
    return (targets + shift).clamp(0.0, 1.0)


def separable_matrices(
    lengths: List[int],
    size: int,
    batch_size: int,
    device: torch.device,
    positions: Optional[List[torch.Tensor]],
    sigma_down: float,
    sigma_up: float,
    bilinear: bool = False,
) -> SamplingMatrices:
    """The :class:`SamplingMatrices` for a map of ``lengths = [H, W]`` sampled to ``size x size``.

    The one loop over the two axes that every matrix sampler shares. An axis not longer than ``size``
    gets the identity; any other gets the Gaussian pair at ``positions[axis]`` (``(B, size)``; ``None``:
    the uniform grid), or, with ``bilinear``, bilinear interpolation down and up. Both axes of a square map at
    given positions take one set of ops, over the axes stacked (:func:`_square_gaussian_matrices`).
    """
    if positions is not None and not bilinear and lengths[0] == lengths[1] and size < lengths[0]:
        return _square_gaussian_matrices(torch.stack(positions, dim=1), lengths[0], sigma_down, sigma_up)
    down: List[torch.Tensor] = []
    up: List[torch.Tensor] = []
    for axis, length in enumerate(lengths):
        if size >= length:
            pair = identity_matrices(length, batch_size, device)
        elif bilinear:
            pair = [
                bilinear_matrix(length, size, device).expand(batch_size, size, length),
                bilinear_matrix(size, length, device).expand(batch_size, length, size),
            ]
        else:
            if positions is None:
                axis_positions = pixel_centres(size, device).expand(batch_size, size)
            else:
                axis_positions = positions[axis]
            pair = gaussian_matrices(axis_positions, length, sigma_down, sigma_up)
        down.append(pair[0])
        up.append(pair[1])
    return SamplingMatrices(down[0], down[1], up[0], up[1])


def _square_gaussian_matrices(
    positions: torch.Tensor, length: int, sigma_down: float, sigma_up: float
) -> SamplingMatrices:
    """:func:`gaussian_matrices` for both axes of a square map at once, on the positions stacked to ``(B, 2, s)``:
    the same values (each softmax is over one row either way) from half the ops: exported graphs with 60% fewer
    nodes (ONNX Runtime ran them no faster or slower, docs/performance.md)."""
    down, up = gaussian_matrices(positions, length, sigma_down, sigma_up)
    return SamplingMatrices(down[:, 0], down[:, 1], up[:, 0], up[:, 1])


@register_notrace_function
def uniform_matrices(x: torch.Tensor, size: int, sigma_down: float, sigma_up: float) -> SamplingMatrices:
    """The :class:`SamplingMatrices` sampling ``x`` on the uniform ``size x size`` grid (Gaussian kernels).

    Where :func:`adaptive_matrices` takes its native op, so does this, with constant saliency (whose positions are
    the uniform grid exactly, whatever ``sigma_g``): a fresh adaptive sampler and the uniform one then give the
    same matrices bit for bit, as they do in the reference.
    """
    if size < min(x.shape[-2], x.shape[-1]) and not torch.jit.is_scripting() and not _exporting():
        native = _native_uniform_matrices(x, size, sigma_down, sigma_up)
        if native is not None:
            return native
    return separable_matrices([x.shape[-2], x.shape[-1]], size, x.shape[0], x.device, None, sigma_down, sigma_up)


def log_saliency_map(saliency_logits: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` log of the saliency map: log-softmax of ``(B, 1, H, W)`` logits over all positions, in float32."""
    batch_size, height, width = saliency_logits.shape[0], saliency_logits.shape[-2], saliency_logits.shape[-1]
    logits = saliency_logits.float().reshape(batch_size, height * width)
    return torch.log_softmax(logits, dim=-1).reshape(batch_size, height, width)


def _resamples_square(saliency_logits: torch.Tensor, size: int) -> bool:
    """Whether both axes of the ``(B, 1, H, W)`` logits' map are resampled and have the same length."""
    height, width = saliency_logits.shape[-2], saliency_logits.shape[-1]
    return height == width and size < height


def _log_marginals(saliency_logits: torch.Tensor) -> List[torch.Tensor]:
    """``[(B, 1, H), (B, 1, W)]``: the log saliency marginals along y and x, up to an additive constant.

    ``logsumexp`` of the float32 ``(B, 1, H, W)`` logits over the other axis: the log-softmax that makes the saliency
    map a distribution shifts every entry of both marginals by the same constant, which :func:`saliency_positions`
    does not see, so it is left out (an exported graph has five fewer ops a block)."""
    if saliency_logits.dim() != 4 or saliency_logits.shape[1] != 1:
        raise ValueError(f'saliency_logits must be (B, 1, H, W); got shape {list(saliency_logits.shape)}')
    logits = saliency_logits.float()
    return [torch.logsumexp(logits, dim=3), torch.logsumexp(logits, dim=2)]


def _square_adaptive_positions(saliency_logits: torch.Tensor, size: int, sigma_g: float) -> torch.Tensor:
    """``(B, 2, s)``: :func:`adaptive_positions` of a square map whose axes are both resampled, stacked."""
    return saliency_positions(torch.cat(_log_marginals(saliency_logits), dim=1), size, sigma_g)


@register_notrace_function
def adaptive_positions(saliency_logits: torch.Tensor, size: int, sigma_g: float) -> List[torch.Tensor]:
    """``[positions_y (B, n), positions_x (B, m)]``: where the adaptive sampler centres its samples.

    The positions of :func:`adaptive_matrices`, in normalised coordinates. An axis not longer than
    ``size`` is not resampled: its positions are its own pixel centres. Both axes of a square map take one
    set of ops, over the two marginals stacked (the same values from half the ops).
    """
    if _resamples_square(saliency_logits, size):
        return list(_square_adaptive_positions(saliency_logits, size, sigma_g).unbind(1))
    out: List[torch.Tensor] = []
    for log_marginal in _log_marginals(saliency_logits):
        log_marginal = log_marginal[:, 0]
        length = log_marginal.shape[-1]
        if size >= length:
            out.append(pixel_centres(length, log_marginal.device).expand(log_marginal.shape[0], length))
        else:
            out.append(saliency_positions(log_marginal, size, sigma_g))
    return out


@register_notrace_function
def adaptive_matrices(
    saliency_logits: torch.Tensor,
    size: int,
    sigma_g: float,
    sigma_down: float,
    sigma_up: float,
) -> SamplingMatrices:
    """The :class:`SamplingMatrices` sampling where the saliency map puts its mass.

    Args:
        saliency_logits: ``(B, 1, H, W)``; the saliency map is their softmax over all ``H * W``
            positions, computed in float32 whatever their dtype.
        size: output side ``s``.
        sigma_g, sigma_down, sigma_up: kernel widths, see :func:`saliency_positions` and
            :func:`gaussian_matrices`.

    Where both sides are resampled and the sampling backend allows it, one native op builds the four matrices
    (:mod:`.native.matrices`): on the CPU in C++ (the same maths in double precision, its backward one more call),
    on a GPU in Triton (float32; its backward one more launch); else, and for export, tracing and TorchScript, the
    tensor ops below (the reference).
    """
    lengths = [saliency_logits.shape[-2], saliency_logits.shape[-1]]
    if size < min(lengths) and not torch.jit.is_scripting() and not _exporting():
        native = _native_adaptive_matrices(saliency_logits, size, sigma_g, sigma_down, sigma_up)
        if native is not None:
            return native
    if _resamples_square(saliency_logits, size):
        positions = _square_adaptive_positions(saliency_logits, size, sigma_g)
        return _square_gaussian_matrices(positions, lengths[0], sigma_down, sigma_up)
    positions = adaptive_positions(saliency_logits, size, sigma_g)
    mats = separable_matrices(
        lengths, size, saliency_logits.shape[0], saliency_logits.device, positions, sigma_down, sigma_up
    )
    if size >= min(lengths):
        # An axis left as it is does not depend on the saliency; tie its identity matrices in with an
        # exactly-zero gradient so every parameter takes part in every step (DDP without
        # find_unused_parameters, timm's tests).
        zero = saliency_logits.float().sum() * 0.0
        mats = SamplingMatrices(
            _tie_square(mats.down_y, zero),
            _tie_square(mats.down_x, zero),
            _tie_square(mats.up_y, zero),
            _tie_square(mats.up_x, zero),
        )
    return mats


def _tie_square(matrix: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``matrix + zero`` where it is square (an identity), else ``matrix``."""
    return matrix + zero if matrix.shape[-1] == matrix.shape[-2] else matrix


@torch.jit.unused
def _native_adaptive_matrices(
    saliency_logits: torch.Tensor, size: int, sigma_g: float, sigma_down: float, sigma_up: float
) -> Optional[SamplingMatrices]:
    """:func:`adaptive_matrices` by the native op, or ``None`` where the backend or device has none."""
    op = native_matrices_op(saliency_logits)
    if op is None:
        return None
    batch_size, height, width = saliency_logits.shape[0], saliency_logits.shape[-2], saliency_logits.shape[-1]
    logits = saliency_logits.float().reshape(batch_size, height, width).contiguous()
    return SamplingMatrices(*op(logits, size, sigma_g, sigma_down, sigma_up))


@torch.jit.unused
def _native_uniform_matrices(
    x: torch.Tensor, size: int, sigma_down: float, sigma_up: float
) -> Optional[SamplingMatrices]:
    """:func:`uniform_matrices` by the native op (constant saliency), or ``None`` where there is none."""
    constant = torch.zeros(x.shape[0], x.shape[-2], x.shape[-1], device=x.device, dtype=torch.float32)
    op = native_matrices_op(constant)
    if op is None:
        return None
    return SamplingMatrices(*op(constant, size, 1.0, sigma_down, sigma_up))


def bilinear_matrix(in_length: int, out_length: int, device: torch.device) -> torch.Tensor:
    """``(out_length, in_length)`` matrix of ``F.interpolate(mode='bilinear', align_corners=False)`` along one axis.

    Like that function it does not anti-alias when down-sampling: each output reads its two nearest inputs.
    """
    scale = in_length / out_length
    src = ((torch.arange(out_length, device=device, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0.0)
    lo = src.floor().long().clamp(max=in_length - 1)
    hi = (lo + 1).clamp(max=in_length - 1)
    frac = (src - lo).unsqueeze(-1)
    return (1.0 - frac) * F.one_hot(lo, in_length) + frac * F.one_hot(hi, in_length)


@register_notrace_function
def bilinear_matrices(x: torch.Tensor, size: int) -> SamplingMatrices:
    """``[down_y, down_x, up_y, up_x]``: bilinear interpolation to ``size x size`` and back, as matrices."""
    return separable_matrices([x.shape[-2], x.shape[-1]], size, x.shape[0], x.device, None, 0.0, 0.0, bilinear=True)


@torch.jit.unused
def _resample_channels_last(
    x: torch.Tensor,
    matrix_y: torch.Tensor,
    matrix_x: torch.Tensor,
    residual: Optional[torch.Tensor] = None,
    relu: bool = False,
) -> Optional[torch.Tensor]:
    """The fast paths; ``x`` and ``residual`` are channels-last. Returns ``None`` where they do not apply.

    The native kernel for the map's device (:mod:`.native`) where it applies and the sampling backend allows it,
    else the batched matrix products of :class:`.native.BatchedProductsResample`.

    Under autocast the products run in autocast's dtype, as ``torch.matmul`` (the reference) would; the
    autograd function itself runs with autocast off, since it writes its products into tensors it made.
    A residual of another dtype than the products' is left to the reference (its add promotes).
    """
    device_type = x.device.type
    x = _in_autocast_dtype(x)
    if residual is not None and residual.dtype != x.dtype:
        return None
    training = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, matrix_y, matrix_x, residual)
    )
    with torch.autocast(device_type, enabled=False):
        # Mapping a result back up. Branched on rather than passed on: where torch.compile traces the shapes as
        # symbols (a model compiled for a third input size, or dynamic=True) the comparison is a symbol, which the
        # rule it goes to (a constant of the trace) cannot take; a branch on it is a guard, and up a Python bool.
        up = True if matrix_y.shape[1] > x.shape[2] or matrix_x.shape[1] > x.shape[3] else False
        op = native_op(x, training, up)
        if op is not None:
            return op(x, matrix_y.float().contiguous(), matrix_x.float().contiguous(), residual, relu)
        return BatchedProductsResample.apply(x, matrix_y.to(x.dtype), matrix_x.to(x.dtype), residual, relu)


@torch.jit.unused
def _in_autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """``x`` in autocast's dtype where autocast is on for its device (the fast paths' products run in it)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.is_floating_point():
        return x.to(torch.get_autocast_dtype(device_type))
    return x


@torch.jit.unused
def _exporting() -> bool:
    """Tracing (the TorchScript-based ``torch.onnx.export``), ONNX export or ``torch.export``: these take
    :func:`resample_reference`, standard ops every exporter translates (the fast paths write into tensors
    they made, which tracing does not record faithfully, or call the native op, which ONNX does not know)."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


@torch.jit.unused
def _fast_paths_serve(x: torch.Tensor, residual: Optional[torch.Tensor]) -> bool:
    """Whether :func:`_resample_channels_last` may take these maps: channels-last (``x``, and ``residual`` if given),
    and no export or tracing under way. Which op then runs is :func:`.native.native_op`'s choice."""
    return not _exporting() and _is_channels_last(x) and (residual is None or _is_channels_last(residual))


def _is_channels_last(x: torch.Tensor) -> bool:
    """Channels-last and not also NCHW-contiguous (the layouts agree when ``C == 1`` or ``H * W == 1``)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def resample_reference(x: torch.Tensor, matrix_y: torch.Tensor, matrix_x: torch.Tensor) -> torch.Tensor:
    """The reference :func:`resample`: matrix products in any layout, autograd's own backward.

    The product that touches the full-resolution map (the first on the way down, the last on the way up) runs as
    one matrix product per sample over ``(C * rows, W)``, the other as one per sample and channel on the smaller
    intermediate map: large products instead of ``B * C`` small ones where it costs most (in ONNX Runtime, which
    runs this form, the way down took 0.5-0.8x the time of the y-axis-first form)."""
    matrix_y = matrix_y.to(x.dtype)
    matrix_x = matrix_x.to(x.dtype)
    batch, channels, height, width = x.shape
    rows, cols = matrix_y.shape[1], matrix_x.shape[1]
    if rows <= height:  # down: the x-axis product over the whole map, then the y-axis one on (B, C, H, m)
        t = torch.matmul(x.reshape(batch, channels * height, width), matrix_x.transpose(1, 2))
        return torch.matmul(matrix_y.unsqueeze(1), t.reshape(batch, channels, height, cols))
    t = torch.matmul(matrix_y.unsqueeze(1), x)  # up: (B, C, n, W) from the small map, then the x-axis product
    return torch.matmul(t.reshape(batch, channels * rows, width), matrix_x.transpose(1, 2)).reshape(
        batch, channels, rows, cols
    )


def resample_nhwc(x: torch.Tensor, matrix_y: torch.Tensor, matrix_x: torch.Tensor) -> torch.Tensor:
    """:func:`resample_reference` on a map in NHWC order: ``(B, H, W, C) -> (B, P, Q, C)``.

    Each product takes the channels as its columns: on the way down the y-axis product over the whole map is one
    matrix product per sample, ``(P, H) x (H, W*C)``, and the x-axis product one per sample and row of the smaller
    intermediate map, ``(Q, W) x (W, C)``; on the way up the x-axis product on the small map first, then the y-axis
    product, one per sample, writes the whole map. The separable products' multiply-accumulates, and no ``B * C``
    small products (the NCHW form's second product) anywhere."""
    if x.dim() != 4:
        raise ValueError(f'x must be a (B, H, W, C) map; got shape {tuple(x.shape)}')
    batch, height, width, channels = x.shape
    if matrix_y.dim() != 3 or tuple(matrix_y.shape[::2]) != (batch, height):
        raise ValueError(f'matrix_y must be (B, P, H) = ({batch}, P, {height}); got {tuple(matrix_y.shape)}')
    if matrix_x.dim() != 3 or tuple(matrix_x.shape[::2]) != (batch, width):
        raise ValueError(f'matrix_x must be (B, Q, W) = ({batch}, Q, {width}); got {tuple(matrix_x.shape)}')
    matrix_y = matrix_y.to(x.dtype)
    matrix_x = matrix_x.to(x.dtype)
    rows, cols = matrix_y.shape[1], matrix_x.shape[1]
    if rows <= height:
        t = torch.matmul(matrix_y, x.reshape(batch, height, width * channels)).reshape(batch, rows, width, channels)
        return torch.matmul(matrix_x.unsqueeze(1), t)
    t = torch.matmul(matrix_x.unsqueeze(1), x)
    return torch.matmul(matrix_y, t.reshape(batch, height, cols * channels)).reshape(batch, rows, cols, channels)


EXPORT_NHWC_MAX_POSITIONS = 400
"""Export and tracing record the resampling (and the saliency conv) of a map of at most this many positions in NHWC
order (:func:`resample_nhwc`): the permutes into and out of it cancel between the SSB blocks of a stage in a graph
runtime (ONNX Runtime keeps one full-map transpose a stage, at its end, and folds the others into the layout changes
its convolutions make anyway), and the NCHW form's second product, ``B * C`` small products, costs far more per
multiply-accumulate than large ones where the map is small (stage 3 at 224 x 224: 8 x 14 times 14 x 8 per sample and
channel). In ONNX Runtime (fp32, 2 threads, batch 16, 2026-12-06) that form at stages 3 and 4 (14 x 14, 7 x 7) made
D-152 faster than the Kronecker-product form it replaced there (``benchmarks/results/onnx_inference_*_nhwc_*``); at
stage 2 (28 x 28) it was no faster than the NCHW form, and at 320 x 320 it was faster at stage 3's 20 x 20 (ad hoc,
per-node kernel times)."""


def _exports_nhwc(height: int, width: int) -> bool:
    """Whether export and tracing record the resampling and saliency of an ``height x width`` map in NHWC order."""
    return height * width <= EXPORT_NHWC_MAX_POSITIONS


@torch.jit.unused
def _resample_exported(x: torch.Tensor, matrix_y: torch.Tensor, matrix_x: torch.Tensor) -> torch.Tensor:
    """What export and tracing record: standard ops, in NHWC order on small maps (:data:`EXPORT_NHWC_MAX_POSITIONS`),
    else :func:`resample_reference`. Counting (``complexity``) and the reference backend keep the NCHW form."""
    height, width = max(x.shape[2], matrix_y.shape[1]), max(x.shape[3], matrix_x.shape[1])
    if _exports_nhwc(height, width):
        return resample_nhwc(x.permute(0, 2, 3, 1), matrix_y, matrix_x).permute(0, 3, 1, 2)
    return resample_reference(x, matrix_y, matrix_x)


@register_notrace_function
def resample(x: torch.Tensor, matrix_y: torch.Tensor, matrix_x: torch.Tensor) -> torch.Tensor:
    """``matrix_y @ x @ matrix_x^T`` per sample and channel: ``(B, C, H, W) -> (B, C, P, Q)``.

    Args:
        x: ``(B, C, H, W)`` map, NCHW- or channels-last-contiguous; the result keeps its layout.
        matrix_y: ``(B, P, H)``.
        matrix_x: ``(B, Q, W)``.

    The y-axis product first costs ``C * (P*H*W + P*Q*W)`` multiply-accumulates, the count the paper's
    complexity figures assume; on a square map every order costs the same. Channels-last maps (the fast
    paths) take the fused kernel of their device (C++ on the CPU, Triton on CUDA; :mod:`.native`) where the
    sampling backend allows it, else a custom autograd function whose products, forward and backward, are
    batched matrix products over contiguous views (the x-axis product first when mapping up, ``P > H``).
    Other layouts and TorchScript use :func:`resample_reference` (the x-axis product first on the way down);
    export and tracing record it too, or :func:`resample_nhwc` on small maps
    (:data:`EXPORT_NHWC_MAX_POSITIONS`).
    """
    if not torch.jit.is_scripting():
        if _fast_paths_serve(x, None):
            return _resample_channels_last(x, matrix_y, matrix_x)
        if _exporting():
            return _resample_exported(x, matrix_y, matrix_x)
    return resample_reference(x, matrix_y, matrix_x)


@register_notrace_function
def resample_residual(
    x: torch.Tensor,
    matrix_y: torch.Tensor,
    matrix_x: torch.Tensor,
    residual: torch.Tensor,
    relu: bool,
) -> torch.Tensor:
    """``residual + resample(x, matrix_y, matrix_x)``, then a ReLU if ``relu``: a residual block's output.

    On channels-last maps (``x`` and ``residual``, same dtype, also under autocast) the last product writes
    the output, and the residual add and the ReLU run in place on it: one new full-resolution tensor
    instead of three; the result is channels-last. Other layouts, TorchScript, export and tracing compute it
    from the products :func:`resample` would take there (export and tracing add the residual in NHWC order where
    they record the products so).
    """
    expected = [x.shape[0], x.shape[1], matrix_y.shape[1], matrix_x.shape[1]]
    if list(residual.shape) != expected:
        raise ValueError(f'residual must have the shape of the resampled map, {expected}; got {list(residual.shape)}')
    if not torch.jit.is_scripting():
        if _fast_paths_serve(x, residual):
            out = _resample_channels_last(x, matrix_y, matrix_x, residual, relu)
            if out is not None:
                return out
        if _exporting():
            if _exports_nhwc(residual.shape[2], residual.shape[3]):
                out = resample_nhwc(x.permute(0, 2, 3, 1), matrix_y, matrix_x)
                return add_residual(out, residual.permute(0, 2, 3, 1), relu).permute(0, 3, 1, 2)
            return add_residual(_resample_exported(x, matrix_y, matrix_x), residual, relu)
    return add_residual(resample_reference(x, matrix_y, matrix_x), residual, relu)


@torch.jit.unused
def resample_residual_saliency(
    x: torch.Tensor,
    matrix_y: torch.Tensor,
    matrix_x: torch.Tensor,
    residual: torch.Tensor,
    relu: bool,
    saliency: Optional[nn.Conv2d],
    into_residual: bool = False,
) -> Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """:func:`resample_residual` and ``saliency`` (a 1x1 conv to one channel, or ``None``: no logits) of its result in
    one pass of the native CPU kernel: ``(out, logits)``, the logits float32 (``None`` without ``saliency``). With
    ``into_residual`` the output is written into ``residual`` and ``out`` is ``residual``: for a caller to whom the
    residual is dead after the call (it spares a new full-resolution tensor). For inference: ``None`` where autograd
    would need the op's backward (it has none) or the kernel does not serve these maps (then the caller runs the
    unfused ops)."""
    parameters = () if saliency is None else (saliency.weight, saliency.bias)
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, matrix_y, matrix_x, residual, *parameters)
    ):
        return None
    if not _fast_paths_serve(x, residual):
        return None
    x = _in_autocast_dtype(x)
    if residual.dtype != x.dtype or native_op(x, up=True) not in (separable_resample, separable_resample_eager):
        return None
    weight = bias = None
    if saliency is not None:
        weight = saliency.weight.float().reshape(-1).contiguous()
        bias = saliency.bias.float() if saliency.bias is not None else weight.new_zeros(1)
    ops = cpu_ops()
    with torch.autocast(x.device.type, enabled=False):
        matrix_y, matrix_x = matrix_y.float().contiguous(), matrix_x.float().contiguous()
        if into_residual:
            logits = ops.separable_resample_into_residual(x, matrix_y, matrix_x, residual, relu, weight, bias)
            return residual, logits if saliency is not None else None
        if saliency is None:
            return ops.separable_resample(x, matrix_y, matrix_x, residual, relu), None
        return ops.separable_resample_saliency(x, matrix_y, matrix_x, residual, relu, weight, bias)


def add_residual(y: torch.Tensor, residual: torch.Tensor, relu: bool) -> torch.Tensor:
    """``residual + y``, then a ReLU if ``relu``: the unfused end of a residual block."""
    out = residual + y
    return torch.relu(out) if relu else out
