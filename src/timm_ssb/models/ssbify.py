"""``ssbify``: the SSB version of any timm bottleneck ResNet, with its weights; and the ``ssb_resnet`` model.

The SSB models registered in :mod:`.ssb_resnet` are built SSB from the start. :func:`ssbify` converts a
model that is already built (and possibly trained): every stride-1 :class:`~timm.models.resnet.Bottleneck`
of stages 2-4 whose shortcut is the identity becomes an :class:`~.ssb_resnet.SSBBottleneck` that holds the
very same submodules, so every tensor keeps its name and value. The new saliency convs are zero: the
converted model samples uniformly until it learns where to look.

``timm.create_model('ssb_resnet', ssb_source=NAME, pretrained=True)`` does the same from a timm model
name, in the form timm's ``train.py`` (``--model ssb_resnet --model-kwargs ssb_source=NAME``), the Hub
``config.json`` and ``features_only`` need.
"""

import copy
import dataclasses
from typing import Any, Dict, Optional, Sequence, Tuple

import timm
import torch.nn as nn
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
from safetensors import SafetensorError
from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    get_pretrained_cfg,
    register_model,
    resolve_pretrained_cfg,
)
from timm.models.resnet import Bottleneck, ResNet

from .ssb_resnet import (
    SOURCE_DATA_CFG_KEYS,
    SSB_STAGES,
    SSBBottleneck,
    add_missing_sampler_tensors,
    check_ssb_args,
    source_weights_hint,
    ssb_cfg,
    use_ssb_stages,
    weights_error_reason,
)

__all__ = ['ssbify', 'DEFAULT_SSB_SOURCE']

DEFAULT_SSB_SOURCE = 'resnet50d'
"""``ssb_source`` of the ``ssb_resnet`` model when none is given (the paper's SSB-ResNet-D-50)."""


def _check_convertible(model: nn.Module) -> None:
    """Raise ``ValueError`` saying why ``model`` is not a timm bottleneck ResNet that SSB can convert."""
    if not isinstance(model, ResNet):
        kind = type(model).__name__
        hint = (
            ' (a features_only wrapper: convert the model first, then take its features)' if 'Feature' in kind else ''
        )
        raise ValueError(f'ssbify converts timm ResNet models (timm.models.resnet.ResNet); got a {kind}{hint}')
    for stage_name in ('layer1', *SSB_STAGES):
        for index, block in enumerate(getattr(model, stage_name)):
            where = f'{stage_name}.{index}'
            if isinstance(block, SSBBottleneck):
                raise ValueError(f'ssbify: the model is already SSB ({where} is an SSBBottleneck)')
            if type(block) is not Bottleneck:
                raise ValueError(
                    f'ssbify converts ResNets built from timm Bottleneck blocks; {where} is a {type(block).__name__} '
                    '(basic-block ResNets such as resnet18/34 have no bottleneck to run on a sampled map)'
                )
            if stage_name == 'layer1' or index == 0:
                continue
            if block.stride != 1 or block.downsample is not None:
                raise ValueError(
                    f'ssbify: {where} has stride {block.stride}'
                    f'{" and a downsample" if block.downsample is not None else ""}; only the first block of a '
                    'stage may change the map, SSB blocks need an identity shortcut'
                )
            for conv_name in ('conv1', 'conv2', 'conv3'):
                conv = getattr(block, conv_name)
                if tuple(conv.stride) != (1, 1):
                    raise ValueError(
                        f'ssbify: {where}.{conv_name} has stride {tuple(conv.stride)} in a block of stride 1 '
                        '(the stride is in the wrong place for a timm Bottleneck)'
                    )
            if not isinstance(block.aa, nn.Identity):
                raise ValueError(f'ssbify: {where} anti-aliases (aa) in a block of stride 1; cannot sample around it')


def ssbify(
    model: nn.Module,
    sizes: Optional[Sequence[int]] = None,
    sampler: str = 'adaptive',
    saliency_kernel: int = 1,
    sampler_args: Optional[Dict[str, Any]] = None,
    inplace: bool = False,
) -> ResNet:
    """The SSB version of a timm bottleneck ResNet, keeping every tensor, its name and its value.

    Every block of stages 2-4 but the first (the one that changes the map's shape) becomes an
    :class:`~timm_ssb.models.ssb_resnet.SSBBottleneck` around the same submodules: any depth, width,
    groups (ResNeXt), attention (SE, ECA, ...), stem, drop path, norm and activation of a timm
    :class:`~timm.models.resnet.Bottleneck`. The model stays a timm ``ResNet`` (its class is unchanged), with
    its ``pretrained_cfg``, and gets ``ssb_sizes``, ``ssb_sampler`` and ``ssb_saliency_kernel`` attributes as
    :class:`~timm_ssb.SSBResNet` has; new sampler tensors are ``*.sampler.*`` and the saliency convs are zero, so
    the converted model starts out sampling uniformly. ``ssbify(timm.create_model('resnet50d'))`` has the
    architecture of ``ssb_resnetd50``, and with the same weights computes the same.

    Args:
        model: a timm ``ResNet`` built from ``Bottleneck`` blocks.
        sizes: sampled sides of stages 2, 3 and 4 (default ``(16, 8, 4)``); must stay unset for ``dconv``.
        sampler: ``'adaptive'``, ``'uniform'``, ``'bilinear'`` or ``'dconv'``.
        saliency_kernel: kernel size of the saliency conv (``adaptive`` only).
        sampler_args: extra sampler keyword arguments, e.g. ``dict(sigma_g=0.18)``.
        inplace: convert ``model`` itself and return it. By default ``model`` is left as it is and a
            converted deep copy is returned.

    Raises:
        ValueError: bad SSB arguments (naming the argument), or a model that cannot be converted (naming
            the block and why: not a timm ResNet, basic blocks, already SSB, a stride-1 block that
            strides or anti-aliases).
    """
    resolved_sizes = check_ssb_args(sizes, sampler, saliency_kernel, sampler_args, prefix='')
    _check_convertible(model)
    if not inplace:
        model = copy.deepcopy(model)
    return _convert(model, resolved_sizes, sampler, saliency_kernel, sampler_args)


def _convert(
    model: ResNet,
    sizes: Optional[Tuple[int, int, int]],
    sampler: str,
    saliency_kernel: int,
    sampler_args: Optional[Dict[str, Any]],
) -> ResNet:
    """Convert a checked model in place, with checked arguments (``sizes`` resolved: ``None`` for dconv)."""
    for stage_name, size in zip(SSB_STAGES, sizes or (None, None, None), strict=True):
        stage = getattr(model, stage_name)
        for index in range(1, len(stage)):
            stage[index] = SSBBottleneck.from_bottleneck(
                stage[index], sampler, size, saliency_kernel=saliency_kernel, sampler_args=sampler_args
            )
    use_ssb_stages(model)
    model.ssb_sizes = sizes  # as on SSBResNet
    model.ssb_sampler = sampler
    model.ssb_saliency_kernel = saliency_kernel
    return model


def _source_cfg(source: Any) -> Dict[str, Any]:
    """The timm cfg of ``ssb_source`` (a model name with an optional tag); ``ValueError`` naming it if there is none."""
    error = f'ssb_source must name a timm model (with an optional .tag); got {source!r}'
    if not isinstance(source, str) or not timm.is_model(source.split('.', 1)[0]):
        raise ValueError(error)
    try:
        cfg = get_pretrained_cfg(source)
    except RuntimeError as e:  # a model timm knows, with a tag it does not
        raise ValueError(f'{error}: {e}') from e
    return cfg.to_dict() if cfg is not None else {}


def _converted_cfg(source_cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The ``ssb_resnet`` cfg of a source: no weights of its own, the source's data config and layer names."""
    keys = (*SOURCE_DATA_CFG_KEYS, 'num_classes', 'first_conv', 'classifier', 'license')
    return ssb_cfg(**{k: source_cfg[k] for k in keys if k in source_cfg})


default_cfgs = generate_default_cfgs({'ssb_resnet': ssb_cfg()})


@register_model
def ssb_resnet(
    pretrained: bool = False,
    ssb_source: str = DEFAULT_SSB_SOURCE,
    ssb_sizes: Optional[Sequence[int]] = None,
    ssb_sampler: str = 'adaptive',
    ssb_saliency_kernel: int = 1,
    ssb_sampler_args: Optional[Dict[str, Any]] = None,
    **kwargs: Any,
) -> ResNet:
    """The SSB version of the timm bottleneck ResNet ``ssb_source`` (a model name with an optional tag).

    ``pretrained=True`` loads, by default, the source's timm weights (``ssb_source``'s tag chooses which)
    and converts the model with :func:`ssbify`; given weights of the SSB model itself (``hf-hub:``,
    ``local-dir:`` or ``pretrained_cfg_overlay=dict(file=...)``), it loads those. The other keyword
    arguments go to the source model (``num_classes``, ``drop_path_rate``, ``output_stride``, ...).
    """
    source_cfg = _source_cfg(ssb_source)
    sizes = check_ssb_args(ssb_sizes, ssb_sampler, ssb_saliency_kernel, ssb_sampler_args)
    cfg = kwargs.pop('pretrained_cfg', None)
    overlay = kwargs.pop('pretrained_cfg_overlay', None)
    if cfg is None or isinstance(cfg, str):  # not the cfg of saved SSB weights (hf-hub:, local-dir:): the source's
        cfg = dataclasses.replace(resolve_pretrained_cfg('ssb_resnet', cfg), **_converted_cfg(source_cfg))
    cfg = resolve_pretrained_cfg('ssb_resnet', cfg, overlay)
    own_weights = bool(pretrained and cfg.has_weights)

    def convert(**source_kwargs: Any) -> ResNet:
        load_source = pretrained and not own_weights
        try:
            source = timm.create_model(ssb_source, pretrained=load_source, **source_kwargs)
        except (OSError, HfHubHTTPError, EntryNotFoundError, SafetensorError) as e:
            if not load_source:
                raise
            raise RuntimeError(
                f"ssb_resnet: timm's weights of ssb_source={ssb_source!r} could not be loaded: "
                f'{weights_error_reason(e)}. ' + source_weights_hint(ssb_source)
            ) from e
        _check_convertible(source)
        return _convert(source, sizes, ssb_sampler, ssb_saliency_kernel, ssb_sampler_args)

    return build_model_with_cfg(
        convert,
        'ssb_resnet',
        own_weights,
        pretrained_cfg=cfg,
        pretrained_filter_fn=add_missing_sampler_tensors,
        **kwargs,
    )
