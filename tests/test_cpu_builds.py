"""The native CPU kernels built for another instruction set than this CPU's best: ``TIMM_SSB_CPU_ARCH``."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from timm_ssb.layers.native.cpu import build
from timm_ssb.layers.native.cpu.features import cpu_flags, vector_isa

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


AVX512_LEVEL_FLAGS = AVX2_LEVEL_FLAGS | {'avx512f', 'avx512bw', 'avx512cd', 'avx512dq', 'avx512vl'}
"""The CPU flags that ``-march=x86-64-v4`` code may use: AVX-512 without AVX512-BF16 (its bf16 stores take the
integer rounding, as on Skylake-X or Ice Lake)."""


@pytest.mark.slow
@pytest.mark.parametrize(
    'arch,flags',
    [('x86-64-v3', AVX2_LEVEL_FLAGS), ('x86-64-v4', AVX512_LEVEL_FLAGS)],
    ids=['avx2', 'avx512-without-bf16'],
)
def test_native_kernels_in_another_isa_build_match_the_reference(monkeypatch, arch, flags):
    """The whole native-kernel suite (values and gradients against the reference, dispatch, compile) with the
    kernels built for AVX2, as on CPUs without AVX-512, and for AVX-512 without AVX512-BF16 (the tiling and the bf16
    store differ per instruction set)."""
    if platform.machine() not in ('x86_64', 'AMD64') or not flags <= cpu_flags():
        pytest.skip(f'an {arch} build runs on x86-64 CPUs with {", ".join(sorted(flags))} only')
    tests = Path(__file__).parent
    env = {**os.environ, build.CPU_ARCH_ENV: arch}
    result = subprocess.run(
        [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', str(tests / 'test_native.py')],
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
