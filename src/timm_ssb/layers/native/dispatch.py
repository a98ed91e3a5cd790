"""Which implementation the sampling uses: the backends and their resolution order, in one place.

Backends (``TIMM_SSB_SAMPLING_BACKEND`` at import, :func:`set_sampling_backend` at run time):

* ``'auto'`` (default): the native kernel for the map's device, loaded at first use -- the C++ kernel
  (:mod:`.cpu.build`) for float32/bfloat16 CPU maps where it was measured clearly faster than PyTorch's products on this
  machine for that dtype, mode (inference or training) and way (down, or up; :mod:`.calibration`), the Triton kernel
  (:mod:`.triton.resample_kernel`) for float32/bfloat16/float16 CUDA maps; if it cannot be built or loaded, one warning
  and PyTorch from then on.
  The adaptive sampler's matrices are built by a native op too (:mod:`.matrices`): C++ on the CPU, Triton on
  CUDA;
* ``'native'``: the native kernels wherever they serve the map, without measuring; one that cannot be built or
  loaded is an error;
* ``'triton'``: the Triton kernel on every device: CUDA, and CPU tensors under Triton's interpreter
  (``TRITON_INTERPRET=1``; slow, for testing the GPU kernel without a GPU); an error where it cannot run;
  the matrices are built as on CUDA;
* ``'reference'``: PyTorch only (batched matrix products), never compiling anything.

The kernels serve channels-last maps (the caller checks); other dtypes take PyTorch whatever the backend.
Whatever the backend, export (``torch.export``, both ``torch.onnx.export`` exporters), tracing and TorchScript use
the PyTorch reference (``resample_reference``), so exported models hold standard ops only. The choice is read
when a model runs (or is traced by ``torch.compile``: set the backend before compiling).
"""

import os
from typing import Callable, Optional, Tuple

import torch

from .calibration import native_resample_is_faster
from .cpu.build import cpu_library
from .loading import KernelLoader
from .matrices import adaptive_matrices_cpu, adaptive_matrices_eager, adaptive_matrices_triton, triton_matrices_fit
from .resample import TRITON_KERNEL_DTYPES, separable_resample, separable_resample_eager, separable_resample_triton
from .triton import triton_kernels

__all__ = [
    'SAMPLING_BACKENDS',
    'CPU_KERNEL_DTYPES',
    'get_sampling_backend',
    'set_sampling_backend',
    'native_op',
    'native_matrices_op',
]

SAMPLING_BACKENDS = ('auto', 'native', 'triton', 'reference')
CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16)

_config = {'backend': 'auto'}


def set_sampling_backend(backend: str) -> None:
    """Choose the sampling's implementation: one of :data:`SAMPLING_BACKENDS`."""
    if backend not in SAMPLING_BACKENDS:
        raise ValueError(f'backend must be one of {", ".join(map(repr, SAMPLING_BACKENDS))}; got {backend!r}')
    _config['backend'] = backend


def get_sampling_backend() -> str:
    """The backend chosen (not whether the native kernels could be built: see ``cpu_library.error``)."""
    return _config['backend']


def _kernel_ready(loader: KernelLoader, forced: Tuple[str, ...]) -> bool:
    """Whether a kernel is to be used under the chosen backend and is built or loaded (a failure warns once under
    ``'auto'``); a backend in ``forced`` that cannot have it is an error."""
    backend = _config['backend']
    if backend == 'reference':
        return False
    if loader(warn=backend == 'auto'):
        return True
    if backend in forced:
        raise RuntimeError(
            f'TIMM_SSB_SAMPLING_BACKEND={backend}, but the {loader.name} could not be built or loaded: {loader.error}'
        )
    return False


@torch.compiler.assume_constant_result
def _native_cpu_ready() -> bool:
    """Whether the native CPU kernels are to be used and are built; a constant to ``torch.compile``."""
    return _kernel_ready(cpu_library, ('native',))


@torch.compiler.assume_constant_result
def _native_cpu_resample_chosen(dtype: torch.dtype, training: bool, up: bool) -> bool:
    """Whether the native CPU resampling runs the way ``up`` or down for maps of ``dtype`` in ``training``
    (autograd) or inference: under ``'native'`` wherever it is built, under ``'auto'`` where it was also measured
    faster (:mod:`.calibration`)."""
    if not _native_cpu_ready():
        return False
    return _config['backend'] == 'native' or native_resample_is_faster(dtype, training, up)


@torch.compiler.assume_constant_result
def _triton_ready() -> bool:
    """Whether the Triton kernel is to be used on CUDA maps (or, backend ``'triton'``, on any) and is loaded."""
    return _kernel_ready(triton_kernels, ('native', 'triton'))


@torch.compiler.assume_constant_result
def _triton_everywhere() -> bool:
    return _config['backend'] == 'triton'


def native_op(x: torch.Tensor, training: bool = False, up: bool = False) -> Optional[Callable[..., torch.Tensor]]:
    """The fused op that samples ``x`` (channels-last, checked by the caller) under the chosen backend, or
    ``None`` for PyTorch's batched products; ``training``: autograd will need its backward; ``up``: mapping a result
    back up (the output larger than ``x``), else sampling down."""
    if _triton_everywhere():
        return separable_resample_triton if x.dtype in TRITON_KERNEL_DTYPES and _triton_ready() else None
    on_cpu = x.device.type == 'cpu' and x.dtype in CPU_KERNEL_DTYPES
    if on_cpu and _native_cpu_resample_chosen(x.dtype, training, up):
        return separable_resample if torch.compiler.is_compiling() else separable_resample_eager
    if x.device.type == 'cuda' and x.dtype in TRITON_KERNEL_DTYPES and _triton_ready():
        return separable_resample_triton
    return None


def native_matrices_op(logits: torch.Tensor) -> Optional[Callable[..., Tuple[torch.Tensor, ...]]]:
    """The native op that builds the adaptive sampler's matrices from ``(B, [1,] H, W)`` ``logits`` under the chosen
    backend, or ``None`` for PyTorch's ops: the C++ one for CPU logits; the Triton one for CUDA logits (any logits
    under backend ``'triton'``) where the map is not too large for it."""
    if logits.device.type == 'cpu' and not _triton_everywhere() and _native_cpu_ready():
        return adaptive_matrices_cpu if torch.compiler.is_compiling() else adaptive_matrices_eager
    if logits.device.type != 'cuda' and not _triton_everywhere():
        return None
    if _triton_ready() and triton_matrices_fit(logits.shape[-2], logits.shape[-1]):
        return adaptive_matrices_triton
    return None


def _backend_from_environment() -> None:
    backend = os.environ.get('TIMM_SSB_SAMPLING_BACKEND', 'auto')
    if backend not in SAMPLING_BACKENDS:
        raise ValueError(f'TIMM_SSB_SAMPLING_BACKEND must be one of {", ".join(SAMPLING_BACKENDS)}; got {backend!r}')
    _config['backend'] = backend


_backend_from_environment()
