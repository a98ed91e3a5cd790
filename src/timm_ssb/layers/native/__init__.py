"""Native sampling kernels, and which implementation the sampling uses.

Backends (``TIMM_SSB_SAMPLING_BACKEND`` at import, :func:`set_sampling_backend` at run time):

* ``'auto'`` (default): the native CPU kernel (:mod:`.ops`) for channels-last float32/bfloat16 CPU maps, built at
  first use; if it cannot be built, one warning and PyTorch from then on;
* ``'native'``: the same, but a kernel that cannot be built is an error;
* ``'reference'``: PyTorch only (batched matrix products), never compiling anything.

Whatever the backend, export (``torch.export``, both ``torch.onnx.export`` exporters), tracing and TorchScript use
the PyTorch reference (``resample_reference``), so exported models hold standard ops only. The choice is read
when a model runs (or is traced by ``torch.compile``: set the backend before compiling).
"""

import os

import torch

from .build import cache_dir, cpu_library_error, load_cpu_library
from .ops import separable_resample

__all__ = [
    'SAMPLING_BACKENDS',
    'get_sampling_backend',
    'set_sampling_backend',
    'use_native_cpu',
    'separable_resample',
    'cache_dir',
    'cpu_library_error',
]

SAMPLING_BACKENDS = ('auto', 'native', 'reference')

_config = {'backend': 'auto'}


def set_sampling_backend(backend: str) -> None:
    """Choose the sampling's implementation: one of :data:`SAMPLING_BACKENDS`."""
    if backend not in SAMPLING_BACKENDS:
        raise ValueError(f'backend must be one of {", ".join(map(repr, SAMPLING_BACKENDS))}; got {backend!r}')
    _config['backend'] = backend


def get_sampling_backend() -> str:
    """The backend chosen (not whether the native kernel could be built: see :func:`cpu_library_error`)."""
    return _config['backend']


@torch.compiler.assume_constant_result
def _native_cpu_ready() -> bool:
    """Whether the native CPU kernel is to be used and is built; a constant to ``torch.compile``."""
    backend = _config['backend']
    if backend == 'reference':
        return False
    if load_cpu_library(warn=backend == 'auto'):
        return True
    if backend == 'native':
        raise RuntimeError(
            f'TIMM_SSB_SAMPLING_BACKEND=native, but the native CPU sampling kernel could not be built or loaded: '
            f'{cpu_library_error()}'
        )
    return False


def use_native_cpu(x: torch.Tensor) -> bool:
    """Whether the sampling of ``x`` (channels-last, checked by the caller) runs in the native CPU kernel."""
    return x.device.type == 'cpu' and x.dtype in (torch.float32, torch.bfloat16) and _native_cpu_ready()


def _backend_from_environment() -> None:
    backend = os.environ.get('TIMM_SSB_SAMPLING_BACKEND', 'auto')
    if backend not in SAMPLING_BACKENDS:
        raise ValueError(f'TIMM_SSB_SAMPLING_BACKEND must be one of {", ".join(SAMPLING_BACKENDS)}; got {backend!r}')
    _config['backend'] = backend


_backend_from_environment()
