"""Model definitions; importing this package registers the models with timm."""

from typing import Optional

from .ssb_resnet import BASELINES, DEFAULT_SSB_SIZES, SSBBottleneck, SSBResNet
from .ssbify import DEFAULT_SSB_SOURCE, ssbify


def baseline_of(name: str) -> Optional[str]:
    """The timm model SSB model ``name`` is counted and timed against: its :data:`BASELINES` entry, or for
    ``ssb_resnet`` its default ``ssb_source``; ``None`` for other names."""
    return BASELINES.get(name, DEFAULT_SSB_SOURCE if name == 'ssb_resnet' else None)
