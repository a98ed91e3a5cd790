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


@pytest.mark.slow
@pytest.mark.skipif(
    platform.machine() not in ('x86_64', 'AMD64') or not AVX2_LEVEL_FLAGS <= cpu_flags(),
    reason='an x86-64-v3 (AVX2) build runs on x86-64 CPUs with AVX2, FMA and BMI2 only',
)
def test_native_kernels_in_an_avx2_build_match_the_reference(monkeypatch):
    """The whole native-kernel suite (values and gradients against the reference, dispatch, compile) with the
    kernels built for AVX2, as on CPUs without AVX-512 (the tiling differs per instruction set)."""
    tests = Path(__file__).parent
    env = {**os.environ, build.CPU_ARCH_ENV: 'x86-64-v3'}
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
    monkeypatch.setenv(build.CPU_ARCH_ENV, 'x86-64-v3')
    assert list(build.cache_dir().glob('*.so')), 'the suite ran, but no x86-64-v3 library was built'


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
