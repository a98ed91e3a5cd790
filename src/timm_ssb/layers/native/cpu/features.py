"""What this CPU is: its name, instruction-set flags and vector ISA class (from ``/proc/cpuinfo`` on Linux)."""

import platform
from functools import cache
from pathlib import Path
from typing import FrozenSet, Optional, Sequence

__all__ = ['cpu_name', 'cpu_model', 'cpu_flags', 'cpu_signature', 'vector_isa']


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


def cpu_model(lines: Optional[Sequence[str]] = None) -> str:
    """The x86 CPU's vendor, family, model and stepping (``'GenuineIntel family 6 model 207 stepping 2'``); ``''``
    where ``/proc/cpuinfo`` has none (Arm, macOS).

    Cloud VMs often name the CPU only "Intel(R) Xeon(R) Processor" or "AMD EPYC"; the model number tells apart the
    generations sold under one name.
    """
    fields = {}
    for line in _cpuinfo_lines() if lines is None else lines:
        key, _, value = line.partition(':')
        key = key.strip()
        if key in ('vendor_id', 'cpu family', 'model', 'stepping') and key not in fields:
            fields[key] = value.strip()
    if 'vendor_id' not in fields or 'model' not in fields:
        return ''
    names = (('family', 'cpu family'), ('model', 'model'), ('stepping', 'stepping'))
    return ' '.join([fields['vendor_id']] + [f'{name} {fields[key]}' for name, key in names if key in fields])


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
