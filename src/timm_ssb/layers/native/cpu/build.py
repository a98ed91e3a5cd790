"""Build the native CPU sampling kernels at first use, cache them, load them; or say once why not.

The C++ sources (:data:`SOURCES`, shipped in the package: the fused resampling, the adaptive sampler's
matrices) are compiled into one library with the system's C++ compiler through
:func:`torch.utils.cpp_extension.load` the first time a native sampling op runs on the CPU, into
``$TIMM_SSB_CACHE`` (default ``~/.cache/timm_ssb``) under a directory named by a hash of the sources, the
torch version, the compiler flags and this CPU's instruction sets (the code is built for the CPU it runs on,
``-march=native`` -- on Apple silicon the compiler's default target --, or ``$TIMM_SSB_CPU_ARCH``; with OpenMP
through torch's own runtime, :func:`openmp_flags`). Later processes load the cached library; one that does not load is
rebuilt once, and so is one that differs from what its build recorded (its SHA-256); processes that start together (DDP
ranks on the CPU, the test suite's workers) take turns (:func:`build_lock`): one builds, the others load its library.
Nothing is compiled at ``pip install``. The build needs a C++ compiler (not installable by pip) and ninja (the ``ninja``
package, a dependency, when there is none on ``PATH``); it says on stderr that it is building.

The library registers ``torch.ops.timm_ssb_cpu.separable_resample`` and ``.adaptive_matrices``, each with its
backward (no pybind module, so nothing breaks a ``torch.compile`` graph). When it cannot be built (no compiler,
a failed build), the first call warns once and the PyTorch implementation is used from then on.
"""

import hashlib
import logging
import os
import platform
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import torch
from filelock import FileLock, Timeout

from ...tail_cuts import KERNEL_WEIGHT_LOG, SMALLEST_WEIGHT_LOG
from ..loading import KernelLoader
from .features import cpu_signature

__all__ = [
    'SOURCES',
    'COMPILER_HINT',
    'build_tools',
    'cpu_arch',
    'arch_flags',
    'openmp_flags',
    'cflags',
    'cache_dir',
    'build_lock',
    'cpu_library',
]

SOURCES = tuple(Path(__file__).with_name(name) for name in ('resample.cpp', 'matrices.cpp'))
CPU_ARCH_ENV = 'TIMM_SSB_CPU_ARCH'
COMPILER_HINT = (
    'install a C++20 compiler (Debian/Ubuntu: apt install g++; Fedora: dnf install gcc-c++; macOS: xcode-select '
    '--install) or point CXX at one'
)
_ARCH_PATTERN = re.compile(r'[A-Za-z0-9][A-Za-z0-9._+-]*')


def cpu_arch() -> str:
    """The target the kernels are compiled for: ``$TIMM_SSB_CPU_ARCH`` (a ``-march`` value such as ``x86-64-v3``
    for AVX2 code on any x86-64 CPU since Haswell), ``native`` (this CPU) by default."""
    arch = os.environ.get(CPU_ARCH_ENV, 'native')
    if not _ARCH_PATTERN.fullmatch(arch):
        raise ValueError(f'{CPU_ARCH_ENV} must be a compiler -march value such as native or x86-64-v3; got {arch!r}')
    return arch


def arch_flags(system: str = sys.platform, machine: Optional[str] = None) -> Tuple[str, ...]:
    """``-march=`` :func:`cpu_arch`; none for ``native`` on Apple silicon, where Apple's Clang has not accepted
    ``-march=native`` in every version and its default target (the M1's) has all the kernels use: NEON, which every
    AArch64 CPU has."""
    arch = cpu_arch()
    apple_silicon = system == 'darwin' and (machine or platform.machine()) == 'arm64'
    return () if arch == 'native' and apple_silicon else (f'-march={arch}',)


def openmp_flags(system: str = sys.platform) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """The compile and the link flags that run the kernels' ``at::parallel_for`` on the threads torch's own CPU
    operators use. ATen's ``parallel_for`` is a header template: in a torch built with OpenMP (its Linux and macOS
    wheels) it opens an OpenMP parallel region in the kernels' own code, which must be compiled for OpenMP and linked
    to torch's runtime -- without, it runs on one thread. On Linux that is GCC's ``-fopenmp`` (libgomp, which torch
    loads). On macOS, where Apple's Clang rejects ``-fopenmp``, ``-Xclang -fopenmp`` with the ``omp.h`` and
    ``libomp.dylib`` torch's wheel ships (its headers are on the build's include path; its ``lib`` folder is
    linked and searched at load time), as ``torch.compile``'s C++ builds do there. A torch built with its own
    thread pool instead needs no flags: ``parallel_for`` then calls into libtorch."""
    if not torch.backends.openmp.is_available():
        return (), ()
    if system == 'darwin':
        lib = Path(torch.__file__).parent / 'lib'
        return ('-Xclang', '-fopenmp'), (f'-L{lib}', '-lomp', f'-Wl,-rpath,{lib}')
    return ('-fopenmp',), ('-fopenmp',)


def cflags() -> Tuple[str, ...]:
    """The compiler flags of the kernel library, for the target :func:`cpu_arch`, with OpenMP
    (:func:`openmp_flags`) and the softmaxes' tail cuts (:mod:`timm_ssb.layers.tail_cuts`) defined for the
    sources."""
    cuts = {'SMALLEST_WEIGHT_LOG': SMALLEST_WEIGHT_LOG, 'KERNEL_WEIGHT_LOG': KERNEL_WEIGHT_LOG}
    return (
        '-O3',
        *arch_flags(),
        *openmp_flags()[0],
        *(f'-DTIMM_SSB_{name}={value!r}' for name, value in cuts.items()),
    )


def cache_dir() -> Path:
    """Where this build of the sources, torch version, flags and CPU lives."""
    key = hashlib.sha256()
    sources = tuple(source.read_bytes() for source in SOURCES)
    for part in (*sources, torch.__version__.encode(), ' '.join(cflags()).encode(), cpu_signature().encode()):
        key.update(part)
        key.update(b'\0')
    root = Path(os.environ.get('TIMM_SSB_CACHE', Path.home() / '.cache' / 'timm_ssb'))
    return root / f'timm_ssb_cpu_{key.hexdigest()[:16]}'


def build_tools() -> Dict[str, Optional[str]]:
    """Where the build's tools are (``None``: not found): the C++ compiler (``$CXX``, default ``c++``) on ``PATH``,
    and ninja on ``PATH`` or from the ``ninja`` package (a dependency of this one)."""
    return {'compiler': shutil.which(_compiler()), 'ninja': shutil.which('ninja') or _packaged_ninja()}


def _compiler() -> str:
    return os.environ.get('CXX', 'c++')


def _packaged_ninja() -> Optional[str]:
    try:
        import ninja
    except ImportError:
        return None
    return shutil.which('ninja', path=ninja.BIN_DIR)


def _fallback_warning(error: str) -> str:
    try:
        where = f' in {cache_dir()}'
    except ValueError:  # a bad TIMM_SSB_CPU_ARCH: the error says so
        where = ''
    return (
        f'timm_ssb: the native CPU sampling kernels could not be built or loaded{where} ({error}); the sampling runs '
        'in PyTorch (correct, slower). `timm-ssb info` says why and what to do. Set '
        'TIMM_SSB_SAMPLING_BACKEND=reference to use PyTorch without trying, or =native to make this an error.'
    )


def _build_and_load() -> None:
    if hasattr(torch.ops.timm_ssb_cpu, 'adaptive_matrices'):  # loaded by other means in this process
        return
    tools = build_tools()
    if tools['compiler'] is None:
        raise RuntimeError(f'no C++ compiler: {_compiler()!r} is not on PATH; {COMPILER_HINT}')
    if tools['ninja'] is None:
        raise RuntimeError('ninja is not on PATH and the ninja package is not installed; pip install ninja')
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RuntimeError(f'cannot create the cache {directory} ({e}); set TIMM_SSB_CACHE to a writable folder') from e
    with _held(build_lock(directory), directory):
        _load_or_build(directory, tools['ninja'])


def build_lock(directory: Path) -> FileLock:
    """The lock that one process at a time holds while it checks, builds, loads and records the library in
    ``directory``: another one arriving after the linker wrote it but before its record (DDP ranks, or the suite's
    workers, starting on a fresh machine) would take it for a damaged one and delete it under the builder. It lies
    beside the folder, which a rebuild empties."""
    return FileLock(str(directory.with_name(f'{directory.name}.lock')))


@contextmanager
def _held(lock: FileLock, directory: Path) -> Iterator[None]:
    try:
        try:
            lock.acquire(timeout=1)  # another process loading the library: a moment, not worth a word
        except Timeout:
            _say(f'waiting for another process building or loading the kernels in {directory}')
            lock.acquire()
    except OSError as e:
        raise RuntimeError(f'cannot lock the cache {directory} ({e}); set TIMM_SSB_CACHE to a writable folder') from e
    try:
        yield
    finally:
        lock.release()


def _load_or_build(directory: Path, ninja: str) -> None:
    library, digest = directory / f'{directory.name}.so', directory / 'library.sha256'
    if library.exists() and not _intact(library, digest):
        # Cut short or overwritten (a full disk, a killed build): loading it could crash the process (SIGBUS).
        found = 'differs from what its build recorded' if digest.exists() else 'has no record of its build'
        _say(f'the cached kernel library {library} {found}; rebuilding it')
        _empty(directory)
    cached = library.exists()
    if not cached:
        target = ' '.join(arch_flags()) or "the compiler's default target"
        _say(f'building the native CPU sampling kernels for {target} into {directory} (once, about 20 s)')
    try:
        _compile_and_load(directory, ninja)
    except Exception as e:
        if not cached:
            raise
        _say(f'the cached kernel library in {directory} could not be loaded ({type(e).__name__}); rebuilding it')
        _empty(directory)
        _compile_and_load(directory, ninja)
    # Recorded after every load: torch's build may have rebuilt the library (sources at another path, say).
    loaded = _sha256(library)
    if not _intact(library, digest, loaded):
        partial = digest.with_suffix(f'.{os.getpid()}.tmp')
        partial.write_text(loaded)
        partial.replace(digest)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _intact(library: Path, digest: Path, sha256: Optional[str] = None) -> bool:
    """Whether ``library`` (whose SHA-256 is ``sha256``, if known) is the file its build recorded in ``digest``."""
    try:
        return digest.read_text().strip() == (sha256 or _sha256(library))
    except OSError:
        return False


def _empty(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)


def _say(message: str) -> None:
    print(f'timm_ssb: {message}', file=sys.stderr, flush=True)


def _compile_and_load(directory: Path, ninja: str) -> None:
    logger = logging.getLogger('torch.utils.cpp_extension')
    level = logger.level
    logger.setLevel(logging.ERROR)  # its import warns about CUDA_HOME, which a CPU build does not use
    try:
        from torch.utils.cpp_extension import load
    finally:
        logger.setLevel(level)
    path = os.environ.get('PATH', '')
    os.environ['PATH'] = os.pathsep.join((os.path.dirname(ninja), path))  # torch runs `ninja` from PATH
    try:
        load(
            name=directory.name,
            sources=[str(source) for source in SOURCES],
            extra_cflags=list(cflags()),
            extra_ldflags=list(openmp_flags()[1]),
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )
    finally:
        os.environ['PATH'] = path


cpu_library: KernelLoader[None] = KernelLoader('native CPU sampling kernels', _build_and_load, _fallback_warning)
"""The C++ library: ``cpu_library(warn=...)`` builds (once per source, torch and CPU) and loads it, ``False`` if that
failed; ``cpu_library.error`` says why, ``cpu_library.require()`` raises saying so."""
