"""Where each SSB layer looks: its saliency map, its sample positions, and the image as it samples it.

For a layer named like the paper's "Layer 3-10" (stage 3, block 10, counted from 1: timm's
``layer3[9]``), :func:`layer_views` runs the model on an image, takes the layer's input feature map,
and returns the layer's saliency map, the positions of its uniform and adaptive samples, and the input
*image* read through the same Gaussian kernels at those positions: what the uniform sampler sees beside
what the adaptive sampler sees. :func:`plot_layer_views` draws them (matplotlib, the ``viz`` extra).
"""

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
import torch.nn as nn

from .layers.samplers import AdaptiveSampler, GaussianSampler
from .layers.sampling_matrices import adaptive_positions, gaussian_matrices, log_saliency_map, pixel_centres, resample
from .models.ssb_resnet import SSBBottleneck

__all__ = [
    'LayerView',
    'parse_layers',
    'ssb_layer',
    'layer_views',
    'layer_views_figure',
    'plot_layer_views',
    'PANEL_INCHES',
    'DPI',
]

PANEL_INCHES = 2.4
DPI = 100


@dataclass
class LayerView:
    """What one SSB layer does to one image."""

    name: str
    saliency: torch.Tensor  # (H, W) saliency map of the layer's input, sums to one
    uniform_y: torch.Tensor  # (s,) sample positions, normalised to [0, 1]
    uniform_x: torch.Tensor
    adaptive_y: torch.Tensor
    adaptive_x: torch.Tensor
    uniform_picture: torch.Tensor  # (3, s, s) the image read at the uniform positions
    adaptive_picture: torch.Tensor  # (3, s, s) the image read at the adaptive positions


def parse_layers(spec: str) -> List[str]:
    """``'2-7,3-10,4-3'`` -> ``['2-7', '3-10', '4-3']``, checking the form ``STAGE-BLOCK``."""
    names = [part.strip() for part in spec.split(',') if part.strip()]
    for name in names:
        stage, _, block = name.partition('-')
        if not (stage.isdigit() and block.isdigit()):
            raise ValueError(f'--layers must be STAGE-BLOCK names such as 2-7,3-10,4-3; got {name!r}')
    if not names:
        raise ValueError('--layers is empty; give STAGE-BLOCK names such as 2-7,3-10,4-3')
    return names


def ssb_layer(model: nn.Module, name: str) -> SSBBottleneck:
    """The SSB block called ``name`` ("S-B": stage S, block B counted from 1, as in the paper)."""
    stage, block = (int(v) for v in name.split('-'))
    blocks = getattr(model, f'layer{stage}', None)
    if blocks is None or not 1 <= block <= len(blocks):
        raise ValueError(f'layer {name!r} does not exist in this model (stages 1-4, blocks counted from 1)')
    module = blocks[block - 1]
    if not isinstance(module, SSBBottleneck) or not isinstance(module.sampler, GaussianSampler):
        raise ValueError(
            f'layer {name!r} is not an SSB block with a Gaussian sampler (the first block of a stage never is; '
            f'SSB blocks are S-2 and later in stages 2-4)'
        )
    return module


def _read_image(
    image: torch.Tensor, positions_y: torch.Tensor, positions_x: torch.Tensor, sigma: float
) -> torch.Tensor:
    """The ``(3, H, W)`` image read with Gaussian kernels of width ``sigma`` at the given positions.

    The sampler reads a feature map with these kernels; here they read the image the map was computed from.
    """
    dy, _ = gaussian_matrices(positions_y.unsqueeze(0), image.shape[-2], sigma, sigma)
    dx, _ = gaussian_matrices(positions_x.unsqueeze(0), image.shape[-1], sigma, sigma)
    return resample(image.unsqueeze(0).contiguous(), dy, dx)[0]


@torch.no_grad()
def layer_views(model: nn.Module, x: torch.Tensor, image: torch.Tensor, layers: Sequence[str]) -> Dict[str, LayerView]:
    """Run ``model`` on ``x`` (one preprocessed image, ``(1, 3, H, W)``) and describe each layer in ``layers``.

    Args:
        model: an SSB model.
        x: the model input.
        image: ``(3, H, W)`` the same image for display, values in ``[0, 1]``.
        layers: names such as ``'3-10'``.
    """
    blocks = {name: ssb_layer(model, name) for name in layers}
    inputs: Dict[str, torch.Tensor] = {}
    hooks = [
        block.register_forward_pre_hook(lambda _m, args, name=name: inputs.__setitem__(name, args[0]))
        for name, block in blocks.items()
    ]
    try:
        model.eval()(x)
    finally:
        for hook in hooks:
            hook.remove()
    views = {}
    for name, block in blocks.items():
        sampler = block.sampler
        feature = inputs[name]
        uniform_y = pixel_centres(min(sampler.size, feature.shape[-2]), feature.device)
        uniform_x = pixel_centres(min(sampler.size, feature.shape[-1]), feature.device)
        if isinstance(sampler, AdaptiveSampler):
            logits = sampler.saliency_logits(feature)
            adaptive_y, adaptive_x = (p[0] for p in adaptive_positions(logits, sampler.size, sampler.sigma_g))
            saliency = log_saliency_map(logits)[0].exp()
        else:
            adaptive_y, adaptive_x = uniform_y, uniform_x
            saliency = torch.full(feature.shape[-2:], 1.0 / feature.shape[-2:].numel(), device=feature.device)
        sigma = sampler.sigma_down  # the layer's own read-out kernel width
        views[name] = LayerView(
            name=name,
            saliency=saliency.cpu(),
            uniform_y=uniform_y.cpu(),
            uniform_x=uniform_x.cpu(),
            adaptive_y=adaptive_y.cpu(),
            adaptive_x=adaptive_x.cpu(),
            uniform_picture=_read_image(image, uniform_y, uniform_x, sigma).cpu(),
            adaptive_picture=_read_image(image, adaptive_y, adaptive_x, sigma).cpu(),
        )
    return views


def layer_views_figure(image: torch.Tensor, views: Dict[str, LayerView], title: str = ''):
    """The matplotlib figure of :func:`plot_layer_views` (one row per layer, five panels each)."""
    try:
        import matplotlib

        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError('timm-ssb visualize needs matplotlib: pip install "timm-ssb[viz]"') from e
    rows = len(views)
    fig, axes = plt.subplots(rows, 5, figsize=(5 * PANEL_INCHES, rows * PANEL_INCHES), dpi=DPI, squeeze=False)
    display = image.permute(1, 2, 0).clamp(0, 1).numpy()
    height, width = display.shape[:2]
    for row, view in zip(axes, views.values(), strict=True):
        for ax, (label, ys, xs) in zip(
            row[:2],
            (('uniform', view.uniform_y, view.uniform_x), ('adaptive', view.adaptive_y, view.adaptive_x)),
            strict=True,
        ):
            ax.imshow(display)
            grid_y, grid_x = torch.meshgrid(ys * height - 0.5, xs * width - 0.5, indexing='ij')
            # bright dots with a dark rim: visible over light, dark and saturated images alike
            ax.scatter(grid_x.flatten(), grid_y.flatten(), s=10, c='yellow', edgecolors='black', linewidths=0.6)
            ax.set_title(f'Layer {view.name}: {label} samples', fontsize=8)
        shown = row[2].imshow(view.saliency.numpy(), cmap='magma', vmin=0.0)
        colorbar = fig.colorbar(shown, ax=row[2], fraction=0.046, pad=0.04)
        colorbar.ax.tick_params(labelsize=6)
        row[2].set_title('saliency (share of the map)', fontsize=8)
        row[3].imshow(view.uniform_picture.permute(1, 2, 0).clamp(0, 1).numpy())
        row[3].set_title('uniform sampler sees', fontsize=8)
        row[4].imshow(view.adaptive_picture.permute(1, 2, 0).clamp(0, 1).numpy())
        row[4].set_title('adaptive sampler sees', fontsize=8)
        for ax in row:
            ax.axis('off')
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def plot_layer_views(image: torch.Tensor, views: Dict[str, LayerView], out: str, title: str = '') -> None:
    """One row per layer: uniform positions, adaptive positions, saliency (with a colour bar), what uniform
    sees, what adaptive sees; written to the PNG ``out``.

    The PNG is ``5 * PANEL_INCHES * DPI`` pixels wide and ``len(views) * PANEL_INCHES * DPI`` high.
    """
    import matplotlib.pyplot as plt

    fig = layer_views_figure(image, views, title)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
