"""The Triton kernels: the resampling (:mod:`.resample_kernel`) and the adaptive matrices (:mod:`.matrices_kernel`).

They run on CUDA, and on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``), which is how they are tested
without a GPU. Triton is optional: :data:`triton_kernels` imports them at first use and remembers why it could not.
"""

import importlib
from types import SimpleNamespace

from ..loading import KernelLoader

__all__ = ['triton_kernels']


def _import_kernels() -> SimpleNamespace:
    return SimpleNamespace(
        resample=importlib.import_module(f'{__name__}.resample_kernel'),
        matrices=importlib.import_module(f'{__name__}.matrices_kernel'),
    )


def _fallback_warning(error: str) -> str:
    return (
        f'timm_ssb: the Triton sampling kernels could not be loaded ({error}); the sampling uses PyTorch (set '
        'TIMM_SSB_SAMPLING_BACKEND=reference to choose that and silence this warning)'
    )


triton_kernels: KernelLoader[SimpleNamespace] = KernelLoader(
    'Triton sampling kernels', _import_kernels, _fallback_warning
)
"""``triton_kernels(warn=...)`` imports them (once); ``triton_kernels.value.resample`` and ``.matrices`` are the
kernel modules, ``triton_kernels.error`` says why they could not be imported."""
