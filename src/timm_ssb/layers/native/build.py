"""Build the native CPU sampling kernels at first use, cache them, load them; or say once why not.

The C++ sources (:data:`SOURCES`, shipped in the package: the fused resampling, the adaptive sampler's
matrices) are compiled into one library with the system's C++ compiler through
:func:`torch.utils.cpp_extension.load` the first time a native sampling op runs on the CPU, into
``$TIMM_SSB_CACHE`` (default ``~/.cache/timm_ssb``) under a directory named by a hash of the sources, the
torch version, the compiler flags and this CPU's instruction sets (the code is built for the CPU it runs on,
``-march=native``). Later processes load the cached library. Nothing is compiled at ``pip install``.

The library registers ``torch.ops.timm_ssb_cpu.separable_resample`` and ``.adaptive_matrices``, each with its
backward (no pybind module, so nothing breaks a ``torch.compile`` graph). When it cannot be built (no compiler,
a failed build), the first call warns once and the PyTorch implementation is used from then on.
"""

import hashlib
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Optional, Tuple

import torch

from .cpu_features import cpu_signature

__all__ = ['SOURCES', 'cpu_arch', 'cflags', 'cache_dir', 'cpu_library_error', 'load_cpu_library']

SOURCES = tuple(Path(__file__).with_name(name) for name in ('separable_resample_cpu.cpp', 'adaptive_matrices_cpu.cpp'))
CPU_ARCH_ENV = 'TIMM_SSB_CPU_ARCH'
_ARCH_PATTERN = re.compile(r'[A-Za-z0-9][A-Za-z0-9._+-]*')


def cpu_arch() -> str:
    """The target the kernels are compiled for: ``$TIMM_SSB_CPU_ARCH`` (a ``-march`` value such as ``x86-64-v3``
    for AVX2 code on any x86-64 CPU since Haswell), ``native`` (this CPU) by default."""
    arch = os.environ.get(CPU_ARCH_ENV, 'native')
    if not _ARCH_PATTERN.fullmatch(arch):
        raise ValueError(f'{CPU_ARCH_ENV} must be a compiler -march value such as native or x86-64-v3; got {arch!r}')
    return arch


def cflags() -> Tuple[str, ...]:
    """The compiler flags of the kernel library, for the target :func:`cpu_arch`."""
    return ('-O3', f'-march={cpu_arch()}', '-fopenmp')


_state = {'loaded': False, 'error': None}


def cache_dir() -> Path:
    """Where this build of the sources, torch version, flags and CPU lives."""
    key = hashlib.sha256()
    sources = tuple(source.read_bytes() for source in SOURCES)
    for part in (*sources, torch.__version__.encode(), ' '.join(cflags()).encode(), cpu_signature().encode()):
        key.update(part)
        key.update(b'\0')
    root = Path(os.environ.get('TIMM_SSB_CACHE', Path.home() / '.cache' / 'timm_ssb'))
    return root / f'separable_resample_cpu_{key.hexdigest()[:16]}'


def load_cpu_library(warn: bool = True) -> bool:
    """Build (once per source, torch and CPU) and load the kernel library; ``False`` if that failed.

    A failure is remembered (no second attempt in the process) and, with ``warn``, warned about; its message
    is :func:`cpu_library_error`.
    """
    if _state['loaded']:
        return True
    if _state['error'] is not None:
        return False
    try:
        _build_and_load()
    except Exception as e:  # a missing compiler, a failed build or load: all mean "use PyTorch"
        _state['error'] = f'{type(e).__name__}: {e}'.strip().splitlines()[0]
        if not warn:
            return False
        warnings.warn(
            f'timm_ssb: the native CPU sampling kernel could not be built or loaded ({_state["error"]}); the sampling '
            'runs in PyTorch (correct, slower). Set TIMM_SSB_SAMPLING_BACKEND=reference to use PyTorch without '
            'trying, or =native to make this an error.',
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    _state['loaded'] = True
    return True


def cpu_library_error() -> Optional[str]:
    """Why the library could not be built or loaded, once that was tried; else ``None``."""
    return _state['error']


def _build_and_load() -> None:
    if hasattr(torch.ops.timm_ssb_cpu, 'adaptive_matrices'):  # loaded by other means in this process
        return
    logger = logging.getLogger('torch.utils.cpp_extension')
    level = logger.level
    logger.setLevel(logging.ERROR)  # its import warns about CUDA_HOME, which a CPU build does not use
    try:
        from torch.utils.cpp_extension import load
    finally:
        logger.setLevel(level)
    build_directory = cache_dir()
    build_directory.mkdir(parents=True, exist_ok=True)
    load(
        name=build_directory.name,
        sources=[str(source) for source in SOURCES],
        extra_cflags=list(cflags()),
        extra_ldflags=['-fopenmp'],
        build_directory=str(build_directory),
        is_python_module=False,
        verbose=False,
    )
