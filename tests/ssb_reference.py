"""An independent reference of the SSB block, and models whose SSB branches are live.

Written straight from the design note (``docs/design.md``, sections 2 and 3), in float64,
with explicit loops over samples and pixels and dense matrix products, sharing no code with the package
beyond the modules' parameters. The one addition to the note's position formula is the one the package
documents (``saliency_positions``): the same neighbourhood weights under constant saliency are subtracted,
so constant saliency keeps every sample at its uniform target exactly.

timm zero-initialises every ``bn3.weight`` (``zero_init_last``) and this package every saliency conv, so
in a freshly built model each SSB branch adds exactly zero and samples uniformly: :func:`make_live` gives
every norm non-trivial weights and statistics and every saliency conv non-zero weights.
"""

import copy
import math
import zlib
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm_ssb.layers import AdaptiveSampler, BilinearSampler, DConvSampler, GaussianSampler
from timm_ssb.models import SSBBottleneck

WRAPPER_PREFIXES = ('body.', 'model.', 'graph_module.')
"""Prefixes timm's feature wrappers put before the model's own module names."""


@torch.no_grad()
def make_live(model: nn.Module, seed: int = 0, saliency_std: float = 2.0) -> nn.Module:
    """Non-trivial norm weights, biases and running statistics; saliency convs that move the samples.

    Each module's values are drawn from its own name (feature wrappers' prefixes removed), so a model and
    its ``features_only`` forms, whose modules come in other orders, get the same values."""
    for name, m in model.named_modules():
        for prefix in WRAPPER_PREFIXES:
            name = name.removeprefix(prefix)
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))

        def draw(t: torch.Tensor, low: float, high: float, g=g) -> None:
            t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float64) * (high - low) + low)

        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            draw(m.weight, 0.5, 1.5)
            draw(m.bias, -0.3, 0.3)
            draw(m.running_mean, -0.3, 0.3)
            draw(m.running_var, 0.5, 2.0)
        elif isinstance(m, nn.Conv2d) and name.split('.')[-1] == 'saliency':  # also where FX kept only the conv
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * saliency_std / fan_in**0.5)
            draw(m.bias, -1.0, 1.0)
    return model


def output_and_gradients(model: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """``model(x)``, then the gradients of ``sum(model(x) ** 2)`` with respect to ``x`` and every parameter (those
    of earlier calls cleared): what tests comparing two forms of a model's computation compare."""
    model.zero_grad(set_to_none=True)
    inputs = x.clone().requires_grad_()
    out = model(inputs)
    out.square().sum().backward()
    return [out, inputs.grad] + [p.grad for p in model.parameters()]


def centres(length: int) -> torch.Tensor:
    """Pixel centres ``q_j = (j + 1/2) / L``; also the uniform targets ``p_i`` when ``length`` is ``s``."""
    return torch.tensor([(j + 0.5) / length for j in range(length)], dtype=torch.float64)


def adaptive_positions_1d(marginal: torch.Tensor, size: int, sigma_g: float) -> torch.Tensor:
    """Design note 3.1 for one axis: ``u_i = sum_j m~_j g(p_i - q~_j) q~_j / sum_j m~_j g(p_i - q~_j)``,
    with ``m~``, ``q~`` extended by ``L`` replicated pixels each side; minus that mean under constant
    saliency, plus ``p_i``; clamped to ``[0, 1]``."""
    length = marginal.numel()
    q_ext = torch.tensor([(j + 0.5) / length for j in range(-length, 2 * length)], dtype=torch.float64)
    m_ext = marginal[torch.tensor([min(max(j, 0), length - 1) for j in range(-length, 2 * length)])]
    p = centres(size)
    g = torch.exp(-((p[:, None] - q_ext[None]) ** 2) / (2 * sigma_g**2))
    u = (g * m_ext * q_ext).sum(1) / (g * m_ext).sum(1) - (g * q_ext).sum(1) / g.sum(1) + p
    return u.clamp(0.0, 1.0)


def gaussian_pair(
    u: torch.Tensor, length: int, sigma_down: float, sigma_up: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Design note 3.2-3.3: ``D_ij = softmax_j(-(u_i - q_j)^2 / 2 sd^2)``,
    ``U_ji = softmax_i(-(q_j - u_i)^2 / 2 su^2)``."""
    q = centres(length)
    down = torch.softmax(-((u[:, None] - q[None]) ** 2) / (2 * sigma_down**2), dim=1)
    up = torch.softmax(-((q[:, None] - u[None]) ** 2) / (2 * sigma_up**2), dim=1)
    return down, up


def bilinear_1d(in_length: int, out_length: int) -> torch.Tensor:
    """``F.interpolate(mode='bilinear', align_corners=False)`` along one axis, as an ``(out, in)`` matrix."""
    matrix = torch.zeros(out_length, in_length, dtype=torch.float64)
    for i in range(out_length):
        src = max((i + 0.5) * in_length / out_length - 0.5, 0.0)
        lo = min(int(math.floor(src)), in_length - 1)
        hi = min(lo + 1, in_length - 1)
        matrix[i, lo] += 1.0 - (src - lo)
        matrix[i, hi] += src - lo
    return matrix


def sampling_matrices(sampler: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """``[down_y (B, s, H), down_x (B, s, W), up_y (B, H, s), up_x (B, W, s)]`` for float64 ``x``; differentiable
    in the saliency conv (adaptive)."""
    batch_size, _, height, width = x.shape
    size = sampler.size
    if isinstance(sampler, AdaptiveSampler):
        logits = sampler.saliency(x)[:, 0]  # (B, H, W); S = softmax over all H * W positions
        saliency = torch.softmax(logits.reshape(batch_size, -1), -1).reshape(batch_size, height, width)
    per_sample = []
    for b in range(batch_size):
        pairs = []
        for axis, length in enumerate((height, width)):
            if length <= size:  # not resampled
                eye = torch.eye(length, dtype=torch.float64)
                pairs.append((eye, eye))
            elif isinstance(sampler, BilinearSampler):
                pairs.append((bilinear_1d(length, size), bilinear_1d(size, length)))
            else:
                if isinstance(sampler, AdaptiveSampler):
                    u = adaptive_positions_1d(saliency[b].sum(dim=1 - axis), size, sampler.sigma_g)  # m_y: sum over W
                else:
                    u = centres(size)
                pairs.append(gaussian_pair(u, length, sampler.sigma_down, sampler.sigma_up))
        per_sample.append([pairs[0][0], pairs[1][0], pairs[0][1], pairs[1][1]])
    return [torch.stack([mats[k] for mats in per_sample]) for k in range(4)]


def residual_branch(block: SSBBottleneck, z: torch.Tensor) -> torch.Tensor:
    """Design note 2: conv1 1x1 -> BN -> act -> conv2 3x3 -> BN -> act -> conv3 1x1 -> BN [-> SE]."""
    z = block.act1(block.bn1(block.conv1(z)))
    z = block.aa(block.act2(block.drop_block(block.bn2(block.conv2(z)))))
    z = block.bn3(block.conv3(z))
    return block.se(z) if block.se is not None else z


def block_forward(block: SSBBottleneck, x: torch.Tensor) -> torch.Tensor:
    """``act(x + drop_path(up_y . branch(down_y . x . down_x^T) . up_x^T))`` on a float64 block."""
    sampler = block.sampler
    if isinstance(sampler, DConvSampler):
        y = residual_branch(block, sampler.bn(sampler.conv(x)))
        y = F.interpolate(y, size=x.shape[-2:], mode='bilinear', align_corners=False)
    else:
        assert isinstance(sampler, (GaussianSampler, BilinearSampler))
        down_y, down_x, up_y, up_x = sampling_matrices(sampler, x)
        z = torch.einsum('bih,bchw,bjw->bcij', down_y, x, down_x)
        y = torch.einsum('bhi,bcij,bwj->bchw', up_y, residual_branch(block, z), up_x)
    if block.drop_path is not None:
        y = block.drop_path(y)
    return block.act3(x + y)


def reference_block(block: SSBBottleneck) -> SSBBottleneck:
    """A float64 copy of ``block`` (same mode) whose forward is :func:`block_forward`."""
    ref = copy.deepcopy(block).double()
    ref.forward = lambda x: block_forward(ref, x)
    return ref


def reference_model(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` (same mode) with every SSB block's forward replaced by :func:`block_forward`."""
    ref = copy.deepcopy(model).double()
    for module in ref.modules():
        if isinstance(module, SSBBottleneck):
            module.forward = lambda x, module=module: block_forward(module, x)
    return ref
