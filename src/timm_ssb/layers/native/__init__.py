"""Native sampling kernels behind two ops, and which implementation runs.

* :mod:`.resample`: ``separable_resample`` (C++) and ``separable_resample_triton``, one schema, with fake, FLOP
  count and autograd; the PyTorch path is :mod:`.batched_products`.
* :mod:`.matrices`: the adaptive sampler's matrices, ``adaptive_matrices_cpu`` (C++) and
  ``adaptive_matrices_triton``.
* :mod:`.dispatch`: the backends (``auto``, ``native``, ``triton``, ``reference``) and the rule that picks an
  implementation; :mod:`.calibration`: what ``auto`` measured on this CPU.
* :mod:`.cpu` (C++ sources, their build and cache, the CPU's features) and :mod:`.triton` (the Triton kernels),
  each loaded once by a :class:`~.loading.KernelLoader`.
"""

from .batched_products import BatchedProductsResample
from .calibration import calibrate, forget_calibration, native_resample_is_faster
from .cpu.build import cache_dir, cpu_arch, cpu_library
from .dispatch import (
    CPU_KERNEL_DTYPES,
    SAMPLING_BACKENDS,
    get_sampling_backend,
    native_matrices_op,
    native_op,
    set_sampling_backend,
)
from .matrices import (
    adaptive_matrices_cpu,
    adaptive_matrices_cpu_backward,
    adaptive_matrices_eager,
    adaptive_matrices_triton,
    adaptive_matrices_triton_backward,
    triton_matrices_fit,
)
from .resample import (
    TRITON_KERNEL_DTYPES,
    cpu_ops,
    custom_ops_needed,
    separable_resample,
    separable_resample_backward,
    separable_resample_eager,
    separable_resample_into_residual,
    separable_resample_saliency,
    separable_resample_triton,
)
from .triton import triton_kernels

__all__ = [
    'SAMPLING_BACKENDS',
    'CPU_KERNEL_DTYPES',
    'TRITON_KERNEL_DTYPES',
    'get_sampling_backend',
    'set_sampling_backend',
    'native_op',
    'native_matrices_op',
    'native_resample_is_faster',
    'calibrate',
    'forget_calibration',
    'BatchedProductsResample',
    'cpu_ops',
    'custom_ops_needed',
    'separable_resample',
    'separable_resample_backward',
    'separable_resample_eager',
    'separable_resample_into_residual',
    'separable_resample_saliency',
    'separable_resample_triton',
    'adaptive_matrices_cpu',
    'adaptive_matrices_cpu_backward',
    'adaptive_matrices_eager',
    'adaptive_matrices_triton',
    'adaptive_matrices_triton_backward',
    'triton_matrices_fit',
    'cpu_library',
    'triton_kernels',
    'cache_dir',
    'cpu_arch',
]
