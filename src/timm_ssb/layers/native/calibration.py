"""Whether the native CPU resampling beats PyTorch's batched products on this machine: measured once, kept.

Under the backend ``'auto'`` the native resampling runs only where it was measured clearly faster (at most
:data:`NATIVE_MARGIN` of PyTorch's time; no list of rules covers the CPUs nobody measured): the first time a dtype
and mode (inference; training: forward and backward) is needed, both paths are timed per way (down; up with the
residual and ReLU) on a layer2-sized map (:data:`CALIBRATION_SHAPE`, the matrices of uniform saliency), by
:func:`fastest_times`. The result is kept in the kernel library's cache directory (:data:`CALIBRATION_FILE`, one
entry per dtype, mode and thread count); ``timm-ssb info --check --recalibrate`` measures again. Why it is
measured so: docs/kernels.md.
"""

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import torch
from filelock import FileLock
from torch.utils._python_dispatch import _disable_current_modes

from .batched_products import BatchedProductsResample
from .cpu.build import cache_dir, cpu_library
from .resample import separable_resample_eager

__all__ = [
    'CALIBRATION_FILE',
    'CALIBRATION_LOCK',
    'CALIBRATION_SHAPE',
    'NATIVE_MARGIN',
    'calibrate',
    'chooses_native',
    'fastest_times',
    'forget_calibration',
    'native_resample_is_faster',
]

CALIBRATION_FILE = 'calibration.json'
CALIBRATION_LOCK = 'calibration.json.lock'
CALIBRATION_SHAPE = (4, 512, 28, 16)
"""(batch, channels, map side, sampled side) of the timed map: a ResNet-D layer2 block's at 224 x 224."""

NATIVE_MARGIN = 0.9
"""The native resampling is chosen where it took at most this fraction of PyTorch's time on the calibration's map."""

_ROUNDS = 16
_memory: Dict[str, dict] = {}


def native_resample_is_faster(dtype: torch.dtype, training: bool, up: bool) -> bool:
    """Whether the native resampling of the way ``up`` (with residual and ReLU) or down, with its backward if
    ``training``, took at most :data:`NATIVE_MARGIN` of the time of PyTorch's batched products on
    :data:`CALIBRATION_SHAPE` in ``dtype`` here."""
    entry = calibrate(dtype, training)
    way = 'up' if up else 'down'
    return chooses_native(entry[f'{way}_native_ms'] / entry[f'{way}_reference_ms'])


def chooses_native(ratio: float) -> bool:
    """The calibration's rule, from the ratio of the native resampling's time to PyTorch's: the native one where it
    is at most :data:`NATIVE_MARGIN`. The margin is for the maps the calibration did not time (other layers, batch
    sizes), where a close call can turn: choosing PyTorch's path at a ratio of 0.9-1 costs at most a tenth of that
    op's time."""
    return ratio <= NATIVE_MARGIN


TIMES = ('down_native_ms', 'down_reference_ms', 'up_native_ms', 'up_reference_ms')


def calibrate(dtype: torch.dtype, training: bool) -> dict:
    """The timing behind :func:`native_resample_is_faster`: ``{'down_native_ms', 'down_reference_ms', 'up_native_ms',
    'up_reference_ms', 'shape'}``, measured the first time it is asked for on this machine and kept."""
    key = f'{str(dtype).removeprefix("torch.")}/{"training" if training else "inference"}/{torch.get_num_threads()}'
    if key in _memory:
        return _memory[key]
    path = cache_dir() / CALIBRATION_FILE
    with _alone(path):
        kept = _read(path)
        entry = kept.get(key)
        if not (isinstance(entry, dict) and all(_is_time(entry.get(name)) for name in TIMES)):
            # Asked from inside the caller's dispatch modes, perhaps (a FlopCounterMode counting a model, a fake-tensor
            # trace): the timing runs outside them, on real tensors, and is not counted as the caller's work.
            with _disable_current_modes():
                entry = _measure(dtype, training)
            kept[key] = entry
            _write(path, kept)
    _memory[key] = entry
    return entry


def forget_calibration() -> None:
    """Drop this build's kept timings (file and memory), so that the next question measures again: for a
    calibration made while the machine was busy, which would otherwise decide for good."""
    _memory.clear()
    try:
        (cache_dir() / CALIBRATION_FILE).unlink()
    except FileNotFoundError:
        pass


@contextmanager
def _alone(path: Path) -> Iterator[None]:
    """One process at a time reads, measures and writes the calibration in ``path`` (the lock: :data:`CALIBRATION_LOCK`
    beside it): processes that start together (DDP ranks on the CPU) then use one measurement, not one each made while
    the others' ran, and none loses another's entry. Where no lock can be made (a read-only cache) each measures for
    itself."""
    lock: Optional[FileLock] = FileLock(str(path.with_name(CALIBRATION_LOCK)))
    try:
        lock.acquire()
    except OSError:
        lock = None
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _is_time(value: object) -> bool:
    return isinstance(value, (int, float)) and value > 0


def _read(path) -> Dict[str, dict]:
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: measure again
        return {}
    return kept if isinstance(kept, dict) else {}


def _write(path, kept: Dict[str, dict]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f'.{time.monotonic_ns()}.tmp')
        tmp.write_text(json.dumps(kept, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:  # a read-only cache: the result still holds for this process
        pass


def _measure(dtype: torch.dtype, training: bool) -> dict:
    cpu_library.require()
    batch_size, channels, side, size = CALIBRATION_SHAPE
    native = separable_resample_eager  # what eager mode runs

    def reference(t, matrix_y, matrix_x, residual, relu):
        return BatchedProductsResample.apply(t, matrix_y.to(t.dtype), matrix_x.to(t.dtype), residual, relu)

    with torch.inference_mode(False), torch.enable_grad(), torch.autocast('cpu', enabled=False):
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch_size, channels, side, side, generator=generator, device='cpu')
        x = x.to(dtype).contiguous(memory_format=torch.channels_last)
        uniform_saliency = torch.zeros(batch_size, side, side, device='cpu')  # sigma_g does not move uniform positions
        down_y, down_x, up_y, up_x = torch.ops.timm_ssb_cpu.adaptive_matrices(
            uniform_saliency, size, 1.0, 0.5 / size, 0.5 / size
        )
        if training:
            x.requires_grad_()
            for m in (down_y, down_x, up_y, up_x):
                m.requires_grad_()
        z = reference(x, down_y, down_x, None, False).detach().requires_grad_(training)

        def step(op: Callable[..., torch.Tensor], up: bool) -> Callable[[], None]:
            def run() -> None:
                out = op(z, up_y, up_x, x, True) if up else op(x, down_y, down_x, None, False)
                if training:
                    out.backward(torch.ones_like(out))

            return run

        candidates = {
            f'{way}_{name}_ms': step(op, way == 'up')
            for way in ('down', 'up')
            for name, op in (('native', native), ('reference', reference))
        }
        times = fastest_times(candidates, _ROUNDS)
    return {**times, 'shape': list(CALIBRATION_SHAPE)}


def fastest_times(candidates: Dict[str, Callable[[], None]], rounds: int) -> Dict[str, float]:
    """The fastest of ``rounds`` single calls of each candidate (:func:`interleaved_times`), in ms. The fastest,
    not the median: what slows a call of these small ops is the machine (another process, pages the allocator maps
    in again), not the op (docs/kernels.md, "Which implementation runs")."""
    return {name: min(values) for name, values in interleaved_times(candidates, rounds).items()}


def interleaved_times(
    candidates: Dict[str, Callable[[], None]], rounds: int, warmup: int = 1
) -> Dict[str, List[float]]:
    """Each candidate's ``rounds`` single-call times in ms, after ``warmup`` untimed calls each; interleaved, each
    round starting at the next candidate, so that none always runs after the same one."""
    names = list(candidates)
    for name in names:
        for _ in range(warmup):
            candidates[name]()
    times: Dict[str, List[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            candidates[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times
