"""SSB-ResNet: ResNet-D / ResNet-RS with adaptive sampling in every stride-1 bottleneck of stages 2-4.

Paper: "SSBNet: Improving Visual Recognition Efficiency by Adaptive Sampling", Kwan & Song, ECCV 2022
(arXiv:2207.11511). Each SSB block samples its input down to ``s x s`` where a learned saliency map
says the content is, runs the whole residual branch (conv1, conv2, conv3 and SE) there, and maps
the result back before the residual add. The shortcut keeps the full-resolution map.

The model is timm's :class:`~timm.models.resnet.ResNet`; only the blocks differ. An SSB model has
every tensor of its timm baseline under the same name and shape, plus ``sampler.*`` tensors in
its SSB blocks (the saliency conv for ``adaptive``, the depthwise conv for ``dconv``).
"""

import os
from functools import partial
from typing import Any, Dict, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
from safetensors import SafetensorError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import get_attn
from timm.models import (
    PretrainedCfg,
    build_model_with_cfg,
    generate_default_cfgs,
    get_pretrained_cfg,
    register_model,
    resolve_pretrained_cfg,
)
from timm.models.resnet import Bottleneck, ResNet

from ..layers.samplers import AdaptiveSampler, check_saliency_kernel, check_sampler, create_sampler, has_forward_hooks
from ..layers.small_map_conv import conv2d_as_product, convs_run_as_products

__all__ = [
    'SSBResNet',
    'SSBBottleneck',
    'SSBStage',
    'SSB_STAGES',
    'DEFAULT_SSB_SIZES',
    'BASELINES',
    'HUB_ORG',
    'WARM_START_SOURCES',
    'add_missing_sampler_tensors',
    'check_ssb_args',
    'use_ssb_stages',
    'warm_start_tag',
    'ssb_cfg',
    'source_weights_hint',
    'weights_error_reason',
]

SSB_STAGES = ('layer2', 'layer3', 'layer4')
"""The stages whose stride-1 blocks are SSB blocks."""

DEFAULT_SSB_SIZES = (16, 8, 4)
"""Sampled sides of stages 2, 3 and 4 (for their 28, 14 and 7 pixel maps at a 224 x 224 input)."""

BASELINES = {
    'ssb_resnetd26': 'resnet26d',
    'ssb_resnetd50': 'resnet50d',
    'ssb_resnetd101': 'resnet101d',
    'ssb_resnetd152': 'resnet152d',
    'ssb_resnetrs50': 'resnetrs50',
    'ssb_resnetrs101': 'resnetrs101',
    'ssb_resnetrs152': 'resnetrs152',
    'ssb_resnetrs200': 'resnetrs200',
    'ssb_resnetrs270': 'resnetrs270',
    'ssb_resnetrs350': 'resnetrs350',
    'ssb_resnetrs420': 'resnetrs420',
}
"""The timm model each SSB model is built from (same tensors, bar the samplers')."""


class SSBBottleneck(Bottleneck):
    """A stride-1 ResNet bottleneck whose residual branch runs on a sampled ``s x s`` map.

    ``out = act(x + drop_path(inverse(branch(sample(x)))))``. Takes :class:`Bottleneck`'s arguments
    (``stride`` must be 1 and there is no ``downsample``) plus the sampler's.

    When ``act3`` is a ReLU and drop path is off (or in eval), the block ends with the sampler's fused
    :meth:`~timm_ssb.layers.SpatialSampler.inverse_residual`, which applies the ReLU itself: ``act3`` is
    then not called, so hooks on it do not fire. Any other ``act3`` (also one swapped in after
    construction) is called as usual.

    Args:
        inplanes: input (and output) channels.
        planes: bottleneck width before expansion.
        sampler: sampler name, one of :data:`timm_ssb.layers.SAMPLERS`.
        sampler_size: side ``s`` of the sampled map (unused by ``dconv``).
        saliency_kernel: kernel size of the ``adaptive`` sampler's saliency conv.
        sampler_args: extra keyword arguments for the sampler class.
        **kwargs: :class:`Bottleneck` keyword arguments.
    """

    def __init__(
        self,
        inplanes: int,
        planes: int,
        sampler: str = 'adaptive',
        sampler_size: Optional[int] = None,
        saliency_kernel: int = 1,
        sampler_args: Optional[Dict[str, Any]] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(inplanes, planes, **kwargs)
        self._add_sampler(
            sampler, sampler_size, saliency_kernel, sampler_args, kwargs.get('norm_layer', nn.BatchNorm2d)
        )

    def _add_sampler(
        self,
        sampler: str,
        sampler_size: Optional[int],
        saliency_kernel: int,
        sampler_args: Optional[Dict[str, Any]],
        norm_layer: Type[nn.Module],
    ) -> None:
        """Check that the shortcut is the identity; build the sampler on ``conv1``'s device and dtype."""
        if self.stride != 1 or self.downsample is not None:
            raise ValueError('SSBBottleneck requires stride=1 and no downsample (the shortcut must be the identity)')
        weight = self.conv1.weight
        self.sampler = create_sampler(
            sampler,
            self.conv1.in_channels,
            sampler_size,
            saliency_kernel=saliency_kernel,
            norm_layer=norm_layer,
            sampler_args=sampler_args,
            device=weight.device,
            dtype=weight.dtype,
        )

    @classmethod
    def from_bottleneck(
        cls,
        block: Bottleneck,
        sampler: str = 'adaptive',
        sampler_size: Optional[int] = None,
        saliency_kernel: int = 1,
        sampler_args: Optional[Dict[str, Any]] = None,
    ) -> 'SSBBottleneck':
        """The SSB version of a built stride-1 :class:`Bottleneck`, holding the very same submodules.

        Every tensor of ``block`` keeps its name (``conv1.weight``, ...); the new sampler is built on the
        device and in the dtype of ``block.conv1`` (a ``dconv`` sampler's norm is of ``block.bn1``'s
        class) and is in ``block``'s train/eval mode. Hooks registered on ``block`` itself are not carried
        over (hooks on its submodules are, with the submodules).
        """
        ssb = cls.__new__(cls)
        nn.Module.__init__(ssb)
        for name, module in block.named_children():
            ssb.add_module(name, module)
        for name in ('se', 'downsample', 'drop_path'):  # optional submodules that are None
            if getattr(block, name) is None:
                setattr(ssb, name, None)
        ssb.stride = block.stride
        ssb.dilation = block.dilation
        ssb._add_sampler(sampler, sampler_size, saliency_kernel, sampler_args, type(block.bn1))
        return ssb.train(block.training)

    def residual_branch(self, z: torch.Tensor) -> torch.Tensor:
        """The bottleneck's residual branch (convs, norms, SE) on the sampled map ``z``; on a map of a few
        positions the convs run as matrix products (:mod:`~timm_ssb.layers.small_map_conv`)."""
        as_products = not torch.jit.is_scripting() and self._convs_as_products(z)
        z = conv2d_as_product(z, self.conv1.weight, self.conv1.bias) if as_products else self.conv1(z)
        z = self.bn1(z)
        z = self.act1(z)

        z = conv2d_as_product(z, self.conv2.weight, self.conv2.bias) if as_products else self.conv2(z)
        z = self.bn2(z)
        z = self.drop_block(z)
        z = self.act2(z)
        z = self.aa(z)

        z = conv2d_as_product(z, self.conv3.weight, self.conv3.bias) if as_products else self.conv3(z)
        z = self.bn3(z)

        if self.se is not None:
            z = self.se(z)
        return z

    @torch.jit.unused
    def _convs_as_products(self, z: torch.Tensor) -> bool:
        return convs_run_as_products((self.conv1, self.conv2, self.conv3), z)

    @torch.jit.unused
    def forward_fusing_saliency(
        self,
        x: torch.Tensor,
        saliency_logits: Optional[torch.Tensor],
        next_saliency: Optional[nn.Conv2d],
        overwrite_input: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """:meth:`forward` for :class:`SSBStage`'s inference path, with ReLU as ``act3`` and no drop path in use:
        takes ``x``'s saliency logits when the block before computed them (else ``None``), and returns with the
        output ``next_saliency`` (the next block's 1x1 saliency conv) of it where that is fused into the way back up
        (else ``None``). With ``overwrite_input`` (``x`` is not needed after the call) the way back up may write the
        output into ``x``'s memory, which it reads as the residual."""
        shortcut = x
        if saliency_logits is None:
            z, state = self.sampler(x)
        else:
            z, state = self.sampler.forward_with_logits(x, saliency_logits)
        z = self.residual_branch(z)
        if next_saliency is not None or overwrite_input:
            fused = self.sampler.inverse_residual_saliency(z, state, shortcut, True, next_saliency, overwrite_input)
            if fused is not None:
                return fused
        return self.sampler.inverse_residual(z, state, shortcut, relu=True), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        z, state = self.sampler(x)
        z = self.residual_branch(z)
        if self.drop_path is None or not self.training:  # drop path is the identity in eval
            fuse_relu = isinstance(self.act3, nn.ReLU)
            out = self.sampler.inverse_residual(z, state, shortcut, relu=fuse_relu)
            return out if fuse_relu else self.act3(out)
        y = self.drop_path(self.sampler.inverse(z, state, shortcut))
        y += shortcut
        return self.act3(y)


def _can_fuse_saliency(block: nn.Module) -> bool:
    """Whether ``block`` can run :meth:`SSBBottleneck.forward_fusing_saliency` in place of a call: an SSB block
    whose forward it equals (ReLU as ``act3``, no drop path in use) and that has no hooks it would skip."""
    return (
        isinstance(block, SSBBottleneck)
        and isinstance(block.act3, nn.ReLU)
        and (block.drop_path is None or not block.training)
        and not has_forward_hooks(block)
    )


def _fusable_saliency_conv(block: nn.Module) -> Optional[nn.Conv2d]:
    """The 1x1 saliency conv of ``block`` that the block before it may compute, or ``None``."""
    if not _can_fuse_saliency(block) or not isinstance(block.sampler, AdaptiveSampler):
        return None
    saliency = block.sampler.saliency
    if saliency.kernel_size != (1, 1) or has_forward_hooks(block.sampler) or has_forward_hooks(saliency):
        return None
    return saliency


class SSBStage(nn.Sequential):
    """A stage of blocks: timm's ``nn.Sequential``, except that in inference on the CPU (autograd off; eager or
    ``torch.compile``) each SSB block whose next block is an adaptive SSB block with a 1x1 saliency conv computes
    that conv of its output in its way back up (:func:`~timm_ssb.layers.sampling_matrices.resample_residual_saliency`),
    while each output pixel is in cache, sparing the next block a read of the whole map. In eager mode an SSB block
    whose input is the output of the fused SSB block before it (a tensor no hook has seen and nothing else holds)
    writes its output into that input's memory, dead after the block: one full-resolution tensor fewer per block.
    Elsewhere (training, TorchScript, FX, export, blocks or samplers with hooks) it runs its blocks one after the
    other, as ``nn.Sequential``.
    The fused logits equal the conv's up to float32 rounding (another order of the sum over channels).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self._fuses_saliency(x):
            return self._forward_fusing_saliency(x)
        for module in self:
            x = module(x)
        return x

    @torch.jit.unused
    def _fuses_saliency(self, x: torch.Tensor) -> bool:
        """Whether this call takes the fused path: CPU inference with autograd off, not traced, exported or
        under global hooks."""
        return (
            not torch.is_grad_enabled()
            and type(x) is torch.Tensor
            and x.device.type == 'cpu'
            and not torch.compiler.is_exporting()
            and not torch.fx._symbolic_trace.is_fx_symbolic_tracing()
            and not torch.jit.is_tracing()
            and not torch.nn.modules.module._global_forward_hooks
            and not torch.nn.modules.module._global_forward_pre_hooks
        )

    @torch.jit.unused
    def _forward_fusing_saliency(self, x: torch.Tensor) -> torch.Tensor:
        blocks = list(self)
        eager = not torch.compiler.is_compiling()  # a compiled graph would functionalise the write into a copy
        logits, x_is_internal = None, False
        for i, block in enumerate(blocks):
            if _can_fuse_saliency(block):
                next_saliency = _fusable_saliency_conv(blocks[i + 1]) if i + 1 < len(blocks) else None
                x, logits = block.forward_fusing_saliency(x, logits, next_saliency, eager and x_is_internal)
                x_is_internal = True  # made by a fused block: no hook, and nothing outside this loop, holds it
            else:
                x, logits, x_is_internal = block(x), None, False
        return x


def use_ssb_stages(model: nn.Module) -> None:
    """Make the SSB stages (``layer2``-``layer4``) of a ResNet into :class:`SSBStage` modules, in place: the same
    module objects, hooks and state, only their class changes."""
    for name in SSB_STAGES:
        stage = getattr(model, name)
        if type(stage) is nn.Sequential:
            stage.__class__ = SSBStage


class SSBStageBlock:
    """Block constructor for one stage, in the form timm's ``make_blocks`` calls ``block``.

    Builds an :class:`SSBBottleneck` for every stride-1 block without downsample and a plain
    :class:`Bottleneck` for the stage's first (shape-changing) block.
    """

    expansion = Bottleneck.expansion

    def __init__(
        self,
        sampler: str,
        size: Optional[int],
        saliency_kernel: int,
        sampler_args: Optional[Dict[str, Any]],
    ) -> None:
        self.sampler = sampler
        self.size = size
        self.saliency_kernel = saliency_kernel
        self.sampler_args = sampler_args

    def __call__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        **kwargs: Any,
    ) -> nn.Module:
        if stride != 1 or downsample is not None:
            return Bottleneck(inplanes, planes, stride, downsample, **kwargs)
        return SSBBottleneck(
            inplanes,
            planes,
            sampler=self.sampler,
            sampler_size=self.size,
            saliency_kernel=self.saliency_kernel,
            sampler_args=self.sampler_args,
            **kwargs,
        )


def _resolve_ssb_sizes(ssb_sizes: Any, ssb_sampler: str, prefix: str) -> Optional[Tuple[int, int, int]]:
    param = f'{prefix}sizes'
    if ssb_sampler == 'dconv':
        if ssb_sizes is not None:
            raise ValueError(
                f"{param} does not apply to {prefix}sampler='dconv': its stride-2 conv sets the sampled side "
                f'(ceil(L / 2): 14, 7, 4 at 224 x 224); leave {param} unset'
            )
        return None
    if ssb_sizes is None:
        return DEFAULT_SSB_SIZES
    if (
        isinstance(ssb_sizes, (str, bytes))
        or not isinstance(ssb_sizes, Sequence)
        or len(ssb_sizes) != 3
        or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in ssb_sizes)
    ):
        raise ValueError(
            f'{param} must be three positive ints, the sampled sides of stages 2, 3 and 4 '
            f'(e.g. {DEFAULT_SSB_SIZES}); got {ssb_sizes!r}'
        )
    return tuple(ssb_sizes)


def check_ssb_args(
    sizes: Any, sampler: Any, saliency_kernel: Any, sampler_args: Any, prefix: str = 'ssb_'
) -> Optional[Tuple[int, int, int]]:
    """Check the SSB arguments of a model (``prefix='ssb_'``) or of :func:`~timm_ssb.ssbify` (``prefix=''``).

    Raises ``ValueError`` naming the parameter (``{prefix}sizes``, ...) and what it allows; returns the
    sampled sides of stages 2-4 (``None`` for ``dconv``).
    """
    check_sampler(sampler, f'{prefix}sampler')
    check_saliency_kernel(saliency_kernel, f'{prefix}saliency_kernel')
    resolved = _resolve_ssb_sizes(sizes, sampler, prefix)
    if sampler_args is not None and not isinstance(sampler_args, dict):
        raise ValueError(f'{prefix}sampler_args must be a dict of sampler keyword arguments; got {sampler_args!r}')
    if sampler_args:
        try:  # a throwaway sampler checks the arguments once, with the caller's names in the message
            create_sampler(sampler, 1, 1, sampler_args=sampler_args, device='meta')
        except (TypeError, ValueError) as e:
            raise ValueError(
                f'{prefix}sampler_args {sampler_args!r} do not fit {prefix}sampler={sampler!r}: {e}'
            ) from e
    if sampler != 'adaptive' and saliency_kernel != 1:
        raise ValueError(
            f"{prefix}saliency_kernel applies to {prefix}sampler='adaptive' only; got {saliency_kernel!r} "
            f'with {prefix}sampler={sampler!r}'
        )
    return resolved


class SSBResNet(ResNet):
    """timm's ResNet with SSB blocks in stages 2-4.

    Args:
        layers: number of blocks in each of the four stages.
        ssb_sizes: sampled side of stages 2, 3 and 4, default ``(16, 8, 4)``. Absolute sizes: they do
            not scale with the input. A stage whose map side is not larger than its size is not
            sampled along that axis (its SSB blocks then compute exactly a plain bottleneck there).
            Must stay unset for ``dconv``.
        ssb_sampler: ``'adaptive'`` (default), ``'uniform'``, ``'bilinear'`` or ``'dconv'``.
        ssb_saliency_kernel: kernel size of the saliency conv (``adaptive`` only): a positive odd int.
        ssb_sampler_args: extra sampler keyword arguments, e.g. ``dict(sigma_g=0.18)`` for ``adaptive``.
        **kwargs: :class:`~timm.models.resnet.ResNet` keyword arguments (``block`` is set here).
    """

    def __init__(
        self,
        layers: Tuple[int, ...],
        ssb_sizes: Optional[Sequence[int]] = None,
        ssb_sampler: str = 'adaptive',
        ssb_saliency_kernel: int = 1,
        ssb_sampler_args: Optional[Dict[str, Any]] = None,
        **kwargs: Any,
    ) -> None:
        sizes = check_ssb_args(ssb_sizes, ssb_sampler, ssb_saliency_kernel, ssb_sampler_args)
        if len(layers) != 4:
            raise ValueError(f'layers must give the block count of 4 stages; got {layers!r}')
        stage_sizes = sizes or (None, None, None)
        blocks = (Bottleneck,) + tuple(
            SSBStageBlock(ssb_sampler, size, ssb_saliency_kernel, ssb_sampler_args) for size in stage_sizes
        )
        super().__init__(block=blocks, layers=layers, **kwargs)
        use_ssb_stages(self)
        self.ssb_sizes = sizes
        self.ssb_sampler = ssb_sampler
        self.ssb_saliency_kernel = ssb_saliency_kernel

    @torch.jit.ignore
    def init_weights(self, zero_init_last: bool = True) -> None:
        """timm's ResNet init, then zero saliency convs so a fresh model samples uniformly."""
        super().init_weights(zero_init_last=zero_init_last)
        for module in self.modules():
            if isinstance(module, AdaptiveSampler):
                module.reset_saliency()


HUB_ORG = os.environ.get('TIMM_SSB_HUB_ORG') or None
"""Hugging Face Hub organisation that hosts this project's ImageNet weights (``TIMM_SSB_HUB_ORG``, read at
import). Unset (the default: no such weights are published yet), the ``.in1k`` tags are placeholders."""

WARM_START_SOURCES = {
    'ssb_resnetd26': 'resnet26d.bt_in1k',
    'ssb_resnetd50': 'resnet50d.ra2_in1k',
    'ssb_resnetd101': 'resnet101d.ra2_in1k',
    'ssb_resnetd152': 'resnet152d.ra2_in1k',
    **{name: f'{BASELINES[name]}.tf_in1k' for name in BASELINES if name.startswith('ssb_resnetrs')},
}
"""timm ImageNet weights of each baseline, loadable into the SSB model through its ``warmstart_*`` tag."""

SOURCE_DATA_CFG_KEYS = (
    'input_size',
    'test_input_size',
    'fixed_input_size',
    'interpolation',
    'crop_pct',
    'test_crop_pct',
    'crop_mode',
    'mean',
    'std',
    'pool_size',
)
"""What a warm-start tag takes from its source weights' cfg: how those weights were trained and evaluated."""


def warm_start_tag(name: str) -> str:
    """The tag that loads the baseline's timm ImageNet weights into SSB model ``name``."""
    return f'warmstart_{WARM_START_SOURCES[name].split(".", 1)[1]}'


def add_missing_sampler_tensors(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Complete a state dict that has no sampler tensors (a timm baseline's) with the model's own.

    An SSB model has every tensor of its baseline under the same name; only ``*.sampler.*`` tensors are
    its own. Taken from the freshly built model, the saliency convs are zero: the warm-started model
    samples uniformly and learns where to look while fine-tuning. A state dict that already has sampler
    tensors is returned unchanged, so SSB checkpoints load exactly as saved.
    """
    if any('.sampler.' in k for k in state_dict):
        return state_dict
    own = {k: v for k, v in model.state_dict().items() if '.sampler.' in k}
    return {**state_dict, **own}


def _weights_source(cfg: PretrainedCfg) -> str:
    """Where ``cfg`` loads its weights from, in words (timm's order: file, then Hub, then URL)."""
    if cfg.file:
        return f'the file {cfg.file!r}'
    if cfg.hf_hub_id:
        return f'the Hub repository {cfg.hf_hub_id!r}'
    return f'the URL {cfg.url!r}'


def weights_error_reason(error: Exception) -> str:
    """A one-line reason for a failed weight download or read."""
    if isinstance(error, LocalEntryNotFoundError):
        if hf_constants.HF_HUB_OFFLINE:
            return 'HF_HUB_OFFLINE is set and they are not in the local Hub cache'
        return 'the Hub could not be reached and they are not in the local Hub cache'
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ''
    return f'{type(error).__name__}: {first_line}'


def source_weights_hint(source: str) -> str:
    """What to do when timm's weights ``source`` (``name.tag``) of a baseline cannot be had."""
    return (
        f"They are timm's ImageNet weights of the baseline ({source}): load them once with network access "
        f"(timm.create_model('{source}', pretrained=True) caches them), or give a local copy with "
        'pretrained_cfg_overlay=dict(file=PATH).'
    )


def _create_ssb_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> SSBResNet:
    cfg = None
    if pretrained:
        cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
        name = f'{variant}.{cfg.tag}' if cfg.tag else variant
        if not cfg.has_weights:
            raise RuntimeError(
                f"{name}: no weights are published for this tag; it is a placeholder for this project's ImageNet "
                'weights, which do not exist yet (README, "Pretrained weights"). Use pretrained=False; start from '
                f"timm's ImageNet weights of the baseline with '{variant}.{warm_start_tag(variant)}'; load your own "
                "with pretrained_cfg_overlay=dict(file=PATH), 'local-dir:PATH' or 'hf-hub:ORG/NAME'; or set "
                'TIMM_SSB_HUB_ORG (before importing timm_ssb) to an organisation that hosts them.'
            )
        if cfg.file and not os.path.exists(cfg.file):
            raise FileNotFoundError(f'{name}: the pretrained weights file {cfg.file!r} does not exist')
    try:
        return build_model_with_cfg(
            SSBResNet, variant, pretrained, pretrained_filter_fn=add_missing_sampler_tensors, **kwargs
        )
    except (OSError, HfHubHTTPError, EntryNotFoundError, SafetensorError) as e:
        if cfg is None:
            raise
        name = f'{variant}.{cfg.tag}' if cfg.tag else variant
        if cfg.tag == warm_start_tag(variant) and cfg.hf_hub_id == f'timm/{WARM_START_SOURCES[variant]}':
            hint = source_weights_hint(WARM_START_SOURCES[variant])
        else:
            hint = (
                "Check the source; load weights with pretrained_cfg_overlay=dict(file=PATH), 'local-dir:PATH' or "
                "'hf-hub:ORG/NAME'."
            )
        raise RuntimeError(
            f'{name}: the pretrained weights could not be loaded from {_weights_source(cfg)}: '
            f'{weights_error_reason(e)}. ' + hint
        ) from e


def ssb_cfg(url: str = '', **kwargs: Any) -> Dict[str, Any]:
    """A pretrained cfg of an SSB model (timm's ``_cfg``): ImageNet's data config, SSB's paper, ``kwargs`` over them."""
    return {
        'url': url,
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': (7, 7),
        'crop_pct': 0.875,
        'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1.0',
        'classifier': 'fc',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2207.11511',
        'paper_name': 'SSBNet: Improving Visual Recognition Efficiency by Adaptive Sampling',
        **kwargs,
    }


def _warm_start_cfg(name: str) -> Dict[str, Any]:
    """The warm-start tag's cfg: timm's source weights, with the data config they were trained with."""
    source = WARM_START_SOURCES[name]
    source_cfg = get_pretrained_cfg(source).to_dict()
    return ssb_cfg(hf_hub_id=f'timm/{source}', **{k: source_cfg[k] for k in SOURCE_DATA_CFG_KEYS if k in source_cfg})


def _model_cfgs(name: str) -> Dict[str, Dict[str, Any]]:
    """The project's ImageNet weights (the default tag; a placeholder unless ``TIMM_SSB_HUB_ORG`` is set),
    then the warm start from the baseline's timm weights."""
    return {
        f'{name}.in1k': ssb_cfg(hf_hub_id=f'{HUB_ORG}/{name}.in1k' if HUB_ORG else None),
        f'{name}.{warm_start_tag(name)}': _warm_start_cfg(name),
    }


default_cfgs = generate_default_cfgs({k: v for name in BASELINES for k, v in _model_cfgs(name).items()})
for _default_cfg in default_cfgs.values():
    # timm makes the first tag with weights the default; ours stays the .in1k tag even while it is a
    # placeholder, so that a plain pretrained=True never loads a baseline's weights without being asked.
    _default_cfg.tags.remove('in1k')
    _default_cfg.tags.appendleft('in1k')


@register_model
def ssb_resnetd26(pretrained: bool = False, **kwargs: Any) -> SSBResNet:
    """SSB-ResNet-D-26: timm's resnet26d (two blocks per stage, so one SSB block in each of stages 2-4)
    with SSB blocks. Not in the paper; small enough for experiments on a laptop."""
    model_args = dict(layers=(2, 2, 2, 2), stem_width=32, stem_type='deep', avg_down=True)
    return _create_ssb_resnet('ssb_resnetd26', pretrained, **dict(model_args, **kwargs))


@register_model
def ssb_resnetd50(pretrained: bool = False, **kwargs: Any) -> SSBResNet:
    """SSB-ResNet-D-50: timm's resnet50d with SSB blocks."""
    model_args = dict(layers=(3, 4, 6, 3), stem_width=32, stem_type='deep', avg_down=True)
    return _create_ssb_resnet('ssb_resnetd50', pretrained, **dict(model_args, **kwargs))


@register_model
def ssb_resnetd101(pretrained: bool = False, **kwargs: Any) -> SSBResNet:
    """SSB-ResNet-D-101: timm's resnet101d with SSB blocks."""
    model_args = dict(layers=(3, 4, 23, 3), stem_width=32, stem_type='deep', avg_down=True)
    return _create_ssb_resnet('ssb_resnetd101', pretrained, **dict(model_args, **kwargs))


@register_model
def ssb_resnetd152(pretrained: bool = False, **kwargs: Any) -> SSBResNet:
    """SSB-ResNet-D-152: timm's resnet152d with SSB blocks."""
    model_args = dict(layers=(3, 8, 36, 3), stem_width=32, stem_type='deep', avg_down=True)
    return _create_ssb_resnet('ssb_resnetd152', pretrained, **dict(model_args, **kwargs))


def _ssb_resnetrs_args(layers: Tuple[int, int, int, int]) -> Dict[str, Any]:
    """timm's ResNet-RS layout: ResNet-D with the stem max-pool replaced by a conv, SE in every block."""
    return dict(
        layers=layers,
        stem_width=32,
        stem_type='deep',
        replace_stem_pool=True,
        avg_down=True,
        block_args=dict(attn_layer=partial(get_attn('se'), rd_ratio=0.25)),
    )


@register_model
def ssb_resnetrs50(pretrained: bool = False, **kwargs: Any) -> SSBResNet:
    """SSB-ResNet-RS-50: timm's resnetrs50 with SSB blocks."""
    return _create_ssb_resnet('ssb_resnetrs50', pretrained, **dict(_ssb_resnetrs_args((3, 4, 6, 3)), **kwargs))


@register_model
def ssb_resnetrs101(pretrained: bool = False, **kwargs: Any) -> SSBResNet:
    """SSB-ResNet-RS-101: timm's resnetrs101 with SSB blocks."""
    return _create_ssb_resnet('ssb_resnetrs101', pretrained, **dict(_ssb_resnetrs_args((3, 4, 23, 3)), **kwargs))


@register_model
def ssb_resnetrs152(pretrained: bool = False, **kwargs: Any) -> SSBResNet:
    """SSB-ResNet-RS-152: timm's resnetrs152 (conv stem pool, SE in every block) with SSB blocks."""
    return _create_ssb_resnet('ssb_resnetrs152', pretrained, **dict(_ssb_resnetrs_args((3, 8, 36, 3)), **kwargs))


@register_model
def ssb_resnetrs200(pretrained: bool = False, **kwargs: Any) -> SSBResNet:
    """SSB-ResNet-RS-200: timm's resnetrs200 with SSB blocks (the paper's headline model, 82.6% top-1)."""
    return _create_ssb_resnet('ssb_resnetrs200', pretrained, **dict(_ssb_resnetrs_args((3, 24, 36, 3)), **kwargs))


@register_model
def ssb_resnetrs270(pretrained: bool = False, **kwargs: Any) -> SSBResNet:
    """SSB-ResNet-RS-270: timm's resnetrs270 with SSB blocks. Not in the paper."""
    return _create_ssb_resnet('ssb_resnetrs270', pretrained, **dict(_ssb_resnetrs_args((4, 29, 53, 4)), **kwargs))


@register_model
def ssb_resnetrs350(pretrained: bool = False, **kwargs: Any) -> SSBResNet:
    """SSB-ResNet-RS-350: timm's resnetrs350 with SSB blocks. Not in the paper."""
    return _create_ssb_resnet('ssb_resnetrs350', pretrained, **dict(_ssb_resnetrs_args((4, 36, 72, 4)), **kwargs))


@register_model
def ssb_resnetrs420(pretrained: bool = False, **kwargs: Any) -> SSBResNet:
    """SSB-ResNet-RS-420: timm's resnetrs420 with SSB blocks. Not in the paper."""
    return _create_ssb_resnet('ssb_resnetrs420', pretrained, **dict(_ssb_resnetrs_args((4, 44, 87, 4)), **kwargs))
