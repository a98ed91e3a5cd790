"""Model definitions; importing this package registers the models with timm."""

from .ssb_resnet import BASELINES, DEFAULT_SSB_SIZES, SSBBottleneck, SSBResNet
from .ssbify import ssbify
