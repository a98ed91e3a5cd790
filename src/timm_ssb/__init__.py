"""SSBNet models for timm. ``import timm_ssb`` registers ``ssb_*`` models with ``timm.create_model``."""

from .layers import SAMPLERS, create_sampler
from .models import BASELINES, DEFAULT_SSB_SIZES, SSBBottleneck, SSBResNet, ssbify
from .version import __version__
