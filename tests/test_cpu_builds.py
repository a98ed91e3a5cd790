"""The native CPU kernels built for another instruction set than this CPU's best: ``TIMM_SSB_CPU_ARCH``."""

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from timm_ssb.layers.native.cpu import build
from timm_ssb.layers.native.cpu.features import cpu_flags, cpu_model, vector_isa

AVX2_LEVEL_FLAGS = {'avx', 'avx2', 'bmi1', 'bmi2', 'f16c', 'fma', 'movbe', 'xsave'}
"""The CPU flags (as /proc/cpuinfo names them) that ``-march=x86-64-v3`` code may use."""


def test_arch_is_part_of_the_build_and_its_cache_key(monkeypatch):
    monkeypatch.delenv(build.CPU_ARCH_ENV, raising=False)
    assert build.cpu_arch() == 'native' and '-march=native' in build.cflags()
    native_dir = build.cache_dir()
    monkeypatch.setenv(build.CPU_ARCH_ENV, 'x86-64-v3')
    assert '-march=x86-64-v3' in build.cflags()
    assert build.cache_dir() != native_dir


@pytest.mark.parametrize('arch', ['', 'native -O0', '-mavx', 'x86-64-v3;rm'])
def test_bad_arch_is_an_error_naming_the_variable(monkeypatch, arch):
    monkeypatch.setenv(build.CPU_ARCH_ENV, arch)
    with pytest.raises(ValueError, match='TIMM_SSB_CPU_ARCH must be a compiler -march value'):
        build.cflags()


def test_openmp_flags_link_the_kernels_to_torchs_openmp_runtime(monkeypatch):
    """Linux: GCC's -fopenmp (libgomp, torch's). macOS: Apple's Clang rejects -fopenmp; -Xclang -fopenmp and the
    libomp in torch's own lib folder, found at load time too. A torch without OpenMP: none (its parallel_for calls
    into libtorch)."""
    assert build.openmp_flags('linux') == (('-fopenmp',), ('-fopenmp',))
    compile_flags, link_flags = build.openmp_flags('darwin')
    torch_lib = Path(torch.__file__).parent / 'lib'
    assert compile_flags == ('-Xclang', '-fopenmp')
    assert link_flags == (f'-L{torch_lib}', '-lomp', f'-Wl,-rpath,{torch_lib}')
    if sys.platform == 'linux' and torch.backends.openmp.is_available():
        assert '-fopenmp' in build.cflags()
    monkeypatch.setattr(torch.backends.openmp, 'is_available', lambda: False)
    assert build.openmp_flags('linux') == build.openmp_flags('darwin') == ((), ())
    assert not any('openmp' in flag for flag in build.cflags())


@pytest.mark.skipif(not torch.backends.openmp.is_available(), reason='this torch runs parallel_for without OpenMP')
def test_built_kernels_open_openmp_parallel_regions():
    """The library built here calls the OpenMP runtime's parallel entry (GCC's ``GOMP_parallel``, Clang's
    ``__kmpc_fork_call``): without the build's OpenMP flags ATen's header-only ``parallel_for`` compiles to a loop on
    one thread, and every kernel would run on one core, correct and slower."""
    build.cpu_library.require()
    data = next(build.cache_dir().glob('*.so')).read_bytes()
    assert b'GOMP_parallel' in data or b'__kmpc_fork_call' in data


def test_native_arch_on_apple_silicon_is_the_compilers_default(monkeypatch):
    monkeypatch.delenv(build.CPU_ARCH_ENV, raising=False)
    assert build.arch_flags('darwin', 'arm64') == ()
    assert build.arch_flags('darwin', 'x86_64') == build.arch_flags('linux', 'aarch64') == ('-march=native',)
    monkeypatch.setenv(build.CPU_ARCH_ENV, 'armv8.2-a')
    assert build.arch_flags('darwin', 'arm64') == ('-march=armv8.2-a',)


SSE2_LEVEL_FLAGS = {'sse', 'sse2'}
"""The vector flags that ``-march=x86-64`` (the x86-64 baseline) code may use: 4 float32 lanes in 16 registers, and
the generic bf16 conversions, which AArch64 builds also take."""

AVX_LEVEL_FLAGS = {'sse4_2', 'popcnt', 'avx', 'xsave'}
"""The CPU flags that ``-march=sandybridge`` code may use: 8 float32 lanes in 16 registers, without AVX2's integer
vectors or FMA (the bf16 widening and multiply-adds take other instructions)."""

AVX512_LEVEL_FLAGS = AVX2_LEVEL_FLAGS | {'avx512f', 'avx512bw', 'avx512cd', 'avx512dq', 'avx512vl'}
"""The CPU flags that ``-march=x86-64-v4`` code may use: AVX-512 without AVX512-BF16 (its bf16 stores take the
integer rounding, as on Skylake-X or Ice Lake)."""


@pytest.mark.slow
@pytest.mark.parametrize(
    'arch,flags',
    [
        ('x86-64-v3', AVX2_LEVEL_FLAGS),
        ('x86-64-v4', AVX512_LEVEL_FLAGS),
        ('sandybridge', AVX_LEVEL_FLAGS),
        ('x86-64', SSE2_LEVEL_FLAGS),
    ],
    ids=['avx2', 'avx512-without-bf16', 'avx-without-avx2', 'sse2'],
)
def test_native_kernels_in_another_isa_build_match_the_reference(monkeypatch, arch, flags):
    """The whole native-kernel suite (values and gradients against the reference, dispatch, compile) with the
    kernels built for AVX2, as on CPUs without AVX-512, for AVX-512 without AVX512-BF16, for AVX without AVX2, and
    for the x86-64 baseline (SSE2: 4-lane vectors, as on NEON; the tiling and the bf16 loads and stores differ per
    instruction set)."""
    if platform.machine() not in ('x86_64', 'AMD64') or not flags <= cpu_flags():
        pytest.skip(f'an {arch} build runs on x86-64 CPUs with {", ".join(sorted(flags))} only')
    tests = Path(__file__).parent
    env = {**os.environ, build.CPU_ARCH_ENV: arch}
    native_suite = tests / 'test_native.py'
    # Its first test builds the kernels into an empty cache already: the one that does so in a new process tests the
    # build's mechanism, the same for every instruction set.
    fresh_build = f'{native_suite}::test_kernel_builds_into_an_empty_cache_in_a_fresh_process'
    result = subprocess.run(
        [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', str(native_suite), '--deselect', fresh_build],
        cwd=tests.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert ' passed' in result.stdout.splitlines()[-1] and 'skipped' not in result.stdout.splitlines()[-1]
    monkeypatch.setenv(build.CPU_ARCH_ENV, arch)
    assert list(build.cache_dir().glob('*.so')), f'the suite ran, but no {arch} library was built'


@pytest.mark.parametrize(
    'flags,isa',
    [
        ({'sse2', 'avx', 'avx2', 'avx512f', 'amx_tile'}, 'AVX-512 + AMX'),
        ({'sse2', 'avx', 'avx2', 'avx512f'}, 'AVX-512'),
        ({'sse2', 'avx', 'avx2', 'fma'}, 'AVX2'),
        ({'fp', 'asimd'}, 'NEON'),
    ],
)
def test_vector_isa_names_the_widest_instruction_set(flags, isa):
    assert vector_isa(frozenset(flags)) == isa


@pytest.mark.slow
@pytest.mark.parametrize('target', ['aarch64-linux-gnu', 'aarch64-macos'])
def test_native_kernels_compile_to_neon_code_for_arm(tmp_path, target):
    """The kernels' sources compiled for AArch64 (Linux; macOS on Apple silicon) by Zig's Clang against this torch's
    headers, with the build's flags but those for the host's CPU: their vector code is NEON's (4-lane ``fmla``), and
    for macOS, with the build's OpenMP flags there (``-Xclang -fopenmp``), each ``at::parallel_for`` is a parallel
    region (a ``__kmpc_fork_call`` into libomp), not a loop on one thread. A compile, not a run: no Arm CPU is here
    to run it. (This torch's Linux headers lack the ``omp.h`` torch's macOS wheel ships: a stand-in declares the two
    functions ATen's ``parallel_for`` calls.)"""
    pytest.importorskip('ziglang', reason='the AArch64 compile needs Zig (pip install ziglang, in the test extra)')
    from torch.utils.cpp_extension import include_paths

    host_openmp = build.openmp_flags()[0]
    flags = [flag for flag in build.cflags() if not flag.startswith('-march=') and flag not in host_openmp]
    includes = [f'-I{path}' for path in include_paths()]
    macos = target.endswith('macos')
    if macos:
        flags += build.openmp_flags('darwin')[0]
        (tmp_path / 'omp.h').write_text(
            '#pragma once\nextern "C" int omp_get_num_threads(void);\nextern "C" int omp_get_thread_num(void);\n'
        )
        includes.append(f'-I{tmp_path}')
    for source in build.SOURCES:
        assembly = tmp_path / f'{source.stem}.s'
        command = [sys.executable, '-m', 'ziglang', 'c++', '-target', target, '-std=c++20', '-w', *flags, *includes]
        result = subprocess.run(
            [*command, '-S', str(source), '-o', str(assembly)], capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-4000:]
        code = assembly.read_text(errors='replace')  # debug sections hold raw bytes
        if source.name == 'resample.cpp':
            # GNU syntax `fmla v0.4s, ...`, Apple's `fmla.4s v0, ...`
            assert re.search(r'\bfmla(\s+v\d+\.4s|\.4s\s+v\d+)', code), 'no NEON vector multiply-adds'
        if macos:
            assert '__kmpc_fork_call' in code, f'{source.name}: at::parallel_for compiled to one thread'


def test_cpu_model_reads_vendor_family_model_and_stepping():
    lines = [
        'processor\t: 0',
        'vendor_id\t: GenuineIntel',
        'cpu family\t: 6',
        'model\t\t: 207',
        'model name\t: Intel(R) Xeon(R) Processor',
        'stepping\t: 2',
        'processor\t: 1',
        'model\t\t: 1',
    ]
    assert cpu_model(lines) == 'GenuineIntel family 6 model 207 stepping 2'
    assert cpu_model(['Features\t: fp asimd', 'CPU part\t: 0xd0c']) == ''
