"""What this CPU is: its name, instruction-set flags and vector ISA class (from ``/proc/cpuinfo`` on Linux)."""

import platform
from functools import cache
from pathlib import Path
from typing import FrozenSet, Optional

__all__ = ['cpu_name', 'cpu_flags', 'cpu_signature', 'vector_isa']


@cache
def _cpuinfo_lines() -> tuple:
    try:
        return tuple(Path('/proc/cpuinfo').read_text().splitlines())
    except OSError:
        return ()


def cpu_name() -> str:
    """The CPU's model name, else what :mod:`platform` says."""
    for line in _cpuinfo_lines():
        if line.startswith('model name'):
            return line.split(':', 1)[1].strip()
    return platform.processor() or platform.machine() or 'unknown'


def cpu_flags() -> FrozenSet[str]:
    """The CPU's instruction-set flags (x86 ``flags``, Arm ``Features``); empty where unknown."""
    return frozenset(
        flag
        for line in _cpuinfo_lines()
        if line.startswith(('flags', 'Features'))
        for flag in line.split(':', 1)[1].split()
    )


def cpu_signature() -> str:
    """The CPU's model and flags: code built with ``-march=native`` is only valid where they match."""
    lines = [line for line in _cpuinfo_lines() if line.startswith(('model name', 'flags', 'Features'))]
    return '\n'.join(sorted(set(lines))) or platform.processor() or platform.machine()


def vector_isa(flags: Optional[FrozenSet[str]] = None) -> str:
    """The widest vector instruction set of the CPU: ``'AVX-512'`` (``' + AMX'`` with AMX tiles), ``'AVX2'``,
    ``'AVX'``, ``'SSE'`` on x86; ``'NEON'`` on Arm; else the machine's name."""
    flags = cpu_flags() if flags is None else flags
    if 'avx512f' in flags:
        return 'AVX-512 + AMX' if 'amx_tile' in flags else 'AVX-512'
    for flag, name in (('avx2', 'AVX2'), ('avx', 'AVX'), ('asimd', 'NEON'), ('sse2', 'SSE')):
        if flag in flags:
            return name
    machine = platform.machine()
    return 'NEON' if machine in ('aarch64', 'arm64') else machine or 'unknown'
