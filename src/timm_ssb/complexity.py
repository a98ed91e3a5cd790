"""Parameter and multiply-accumulate counts, the way the paper reports them.

GMACs are counted with :class:`torch.utils.flop_counter.FlopCounterMode` (FLOPs / 2) on the
``meta`` device, so counting even the largest model allocates no memory and takes a moment. The
counter sees every convolution, the classifier and the sampling matrix products; like the paper
it does not count normalisation, activations, pooling or interpolation.
"""

from dataclasses import dataclass
from typing import Any, Sequence

import timm
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['Complexity', 'count_params', 'count_gmacs', 'model_complexity']


@dataclass(frozen=True)
class Complexity:
    """Parameters (millions) and GMACs of a model at one input size."""

    params_m: float
    gmacs: float


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BatchNorm statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_gmacs(model: nn.Module, input_size: Sequence[int] = (3, 224, 224), batch_size: int = 1) -> float:
    """GMACs of one forward pass per image, counted on whatever device ``model`` lives on."""
    device = next(model.parameters()).device
    x = torch.empty((batch_size, *input_size), device=device)
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    model.train(was_training)
    return counter.get_total_flops() / 2 / batch_size / 1e9


def model_complexity(model_name: str, input_size: Sequence[int] = (3, 224, 224), **kwargs: Any) -> Complexity:
    """Build ``model_name`` on the meta device and count its parameters and GMACs."""
    model = timm.create_model(model_name, device='meta', **kwargs)
    return Complexity(params_m=count_params(model) / 1e6, gmacs=count_gmacs(model, input_size))
