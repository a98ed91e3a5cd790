"""The native CPU sampling kernel against the PyTorch reference, and how the sampling chooses its backend."""

import json
import os
import subprocess
import sys
import threading
import warnings
from typing import Callable

import pytest
import timm
import torch
from filelock import FileLock
from torch.utils.flop_counter import FlopCounterMode

import timm_ssb.layers.native as native
from ssb_reference import make_live
from timm_ssb.layers import (
    AdaptiveSampler,
    UniformSampler,
    adaptive_matrices,
    resample,
    resample_reference,
    resample_residual,
    uniform_matrices,
)
from timm_ssb.layers.native import separable_resample, set_sampling_backend
from timm_ssb.layers.native.cpu import build

# (dtype, rtol, atol as a fraction of the reference's largest magnitude): bf16 maps in and out, fp32 inside
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 1e-2)}

# (B, C, H, W, P, Q): odd channel counts (vector blocks of 64 and 16 and a scalar tail), down and up, P != Q, and
# down along one axis and up along the other (the backward takes its pass order from the y axis)
SHAPES = [
    (2, 5, 7, 9, 3, 4),
    (2, 70, 28, 28, 16, 16),
    (1, 33, 5, 5, 9, 11),
    (3, 130, 12, 10, 12, 10),
    (2, 1, 6, 6, 3, 3),
    (2, 19, 9, 4, 5, 7),
    (2, 19, 4, 9, 7, 5),
    # Whole cache lines a pixel (float32 and bfloat16): the output is streamed past the cache, the down way's odd
    # width leaving a block past its last pixel.
    (2, 64, 9, 9, 5, 7),
    (2, 32, 5, 5, 9, 11),
]


def channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def banded(batch_size: int, rows: int, cols: int) -> torch.Tensor:
    """Random non-negative matrices with zeros scattered in, including whole zero rows (empty bands)."""
    m = torch.rand(batch_size, rows, cols)
    m[m < 0.3] = 0.0
    m[:, rows // 2] = 0.0
    return m


def reference(x, matrix_y, matrix_x, residual, relu):
    out = resample_reference(x.float(), matrix_y, matrix_x)
    if residual is not None:
        out = out + residual.float()
    return torch.relu(out) if relu else out


def check_op_against_reference(
    op,
    shape,
    with_residual: bool,
    relu: bool,
    dtype,
    tolerances,
    device='cpu',
    needs_grad='xyzr',
    structural_zeros: bool = True,
) -> None:
    """``op`` (a fused sampling op) against :func:`reference` on random banded matrices: the output's values, dtype and
    layout, and the gradients of the inputs named in ``needs_grad`` (``x``, ``y``: ``matrix_y``, ``z``: ``matrix_x``,
    ``r``: the residual); ``tolerances`` maps dtype to (rtol, atol as a fraction of the reference's largest magnitude).
    With ``structural_zeros`` (the C++ op) the matrices' gradients are the reference's on the matrices' nonzero entries
    and zero elsewhere; else (the Triton op) the reference's everywhere."""
    batch_size, channels, height, width, rows, cols = shape
    x = (
        channels_last(torch.randn(batch_size, channels, height, width))
        .to(device, dtype)
        .requires_grad_('x' in needs_grad)
    )
    matrix_y = banded(batch_size, rows, height).to(device).requires_grad_('y' in needs_grad)
    matrix_x = banded(batch_size, cols, width).to(device).requires_grad_('z' in needs_grad)
    residual = None
    if with_residual:
        residual = channels_last(torch.randn(batch_size, channels, rows, cols)).to(device, dtype)
        residual.requires_grad_('r' in needs_grad)
    out = op(x, matrix_y, matrix_x, residual, relu)
    ref = reference(x, matrix_y, matrix_x, residual, relu)
    assert out.dtype == dtype and out.device == x.device and out.is_contiguous(memory_format=torch.channels_last)
    if relu:
        assert (out == 0).any()
    rtol, atol = tolerances[dtype]
    torch.testing.assert_close(out.float(), ref, rtol=rtol, atol=atol * ref.abs().max().item())
    g = torch.randn(ref.shape, device=device)
    named = {'x': x, 'matrix_y': matrix_y, 'matrix_x': matrix_x, 'residual': residual}
    named = {name: t for name, t in named.items() if t is not None and t.requires_grad}
    grads = torch.autograd.grad(out, list(named.values()), g.to(dtype))
    grads_ref = torch.autograd.grad(ref, list(named.values()), g)
    for (name, t), a, b in zip(named.items(), grads, grads_ref, strict=True):
        assert a.dtype == b.dtype, name
        if structural_zeros and name.startswith('matrix_'):  # the gradient on the nonzero entries, zero elsewhere
            assert (a[t == 0] == 0).all(), name
            b = b.masked_fill(t == 0, 0.0)
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol * b.abs().max().item(), msg=name)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('with_residual,relu', [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize('shape', SHAPES)
def test_op_matches_reference_values_and_gradients(shape, with_residual, relu, dtype):
    check_op_against_reference(separable_resample, shape, with_residual, relu, dtype, TOLERANCES)


@pytest.mark.parametrize('needs_grad', ['x', 'y', 'z', 'r', 'xr', 'yz'])
@pytest.mark.parametrize('shape', [SHAPES[1], SHAPES[2]])
def test_op_gradients_of_some_of_the_inputs(shape, needs_grad):
    """The backward computes what is asked for (only ``x``'s, only the matrices', ...) and gets it right."""
    check_op_against_reference(separable_resample, shape, True, True, torch.float32, TOLERANCES, needs_grad=needs_grad)


def test_backward_is_one_native_call_per_op(monkeypatch):
    x = channels_last(torch.randn(2, 24, 12, 10)).requires_grad_()
    matrix_y, matrix_x = banded(2, 5, 12).requires_grad_(), banded(2, 4, 10).requires_grad_()
    out = separable_resample(x, matrix_y, matrix_x, None, False)
    forward_calls = count_native_calls(monkeypatch)
    backward_calls = count_calls(monkeypatch, 'separable_resample_backward', lambda args: tuple(args[-2:]))
    out.sum().backward()
    assert forward_calls == [] and backward_calls == [(True, True)]


@pytest.mark.parametrize('height,width,rows,cols', [(12, 10, 5, 4), (5, 6, 9, 11)], ids=['down', 'up'])
def test_backward_is_counted_as_the_dense_products_it_computes(height, width, rows, cols):
    """``FlopCounterMode`` counts the backward as autograd's of the two dense products, y axis first (as the paper
    counts them), except for ``matrix_x``'s gradient, which autograd takes from the ``t = matrix_y x`` it keeps:
    mapping down the kernel takes it from ``G = matrix_y^T g`` and ``<x, G>``, mapping up it recomputes ``t``."""
    batch_size, channels = 2, 24
    x = channels_last(torch.randn(batch_size, channels, height, width)).requires_grad_()
    matrix_y, matrix_x = (
        banded(batch_size, rows, height).requires_grad_(),
        banded(batch_size, cols, width).requires_grad_(),
    )
    counted = []
    for fn in (
        lambda: separable_resample(x, matrix_y, matrix_x, None, False),
        lambda: torch.matmul(torch.matmul(matrix_y.unsqueeze(1), x), matrix_x.transpose(1, 2).unsqueeze(1)),
    ):
        out = fn()
        with FlopCounterMode(display=False) as counter:
            out.backward(torch.ones_like(out))
        counted.append(counter.get_total_flops())
    kept_t_product = rows * cols * width  # autograd's matrix_x gradient, g^T t
    instead = height * cols * (rows + width) if height >= rows else rows * height * width + kept_t_product
    assert counted[0] == counted[1] + 2 * batch_size * channels * (instead - kept_t_product)


def test_backward_op_bad_inputs_are_errors_naming_them():
    x = channels_last(torch.randn(2, 20, 9, 8))
    matrix_y, matrix_x = banded(2, 4, 9), banded(2, 5, 8)
    grad = channels_last(torch.randn(2, 20, 4, 5))
    with pytest.raises(RuntimeError, match="grad must be channels-last with the output's shape"):
        native.separable_resample_backward(grad[:, :, :3], x, matrix_y, matrix_x, None, True, True)
    with pytest.raises(RuntimeError, match="out must have x's dtype"):
        native.separable_resample_backward(grad, x, matrix_y, matrix_x, grad.double(), True, True)
    with pytest.raises(RuntimeError, match='matrix shapes do not fit x'):
        native.separable_resample_backward(grad, x, matrix_y[:, :, :8].contiguous(), matrix_x, None, True, True)


def test_backward_op_passes_opcheck():
    grad = channels_last(torch.randn(2, 20, 4, 5))
    x = channels_last(torch.randn(2, 20, 9, 8))
    matrix_y, matrix_x = banded(2, 4, 9), banded(2, 5, 8)
    out = separable_resample(x, matrix_y, matrix_x, channels_last(torch.randn(2, 20, 4, 5)), True)
    for mask, need_x, need_matrices in (
        (out, True, True),
        (None, True, False),
        (None, False, True),
        (out, False, False),
    ):
        torch.library.opcheck(
            native.separable_resample_backward, (grad, x, matrix_y, matrix_x, mask, need_x, need_matrices)
        )


def test_op_registrations_pass_opcheck():
    """Schema, fake tensor, autograd registration and AOT dispatch, as ``torch.library`` checks them."""
    x = channels_last(torch.randn(2, 20, 9, 8)).requires_grad_()
    residual = channels_last(torch.randn(2, 20, 4, 5)).requires_grad_()
    matrix_y, matrix_x = banded(2, 4, 9).requires_grad_(), banded(2, 5, 8).requires_grad_()
    torch.library.opcheck(separable_resample, (x, matrix_y, matrix_x, residual, True))
    torch.library.opcheck(separable_resample, (x.detach(), matrix_y.detach(), matrix_x.detach(), None, False))


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_eager_path_calls_the_kernels_directly_with_the_custom_ops_values_and_gradients(dtype):
    """In eager mode the fast paths call the C++ ops themselves (no custom-op dispatch); their values and every
    gradient (the map's, both matrices', the residual's through the ReLU) equal the custom op's, bit for bit."""
    native.cpu_library.require()
    assert native.cpu_ops() is torch.ops.timm_ssb_cpu
    with FlopCounterMode(display=False):  # a dispatch mode needs the custom ops' registrations
        assert native.cpu_ops() is not torch.ops.timm_ssb_cpu
    x = channels_last(torch.randn(2, 20, 9, 8)).to(dtype)
    residual = channels_last(torch.randn(2, 20, 4, 5)).to(dtype)
    matrix_y, matrix_x = banded(2, 4, 9), banded(2, 5, 8)
    grad = channels_last(torch.randn(2, 20, 4, 5)).to(dtype)
    results = []
    for op in (separable_resample, native.separable_resample_eager):
        inputs = [t.clone().requires_grad_() for t in (x, matrix_y, matrix_x, residual)]
        out = op(*inputs, True)
        out.backward(grad)
        results.append([out.detach(), *(t.grad for t in inputs)])
    for custom, eager in zip(*results, strict=True):
        assert torch.equal(custom, eager)
    with torch.no_grad():
        down = native.separable_resample_eager(x, matrix_y, matrix_x, None, False)
        assert torch.equal(down, separable_resample(x, matrix_y, matrix_x, None, False))


def test_eager_paths_have_no_double_backward_like_the_custom_ops():
    """A second derivative is an error, as through the custom ops, not a silently missing term."""
    native.cpu_library.require()
    x = channels_last(torch.randn(2, 16, 9, 8)).requires_grad_()
    out = native.separable_resample_eager(x, banded(2, 4, 9), banded(2, 5, 8), None, False)
    (grad,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match='differentiate twice'):
        grad.sum().backward()
    logits = torch.randn(2, 9, 8).requires_grad_()
    matrices = native.adaptive_matrices_eager(logits, 4, 0.18, 0.125, 0.125)
    (grad,) = torch.autograd.grad(matrices[0].square().sum(), logits, create_graph=True)
    with pytest.raises(RuntimeError, match='differentiate twice'):
        grad.sum().backward()


@pytest.mark.parametrize('channels', [16, 64])  # 64: the x86 builds' bfloat16 as even and odd values
def test_nan_and_inf_pass_through_like_the_reference(channels):
    x = channels_last(torch.randn(1, channels, 4, 4))
    x[0, 3, 1, 2] = float('nan')
    x[0, 5, 2, 2] = float('inf')
    x[0, 8, 0, 0] = float('nan')
    x[0, 10, 3, 3] = float('-inf')
    a = torch.full((1, 2, 4), 0.25)
    for dtype in (torch.float32, torch.bfloat16):
        out = separable_resample(x.to(dtype), a, a, None, True)
        ref = reference(x.to(dtype), a, a, None, True)
        assert torch.equal(out.float().isnan(), ref.isnan()) and torch.equal(out.float().isinf(), ref.isinf())


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('height, rows', [(9, 4), (3, 7)])  # the way down's backward and the way up's
# 37: whole vectors and a scalar tail in every build; 64: whole cache lines a pixel. With need_all the way up masks
# its rows block by block, within its pass over them; without, in a pass of its own.
@pytest.mark.parametrize('channels', [37, 64])
@pytest.mark.parametrize('need_all', [False, True])
def test_relu_gradient_is_the_gradient_exactly_where_the_output_is_above_zero(dtype, height, rows, channels, need_all):
    x = channels_last(torch.randn(2, channels, height, height)).to(dtype)
    matrix_y, matrix_x = banded(2, rows, height), banded(2, rows, height)
    tiny = torch.finfo(dtype).tiny
    # Edge values: zeros of both signs, infinities, NaN, subnormals (bfloat16 keeps them; AVX512-BF16's rounding
    # flushes them, so they must be copied, not rounded again).
    edges = torch.tensor([0.0, -0.0, float('inf'), float('-inf'), float('nan'), tiny / 4, -tiny / 4, 1.0, -1.0])
    out = torch.randn(2, channels, rows, rows)
    out.view(-1)[: edges.numel() * 7 : 7] = edges
    grad = torch.randn(2, channels, rows, rows)
    grad.view(-1)[1 : edges.numel() * 11 : 11] = torch.tensor([tiny / 8, -tiny / 2] * 4 + [0.5])
    out, grad = channels_last(out.to(dtype)), channels_last(grad.to(dtype))
    masked = native.separable_resample_backward(grad, x, matrix_y, matrix_x, out, need_all, need_all)[3]
    assert torch.equal(masked, torch.where(out > 0, grad, torch.zeros_like(grad)))


@pytest.fixture
def backend():
    """Set the sampling backend for one test; the default restored afterwards."""
    saved = native.get_sampling_backend()
    yield set_sampling_backend
    set_sampling_backend(saved)


def count_calls(monkeypatch, name: str, record: Callable[[tuple], object]) -> list:
    """Calls of ``torch.ops.timm_ssb_cpu.<name>`` from now on in this test, each as ``record(args)``."""
    calls = []
    native.cpu_library.require()
    op = getattr(torch.ops.timm_ssb_cpu, name)

    def counted(*args):
        calls.append(record(args))
        return op(*args)

    monkeypatch.setattr(torch.ops.timm_ssb_cpu, name, counted)
    return calls


def count_native_calls(monkeypatch) -> list:
    return count_calls(monkeypatch, 'separable_resample', lambda args: args[0].dtype)


def measured_faster(monkeypatch, faster: bool) -> list:
    """Make this machine's calibration say the native resampling is (or is not) the faster; the questions asked."""
    asked = []

    def answer(dtype, training, up):
        asked.append((dtype, training, up))
        return faster

    monkeypatch.setattr(native.dispatch, 'native_resample_is_faster', answer)
    return asked


@pytest.mark.parametrize('name', ['auto', 'native'])
def test_resample_runs_the_native_kernel_on_channels_last_cpu_maps(name, backend, monkeypatch):
    backend(name)
    measured_faster(monkeypatch, True)
    x = channels_last(torch.randn(2, 8, 14, 14))
    dy, dx, uy, ux = uniform_matrices(x, 6, 1 / 12, 1 / 12)
    calls = count_native_calls(monkeypatch)
    z = resample(x, dy, dx)
    resample_residual(z, uy, ux, x, True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        resample(x, dy, dx)
    assert calls == [torch.float32, torch.float32, torch.bfloat16]
    resample(x.contiguous(), dy, dx)  # NCHW: the reference
    resample(x.double(), dy, dx)  # float64: the batched products
    assert len(calls) == 3


def test_auto_backend_takes_pytorch_where_the_kernel_was_measured_slower(backend, monkeypatch):
    asked = measured_faster(monkeypatch, False)
    x = channels_last(torch.randn(2, 8, 14, 14))
    dy, dx, uy, ux = uniform_matrices(x, 6, 1 / 12, 1 / 12)
    calls = count_native_calls(monkeypatch)
    backend('auto')
    out = resample(x, dy, dx)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        resample(x, dy, dx)
    resample(out, uy, ux)  # mapping up without the fused end asks about the way up too
    resample_residual(out.requires_grad_(), uy, ux, x, True).sum().backward()
    assert calls == []
    ways = [(torch.float32, False, False), (torch.bfloat16, False, False), (torch.float32, False, True)]
    assert asked == ways + [(torch.float32, True, True)]
    backend('native')  # forced: the kernel, without asking
    resample(x, dy, dx)
    assert calls == [torch.float32] and len(asked) == 4


def test_interleaved_times_alternate_who_goes_first():
    """The calibration's and sampling_products.py's timing: warm-up calls first, then each round one call of each
    candidate, each round starting at the next one, so that none always runs after the same one."""
    from timm_ssb.layers.native.calibration import fastest_times, interleaved_times

    calls = []
    candidates = {name: (lambda name=name: calls.append(name)) for name in ('a', 'b')}
    times = interleaved_times(candidates, rounds=3, warmup=2)
    assert calls == ['a', 'a', 'b', 'b'] + ['a', 'b', 'b', 'a', 'a', 'b']
    assert [len(times[name]) for name in 'ab'] == [3, 3] and all(t >= 0 for t in times['a'] + times['b'])
    calls.clear()
    assert set(fastest_times(candidates, rounds=2)) == {'a', 'b'} and calls == ['a', 'b', 'a', 'b', 'b', 'a']


def test_calibration_is_measured_once_and_kept_beside_the_build(monkeypatch, tmp_path):
    import timm_ssb.layers.native.calibration as calibration_module

    monkeypatch.setattr(calibration_module, 'cache_dir', lambda: tmp_path)
    monkeypatch.setattr(calibration_module, '_memory', {})
    measured = []
    measure = calibration_module._measure

    def counted(dtype, training):
        measured.append((dtype, training))
        return measure(dtype, training)

    monkeypatch.setattr(calibration_module, '_measure', counted)
    entry = native.calibrate(torch.float32, False)
    assert all(entry[name] > 0 for name in calibration_module.TIMES)
    assert entry['shape'] == list(calibration_module.CALIBRATION_SHAPE)
    kept = json.loads((tmp_path / calibration_module.CALIBRATION_FILE).read_text())
    assert kept == {f'float32/inference/{torch.get_num_threads()}': entry}
    monkeypatch.setattr(calibration_module, '_memory', {})  # a new process: read from the file, not measured
    assert native.calibrate(torch.float32, False) == entry
    assert measured == [(torch.float32, False)]
    (tmp_path / calibration_module.CALIBRATION_FILE).write_text('{"float32/inference/')  # cut short: measure again
    monkeypatch.setattr(calibration_module, '_memory', {})
    native.calibrate(torch.float32, False)
    native.calibrate(torch.bfloat16, True)
    assert measured == [(torch.float32, False), (torch.float32, False), (torch.bfloat16, True)]
    assert len(json.loads((tmp_path / calibration_module.CALIBRATION_FILE).read_text())) == 2


def test_processes_asking_together_use_one_calibration(monkeypatch, tmp_path):
    """DDP ranks ask for the calibration at once: while one measures, the others wait for it and then use
    its result instead of measuring on a machine the first one keeps busy."""
    import timm_ssb.layers.native.calibration as calibration_module

    monkeypatch.setattr(calibration_module, 'cache_dir', lambda: tmp_path)
    monkeypatch.setattr(calibration_module, '_memory', {})
    measured = []
    monkeypatch.setattr(calibration_module, '_measure', lambda *args: measured.append(args) or dict(theirs, own=1))
    theirs = {name: float(i + 1) for i, name in enumerate(calibration_module.TIMES)}
    answers = []
    asker = threading.Thread(target=lambda: answers.append(native.calibrate(torch.float32, False)))
    with FileLock(tmp_path / calibration_module.CALIBRATION_LOCK):  # another process is measuring
        asker.start()
        asker.join(timeout=1.0)
        assert asker.is_alive() and not measured, 'the calibration was measured while another process measured it'
        key = f'float32/inference/{torch.get_num_threads()}'
        (tmp_path / calibration_module.CALIBRATION_FILE).write_text(json.dumps({key: theirs}))
    asker.join(timeout=60)
    assert answers == [theirs] and not measured


def test_calibration_chooses_the_kernel_only_where_it_was_clearly_faster(monkeypatch):
    """The kept timings decide per way: the kernel where it took at most NATIVE_MARGIN of PyTorch's time; a close
    call (native 0.95 of PyTorch's time) goes to PyTorch."""
    import timm_ssb.layers.native.calibration as calibration_module

    margin = calibration_module.NATIVE_MARGIN
    assert 0.5 < margin < 1
    entry = {'down_native_ms': margin * 2.0, 'down_reference_ms': 2.0, 'up_native_ms': 0.95, 'up_reference_ms': 1.0}
    monkeypatch.setattr(calibration_module, 'calibrate', lambda dtype, training: entry)
    assert calibration_module.native_resample_is_faster(torch.float32, True, up=False)
    assert not calibration_module.native_resample_is_faster(torch.float32, True, up=True)
    entry['up_native_ms'] = 1.2
    assert not calibration_module.native_resample_is_faster(torch.float32, True, up=True)


def test_calibration_takes_each_candidates_fastest_call_in_rotating_order(monkeypatch):
    """A candidate slowed on most calls by something outside it (page faults, another process) is judged by its
    fast calls, not by its median; no candidate always runs after the same one."""
    import timm_ssb.layers.native.calibration as calibration_module

    clock = [0.0]
    monkeypatch.setattr(calibration_module.time, 'perf_counter', lambda: clock[0])
    order = []

    def candidate(name, seconds_per_call):
        calls = iter(seconds_per_call)

        def run():
            order.append(name)
            clock[0] += next(calls)

        return run

    rounds = 5
    native_calls = [9.0, 0.9, 0.9, 0.1, 0.9, 0.9]  # an untimed first call, then fast in one round of five
    reference_calls = [9.0, 0.5, 0.5, 0.5, 0.5, 0.5]
    times = calibration_module.fastest_times(
        {'native': candidate('native', native_calls), 'reference': candidate('reference', reference_calls)}, rounds
    )
    assert times == pytest.approx({'native': 100.0, 'reference': 500.0})  # ms; the median would say 900 vs 500
    assert order[:2] == ['native', 'reference']  # the warm-up
    rounds_order = [tuple(order[2 + 2 * i : 4 + 2 * i]) for i in range(rounds)]
    assert rounds_order == [('native', 'reference'), ('reference', 'native')] * 2 + [('native', 'reference')]


def test_reference_backend_never_runs_the_kernel(backend, monkeypatch):
    backend('reference')
    x = channels_last(torch.randn(2, 8, 14, 14))
    dy, dx, _, _ = uniform_matrices(x, 6, 1 / 12, 1 / 12)
    calls = count_native_calls(monkeypatch)
    out = resample(x, dy, dx)
    assert calls == []
    backend('native')
    torch.testing.assert_close(resample(x, dy, dx), out, rtol=1e-5, atol=1e-6)
    assert len(calls) == 1


def test_bad_backend_names_are_value_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"backend must be one of 'auto', 'native', 'triton', 'reference'; got 'fast'"):
        set_sampling_backend('fast')
    monkeypatch.setenv('TIMM_SSB_SAMPLING_BACKEND', 'cuda')
    with pytest.raises(ValueError, match='TIMM_SSB_SAMPLING_BACKEND must be one of auto, native, triton, reference'):
        native.dispatch._backend_from_environment()


@pytest.fixture
def broken_build(monkeypatch):
    """A kernel library that cannot be built (as with no C++ compiler), in a process that has not tried yet."""

    def fail() -> None:
        raise OSError('no C++ compiler found')

    loader = native.cpu_library
    monkeypatch.setattr(loader, '_load', fail)
    for name, value in (('value', None), ('error', None), ('_loaded', False), ('_warned', False)):
        monkeypatch.setattr(loader, name, value)


def test_auto_backend_warns_once_and_falls_back_when_the_kernel_cannot_be_built(broken_build, backend):
    backend('auto')
    x = channels_last(torch.randn(2, 8, 14, 14))
    with pytest.warns(RuntimeWarning, match=r'native CPU sampling kernels could not be built .*no C\+\+ compiler'):
        dy, dx, _, _ = uniform_matrices(x, 6, 1 / 12, 1 / 12)
        out = resample(x, dy, dx)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        uniform_matrices(x, 6, 1 / 12, 1 / 12)
        resample(x, dy, dx)
    torch.testing.assert_close(out, resample_reference(x, dy, dx), rtol=1e-5, atol=1e-6)
    assert native.cpu_library.error == 'OSError: no C++ compiler found'


def test_eager_ops_without_their_kernels_say_why(broken_build):
    """The eager entry points load the kernels as the custom ops do; where they cannot be built, the error says why."""
    x = channels_last(torch.randn(2, 8, 14, 14))
    a = torch.rand(2, 6, 14)
    for call in (
        lambda: native.separable_resample_eager(x, a, a, None, False),
        lambda: native.adaptive_matrices_eager(torch.randn(2, 14, 14), 6, 0.18, 0.1, 0.1),
        native.cpu_ops,
    ):
        with pytest.raises(RuntimeError, match=r'native CPU sampling kernels are not available .*no C\+\+ compiler'):
            call()


def test_native_backend_that_cannot_be_built_is_an_error(broken_build, backend):
    backend('native')
    x = channels_last(torch.randn(2, 8, 14, 14))
    with pytest.raises(RuntimeError, match='TIMM_SSB_SAMPLING_BACKEND=native, but .* no C\\+\\+ compiler'):
        uniform_matrices(x, 6, 1 / 12, 1 / 12)
    dy, dx = torch.eye(14).expand(2, 14, 14), torch.eye(14).expand(2, 14, 14)
    with pytest.raises(RuntimeError, match='TIMM_SSB_SAMPLING_BACKEND=native, but .* no C\\+\\+ compiler'):
        resample(x, dy, dx[:, :6])


def check_compiled_sampler_matches_eager(device: str) -> None:
    """``torch.compile(fullgraph=True)`` of a sampler's down and up passes: one graph, the fused op traced through
    its fake; forward and backward equal eager (aot_eager: the rest of the graph as eager ops)."""
    torch._dynamo.reset()
    sampler = AdaptiveSampler(16, 5).to(device)
    torch.nn.init.normal_(sampler.saliency.weight, std=0.5)

    def block(x: torch.Tensor) -> torch.Tensor:
        z, state = sampler(x)
        return sampler.inverse_residual(z * 2.0, state, x, relu=True)

    x = channels_last(torch.randn(2, 16, 11, 9, device=device))
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(block, backend='aot_eager', fullgraph=True)
    x_eager, x_comp = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager, out = block(x_eager), compiled(x_comp)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    eager.square().sum().backward()
    torch.testing.assert_close(x_comp.grad, x_eager.grad, rtol=1e-5, atol=1e-5)
    assert counters['stats']['unique_graphs'] == 1


def test_compiled_sampler_keeps_the_op_in_one_graph(backend):
    backend('native')
    check_compiled_sampler_matches_eager('cpu')


def test_kernel_builds_into_an_empty_cache_in_a_fresh_process(tmp_path):
    """What a new user's first run does: build from the shipped source, then load it in a new process."""
    code = (
        'import torch, timm_ssb.layers.native as n\n'
        'from timm_ssb.layers import resample, uniform_matrices\n'
        'n.set_sampling_backend("native")\n'
        'x = torch.randn(1, 4, 8, 8).contiguous(memory_format=torch.channels_last)\n'
        'resample(x, *uniform_matrices(x, 3, 0.2, 0.2)[:2])\n'
        'print(n.cache_dir())\n'
    )
    env = {**os.environ, 'TIMM_SSB_CACHE': str(tmp_path)}
    first = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    directory = first.stdout.strip().splitlines()[-1]
    assert directory.startswith(str(tmp_path)) and any(p.suffix == '.so' for p in build.Path(directory).iterdir())
    second = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr


def reference_matrices(logits: torch.Tensor, size: int, sigma_g: float, sigma_down: float, sigma_up: float):
    """The adaptive sampler's matrices from the PyTorch ops (the reference), whatever the backend."""
    saved = native.get_sampling_backend()
    set_sampling_backend('reference')
    try:
        return adaptive_matrices(logits, size, sigma_g, sigma_down, sigma_up)
    finally:
        set_sampling_backend(saved)


# (B, H, W, size, logit scale, sigma_g): square and not, layer2-4 sizes, flat to peaked saliency, narrow attraction
MATRIX_CASES = [
    (3, 28, 28, 16, 3.0, 0.18),
    (2, 14, 20, 8, 10.0, 0.18),
    (4, 7, 7, 4, 1.0, 0.18),
    (2, 9, 13, 5, 30.0, 0.05),
    (2, 28, 28, 16, 100.0, 0.02),
    (1, 5, 3, 2, 0.5, 0.5),
]


@pytest.mark.parametrize('batch_size,height,width,size,scale,sigma_g', MATRIX_CASES)
def test_native_matrices_match_the_reference_values_and_gradients(batch_size, height, width, size, scale, sigma_g):
    logits = torch.randn(batch_size, 1, height, width) * scale
    sigma_down, sigma_up = 0.5 / size, 0.7 / size
    ref_logits, nat_logits = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ref = reference_matrices(ref_logits, size, sigma_g, sigma_down, sigma_up)
    out = native.adaptive_matrices_cpu(nat_logits[:, 0], size, sigma_g, sigma_down, sigma_up)
    for r, o in zip(ref, out, strict=True):
        assert o.shape == r.shape and o.dtype == torch.float32
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
        assert ((o == 0) != (r == 0)).float().mean() < 0.01  # the same taps cut, but for rounding at the cut
    grads = [torch.randn_like(r) for r in ref]
    torch.autograd.backward(ref, grads)
    torch.autograd.backward(out, grads)
    scale_of_grad = ref_logits.grad.abs().max()
    torch.testing.assert_close(nat_logits.grad, ref_logits.grad, rtol=1e-4, atol=1e-5 * scale_of_grad)


def test_native_matrices_gradient_of_a_subset_of_the_matrices():
    """Matrices that take no part in the loss get no gradient (``None`` to the backward op), as in the reference."""
    logits = torch.randn(2, 1, 14, 11) * 2
    ref_logits, nat_logits = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ref = reference_matrices(ref_logits, 6, 0.18, 1 / 12, 1 / 12)
    out = native.adaptive_matrices_cpu(nat_logits[:, 0], 6, 0.18, 1 / 12, 1 / 12)
    (ref[1] * ref[1]).sum().backward()
    (out[1] * out[1]).sum().backward()
    torch.testing.assert_close(nat_logits.grad, ref_logits.grad, rtol=1e-4, atol=1e-6)


def test_native_matrices_eager_path_equals_the_custom_op():
    """In eager mode the matrices come from the C++ ops themselves: the same matrices and logits' gradient as the
    custom op, bit for bit, with all four matrices in the loss and with one (the others' gradients ``None``)."""
    logits = torch.randn(2, 14, 11) * 2
    for used in (slice(0, 4), slice(1, 2)):
        results = []
        for op in (native.adaptive_matrices_cpu, native.adaptive_matrices_eager):
            t = logits.clone().requires_grad_()
            out = op(t, 6, 0.18, 1 / 12, 1 / 14)
            sum((m * m).sum() for m in out[used]).backward()
            results.append([*out, t.grad])
        for custom, eager in zip(*results, strict=True):
            assert torch.equal(custom.detach(), eager.detach())
    with torch.no_grad():
        expected = native.adaptive_matrices_cpu(logits, 6, 0.18, 1 / 12, 1 / 14)
        assert all(map(torch.equal, native.adaptive_matrices_eager(logits, 6, 0.18, 1 / 12, 1 / 14), expected))


@pytest.mark.parametrize('sigma_g', [0.18, 0.03])
def test_native_matrices_gradcheck_in_float64(sigma_g):
    """The hand-written backward against finite differences of the forward (the op computes in float64)."""
    logits = (torch.randn(2, 7, 9, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: native.adaptive_matrices_cpu(t, 4, sigma_g, 0.125, 0.15), (logits,))


def test_native_matrices_registrations_pass_opcheck():
    logits = torch.randn(2, 9, 8).requires_grad_()
    torch.library.opcheck(native.adaptive_matrices_cpu, (logits, 4, 0.18, 0.125, 0.125))
    torch.library.opcheck(native.adaptive_matrices_cpu, (logits.detach().double(), 3, 0.1, 0.2, 0.2))


def test_native_matrices_extreme_logits_like_the_reference():
    """A hot pixel with a narrow attraction kernel (neighbourhoods computed in log space), a row of -inf logits,
    and a sample with a NaN logit (all-NaN matrices for that sample only)."""
    logits = torch.zeros(3, 1, 16, 16)
    logits[0, 0, 1, 14] = 1000.0
    logits[1, 0, 5] = float('-inf')
    logits[1, 0, 9, 3] = 40.0
    logits[2, 0, 7, 7] = float('nan')
    ref = reference_matrices(logits, 6, 0.01, 1 / 12, 1 / 12)
    out = native.adaptive_matrices_cpu(logits[:, 0].contiguous(), 6, 0.01, 1 / 12, 1 / 12)
    for r, o in zip(ref, out, strict=True):
        torch.testing.assert_close(o[:2], r[:2], rtol=1e-5, atol=1e-5)
        assert o[2].isnan().all() and r[2].isnan().all()


def test_native_matrices_bad_inputs_are_errors():
    with pytest.raises(RuntimeError, match='size must be positive and smaller than both sides'):
        native.adaptive_matrices_cpu(torch.randn(1, 8, 4), 4, 0.18, 0.1, 0.1)
    with pytest.raises(RuntimeError, match='logits must be float32 or float64'):
        native.adaptive_matrices_cpu(torch.randn(1, 8, 8).bfloat16(), 4, 0.18, 0.1, 0.1)
    with pytest.raises(RuntimeError, match='sigma_up must be a positive finite number; got 0'):
        native.adaptive_matrices_cpu(torch.randn(1, 8, 8), 4, 0.18, 0.1, 0.0)
    with pytest.raises(RuntimeError, match='sigma_g must be a positive finite number; got inf'):
        native.adaptive_matrices_cpu(torch.randn(1, 8, 8), 4, float('inf'), 0.1, 0.1)


def test_samplers_build_matrices_natively_where_both_axes_are_resampled(backend, monkeypatch):
    backend('auto')
    calls = count_calls(monkeypatch, 'adaptive_matrices', lambda args: tuple(args[0].shape))
    sampler = AdaptiveSampler(8, 4)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        sampler(torch.randn(2, 8, 10, 9))
    UniformSampler(4)(torch.randn(2, 8, 6, 5))
    assert calls == [(2, 10, 9), (2, 6, 5)]
    sampler(torch.randn(2, 8, 10, 4))  # one axis not resampled: the reference
    backend('reference')
    sampler(torch.randn(2, 8, 10, 9))
    assert len(calls) == 2


def check_live_model_against_reference(backend, name: str, device: str = 'cpu') -> None:
    """A live ``ssb_resnetd26`` (adaptive samplers) forward and backward on backend ``name`` against PyTorch's:
    outputs and every parameter's gradient. In eval mode: with batch statistics over maps this small, fp32
    rounding alone moves the output by ~1e-3, which would hide a kernel's error."""
    torch.manual_seed(0)
    model = make_live(timm.create_model('ssb_resnetd26', num_classes=5, ssb_sizes=(4, 2, 1)))
    model = model.to(device).to(memory_format=torch.channels_last).eval()
    x = channels_last(torch.randn(2, 3, 48, 48)).to(device)
    results = {}
    for backend_name in ('reference', name):
        backend(backend_name)
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        results[backend_name] = out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    (out_ref, grads_ref), (out, grads) = results['reference'], results[name]
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4 * out_ref.abs().max().item())
    assert grads.keys() == grads_ref.keys()
    for n, g in grads.items():
        assert (g - grads_ref[n]).norm().item() <= 1e-3 * max(grads_ref[n].norm().item(), 1e-4), n


def test_whole_model_on_the_native_ops_matches_the_reference_backend(backend):
    """Both native CPU ops (matrices and resampling) in a whole model."""
    check_live_model_against_reference(backend, 'native')


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('shape', [(2, 70, 8, 8, 28, 28), (1, 33, 5, 5, 9, 11), (3, 130, 6, 5, 12, 10)])
def test_saliency_op_is_the_resampling_and_a_1x1_conv_of_it(shape, dtype):
    batch_size, channels, height, width, rows, cols = shape
    x = channels_last(torch.randn(batch_size, channels, height, width)).to(dtype)
    residual = channels_last(torch.randn(batch_size, channels, rows, cols)).to(dtype)
    matrix_y, matrix_x = banded(batch_size, rows, height), banded(batch_size, cols, width)
    weight, bias = torch.randn(channels), torch.randn(1)
    out, logits = native.separable_resample_saliency(x, matrix_y, matrix_x, residual, True, weight, bias)
    assert torch.equal(out, separable_resample(x, matrix_y, matrix_x, residual, True))
    expected = torch.nn.functional.conv2d(out.float(), weight.view(1, -1, 1, 1), bias)
    assert logits.dtype == torch.float32 and logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    torch.library.opcheck(native.separable_resample_saliency, (x, matrix_y, matrix_x, residual, True, weight, bias))
    with pytest.raises(RuntimeError, match=f"saliency_weight must be a contiguous float32 tensor of x's {channels}"):
        native.separable_resample_saliency(x, matrix_y, matrix_x, residual, True, torch.randn(channels + 1), bias)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('with_saliency', [True, False])
@pytest.mark.parametrize('channels', [70, 128])  # 128: the x86 builds' bfloat16 as even and odd values
def test_into_residual_op_writes_the_saliency_ops_values_into_the_residual(dtype, with_saliency, channels):
    batch_size, height, width, rows, cols = 2, 8, 8, 28, 28
    x = channels_last(torch.randn(batch_size, channels, height, width)).to(dtype)
    residual = channels_last(torch.randn(batch_size, channels, rows, cols)).to(dtype)
    matrix_y, matrix_x = banded(batch_size, rows, height), banded(batch_size, cols, width)
    weight, bias = (torch.randn(channels), torch.randn(1)) if with_saliency else (None, None)
    if with_saliency:
        expected, expected_logits = native.separable_resample_saliency(
            x, matrix_y, matrix_x, residual, True, weight, bias
        )
    else:
        expected = separable_resample(x, matrix_y, matrix_x, residual, True)
    torch.library.opcheck(
        native.separable_resample_into_residual, (x, matrix_y, matrix_x, residual.clone(), True, weight, bias)
    )
    data_ptr, residual_before = residual.data_ptr(), residual.clone()
    logits = native.separable_resample_into_residual(x, matrix_y, matrix_x, residual, True, weight, bias)
    assert residual.data_ptr() == data_ptr and torch.equal(residual, expected)
    rtol, atol = TOLERANCES[dtype]
    ref = reference(x, matrix_y, matrix_x, residual_before, True)
    torch.testing.assert_close(residual.float(), ref, rtol=rtol, atol=atol * ref.abs().max().item())
    if with_saliency:
        assert torch.equal(logits, expected_logits)
    else:
        assert logits.numel() == 0
    with pytest.raises(RuntimeError, match='must not alias x'):
        square_y, square_x = banded(batch_size, height, height), banded(batch_size, width, width)
        native.separable_resample_into_residual(x, square_y, square_x, x, True, None, None)
    with pytest.raises(RuntimeError, match='given together'):
        native.separable_resample_into_residual(x, matrix_y, matrix_x, residual, True, torch.randn(channels), None)


def test_stages_write_into_block_inputs_only_nothing_else_holds(monkeypatch):
    """In eager inference an SSB block writes its output into its input's memory only where that input is the
    output of the fused SSB block before it: never the stage's input, never a tensor a hook was given."""
    model = live_ssb_resnetd50()
    written = count_calls(monkeypatch, 'separable_resample_into_residual', lambda args: args[3].data_ptr())
    with torch.enable_grad():
        expected = model(X_96).detach()  # autograd on: the blocks one by one, nothing written in place
    assert written == []
    seen = {}

    def keep(name):
        def hook(module, args, out=None):
            tensor = args[0] if out is None else out
            seen.setdefault(name, (tensor, tensor.clone()))

        return hook

    hooks = [
        model.layer2[0].register_forward_hook(keep('layer2[0]')),
        model.layer3.register_forward_pre_hook(keep('layer3 input')),
    ]
    with torch.no_grad():
        out = model(X_96)
    # 10 SSB blocks, 3 of them first in their stage: the other 7 write into their inputs
    assert len(written) == 7
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    for name, (held, value) in seen.items():
        assert torch.equal(held, value), name
    for hook in hooks:
        hook.remove()
    hook = model.layer3[2].register_forward_hook(keep('layer3[2]'))  # layer3[2] is called; layer3[3] keeps its input
    written.clear()
    with torch.no_grad():
        torch.testing.assert_close(model(X_96), out, rtol=1e-5, atol=1e-5 * out.abs().max().item())
    hook.remove()
    held, value = seen['layer3[2]']
    assert len(written) == 5 and torch.equal(held, value)


def live_ssb_resnetd50() -> torch.nn.Module:
    """A live ``ssb_resnetd50`` whose 96 x 96 input is resampled in every SSB block: stage 2-4 maps of 12, 6, 3 to
    sizes 4, 2, 2; 7 SSB blocks followed by another SSB block (2 + 4 + 1), 3 that start a stage's SSB blocks."""
    torch.manual_seed(0)
    model = make_live(timm.create_model('ssb_resnetd50', num_classes=5, ssb_sizes=(4, 2, 2)))
    return model.to(memory_format=torch.channels_last).eval()


X_96 = channels_last(torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1)))


def count_saliency_passes(monkeypatch) -> list:
    """Ways up that compute the next block's saliency logits: ``separable_resample_saliency``, and
    ``separable_resample_into_residual`` given a saliency conv."""
    passes = count_calls(monkeypatch, 'separable_resample_saliency', lambda args: tuple(args[0].shape))
    into_residual = torch.ops.timm_ssb_cpu.separable_resample_into_residual

    def counted(*args):
        if args[5] is not None:
            passes.append(tuple(args[0].shape))
        return into_residual(*args)

    monkeypatch.setattr(torch.ops.timm_ssb_cpu, 'separable_resample_into_residual', counted)
    return passes


def test_stages_pass_the_next_saliency_logits_in_inference(monkeypatch):
    """Without autograd, each SSB block followed by an adaptive SSB block computes that block's saliency logits in
    its way back up; the output equals the blocks run one by one up to float32 rounding."""
    model = live_ssb_resnetd50()
    with torch.enable_grad():
        expected = model(X_96).detach()  # autograd on: the blocks one by one
    passes = count_saliency_passes(monkeypatch)
    with torch.no_grad():
        out = model(X_96)
    assert len(passes) == 7
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    with torch.inference_mode():
        torch.testing.assert_close(model(X_96), out, rtol=0, atol=0)
    assert len(passes) == 14
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out_bf16 = model(X_96)
    assert len(passes) == 21
    with torch.autocast('cpu', dtype=torch.bfloat16):
        expected_bf16 = model(X_96).detach()
    torch.testing.assert_close(out_bf16, expected_bf16, rtol=0.05, atol=0.05 * expected_bf16.abs().max().item())


def test_stages_run_blocks_one_by_one_where_passing_does_not_apply(monkeypatch, backend):
    """Hooks on a block or on a saliency conv still fire (those blocks are called as modules), the reference
    backend and ssbify's stages as well; the outputs stay the same."""
    model = live_ssb_resnetd50()
    passes = count_saliency_passes(monkeypatch)
    with torch.no_grad():
        expected = model(X_96)
        block_calls, saliency_calls = [], []
        block_hook = model.layer3[2].register_forward_hook(lambda *args: block_calls.append(1))
        saliency_hook = model.layer2[2].sampler.saliency.register_forward_hook(lambda *args: saliency_calls.append(1))
        passes.clear()
        out = model(X_96)
        # layer3[2] is called, so neither it nor layer3[1] passes logits; layer2[1] does not compute layer2[2]'s
        assert (block_calls, saliency_calls, len(passes)) == ([1], [1], 4)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
        block_hook.remove()
        saliency_hook.remove()
        backend('reference')
        passes.clear()
        torch.testing.assert_close(model(X_96), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
        assert passes == []


def test_compiled_inference_passes_the_saliency_logits_too():
    """``torch.compile(fullgraph=True)`` keeps the fused saliency op in its one graph (7 blocks pass logits, as in
    eager), and the output equals eager's."""
    model = live_ssb_resnetd50()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        expected = model(X_96)
        out = torch.compile(model, backend=backend, fullgraph=True)(X_96)
    targets = [str(n.target) for gm in graphs for n in gm.graph.nodes]
    assert len(graphs) == 1 and targets.count('timm_ssb.separable_resample_saliency.default') == 7
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_model_compiled_for_any_input_size_keeps_the_fused_ops():
    """``torch.compile(fullgraph=True, dynamic=True)``, as a model compiled for a third input size is (dynamo then
    traces the shapes as symbols): the rule that picks the native op is a constant of the trace and must not be
    handed a symbol (it was: the way's direction, a comparison of shapes). Every graph holds the fused ops, and the
    outputs at two sizes and batch sizes are eager's."""
    model = live_ssb_resnetd50()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for batch_size, size in ((2, 96), (3, 128)):
            x = channels_last(torch.randn(batch_size, 3, size, size))
            expected = model(x)
            torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert graphs
    for gm in graphs:
        targets = [str(n.target) for n in gm.graph.nodes]
        assert targets.count('timm_ssb.separable_resample_saliency.default') == 7
        assert not any('bmm' in target for target in targets)  # no fallback to PyTorch's products


def test_saliency_pass_is_refused_where_autograd_needs_a_backward():
    from timm_ssb.layers.sampling_matrices import resample_residual_saliency

    x = channels_last(torch.randn(2, 16, 3, 3))
    residual = channels_last(torch.randn(2, 16, 7, 7))
    a = banded(2, 7, 3)
    saliency = torch.nn.Conv2d(16, 1, 1)  # its parameters require grad
    assert resample_residual_saliency(x, a, a, residual, True, saliency) is None
    with torch.no_grad():
        out, logits = resample_residual_saliency(x, a, a, residual, True, saliency)
    torch.testing.assert_close(logits, saliency(out), rtol=1e-5, atol=1e-5)


def test_ssbify_gives_stages_that_pass_saliency_and_keeps_stage_hooks(monkeypatch):
    from timm_ssb import ssbify
    from timm_ssb.models.ssb_resnet import SSBStage

    source = timm.create_model('resnet50d', num_classes=5)
    stage_calls = []
    source.layer3.register_forward_hook(lambda *args: stage_calls.append(1))
    model = ssbify(source, sizes=(4, 2, 2), inplace=True)
    assert all(type(getattr(model, name)) is SSBStage for name in ('layer2', 'layer3', 'layer4'))
    assert type(model.layer1) is torch.nn.Sequential
    model = make_live(model).to(memory_format=torch.channels_last).eval()
    passes = count_saliency_passes(monkeypatch)
    with torch.no_grad():
        model(X_96)
    assert (len(passes), stage_calls) == (7, [1])


def test_calibration_at_first_use_is_not_counted_as_the_callers_work(monkeypatch, tmp_path):
    """The first native resampling of a process measures the calibration; inside a FlopCounterMode (how
    ``timm-ssb models`` counts GMACs) that must not add to the count, and the result must be the kernel's."""
    import timm_ssb.layers.native.calibration as calibration_module

    monkeypatch.setattr(calibration_module, 'cache_dir', lambda: tmp_path)
    monkeypatch.setattr(calibration_module, '_memory', {})
    monkeypatch.setattr(native.dispatch, 'native_resample_is_faster', calibration_module.native_resample_is_faster)
    x = channels_last(torch.randn(2, 8, 14, 14))
    dy, dx, _, _ = uniform_matrices(x, 6, 1 / 12, 1 / 12)
    with FlopCounterMode(display=False) as first:
        out = resample(x, dy, dx)
    assert (tmp_path / calibration_module.CALIBRATION_FILE).exists()  # measured just now
    with FlopCounterMode(display=False) as again:
        resample(x, dy, dx)
    assert first.get_total_flops() == again.get_total_flops() == 2 * 2 * 8 * 6 * 14 * (14 + 6)
    torch.testing.assert_close(out, resample_reference(x, dy, dx), rtol=1e-5, atol=1e-6)


def test_calibration_at_first_use_inside_torch_compile(monkeypatch, tmp_path):
    """The dispatch asks the calibration while torch.compile traces (a constant to it): it measures on real tensors
    there, and the compiled graph still holds the op once, with the reference's values."""
    import timm_ssb.layers.native.calibration as calibration_module

    monkeypatch.setattr(calibration_module, 'cache_dir', lambda: tmp_path)
    monkeypatch.setattr(calibration_module, '_memory', {})
    monkeypatch.setattr(native.dispatch, 'native_resample_is_faster', calibration_module.native_resample_is_faster)
    x = channels_last(torch.randn(2, 8, 14, 14))
    dy, dx, _, _ = uniform_matrices(x, 6, 1 / 12, 1 / 12)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: resample(t, dy, dx), fullgraph=True)
    torch.testing.assert_close(compiled(x), resample_reference(x, dy, dx), rtol=1e-5, atol=1e-6)
    assert (tmp_path / calibration_module.CALIBRATION_FILE).exists()
