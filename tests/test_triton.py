"""The Triton sampling kernel against the PyTorch reference.

Without a GPU the kernel runs on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, set in
``conftest.py``), under the ``'triton'`` backend; with a GPU the same tests run it natively on CUDA. The
interpreter does not type-check the kernel as the compiler does, so it is also compiled for Hopper and Ampere
GPUs (``tools/compile_triton_kernels.py``; no GPU needed to compile).
"""

import json
import os
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

if sys.platform != 'linux':
    pytest.importorskip('triton', reason="Triton ships with PyTorch's Linux wheels only")


import timm_ssb.layers.native as native
from ssb_reference import make_live
from test_native import (
    banded,
    channels_last,
    check_compiled_sampler_matches_eager,
    check_live_model_against_reference,
    check_op_against_reference,
    reference,
)
from timm_ssb.layers import (
    AdaptiveSampler,
    adaptive_matrices,
    resample,
    resample_reference,
    resample_residual,
    uniform_matrices,
)
from timm_ssb.layers.native import resample as resample_op
from timm_ssb.layers.native import separable_resample_triton, triton_kernels
from timm_ssb.models.ssb_resnet import SSBBottleneck

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'

# (dtype, rtol, atol as a fraction of the reference's largest magnitude): 16-bit maps in and out, fp32 inside
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 1e-2), torch.float16: (2e-3, 2e-3)}

# (B, C, H, W, P, Q): channel tiles of 32 with a tail, down and up, P != Q, one channel, a single input row, and
# more than one tile of 64 input columns (w chunks) and of 64 output columns (q tiles)
SHAPES = [
    (2, 5, 7, 9, 3, 4),
    (1, 33, 5, 5, 9, 11),
    (2, 1, 6, 6, 3, 3),
    (1, 3, 1, 70, 2, 80),
]


@pytest.fixture
def backend():
    saved = native.get_sampling_backend()
    yield native.set_sampling_backend
    native.set_sampling_backend(saved)


def on_device(t: torch.Tensor) -> torch.Tensor:
    return t.to(DEVICE)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize('with_residual,relu', [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize('shape', SHAPES)
def test_kernel_matches_reference_values_and_gradients(shape, with_residual, relu, dtype, no_tf32):
    check_op_against_reference(
        separable_resample_triton, shape, with_residual, relu, dtype, TOLERANCES, DEVICE, structural_zeros=False
    )


def test_kernel_reads_any_strides():
    """An NCHW map and a residual sliced from a larger tensor: the kernel takes strides, not a layout."""
    x = on_device(torch.randn(2, 6, 7, 5))
    residual = on_device(torch.randn(2, 12, 3, 4))[:, ::2]
    matrix_y, matrix_x = on_device(banded(2, 3, 7)), on_device(banded(2, 4, 5))
    out = separable_resample_triton(x, matrix_y, matrix_x, residual, True)
    torch.testing.assert_close(out, reference(x, matrix_y, matrix_x, residual, True), rtol=1e-5, atol=1e-5)


def test_registrations_pass_opcheck():
    """Schema, fake tensor, autograd registration and AOT dispatch, as ``torch.library`` checks them."""
    x = on_device(channels_last(torch.randn(1, 3, 5, 4))).requires_grad_()
    residual = on_device(channels_last(torch.randn(1, 3, 2, 3))).requires_grad_()
    matrix_y, matrix_x = on_device(banded(1, 2, 5)).requires_grad_(), on_device(banded(1, 3, 4)).requires_grad_()
    torch.library.opcheck(separable_resample_triton, (x, matrix_y, matrix_x, residual, True))


@pytest.mark.filterwarnings('ignore:invalid value encountered:RuntimeWarning')  # the interpreter's NumPy
def test_nan_and_inf_pass_through_like_the_reference():
    x = on_device(channels_last(torch.randn(1, 16, 4, 4)))
    x[0, 3, 1, 2] = float('nan')
    x[0, 5, 2, 2] = float('inf')
    a = on_device(torch.full((1, 2, 4), 0.25))
    for dtype in (torch.float32, torch.bfloat16):
        out = separable_resample_triton(x.to(dtype), a, a, None, True)
        ref = reference(x.to(dtype), a, a, None, True)
        assert torch.equal(out.float().isnan(), ref.isnan()) and torch.equal(out.float().isinf(), ref.isinf())


def test_bad_inputs_are_clear_errors():
    """The kernel does not bound its reads by the matrices' shapes: the op checks them, naming the argument."""
    x = on_device(channels_last(torch.randn(1, 3, 5, 4)))
    matrix_y, matrix_x = on_device(banded(1, 2, 5)), on_device(banded(1, 3, 4))
    residual = on_device(channels_last(torch.randn(1, 3, 2, 3)))
    cases = [
        (
            (x.double(), matrix_y, matrix_x, None),
            TypeError,
            'x must be float32, bfloat16 or float16; got torch.float64',
        ),
        ((x[0], matrix_y, matrix_x, None), ValueError, r'x must be a \(B, C, H, W\) map; got shape \[3, 5, 4\]'),
        (
            (x, matrix_y[:, :, :4], matrix_x, None),
            ValueError,
            r'matrix_y must be \(1, n, 5\) for x of shape \[1, 3, 5, 4\]',
        ),
        ((x, matrix_y, matrix_x.expand(2, 3, 4), None), ValueError, r'matrix_x must be \(1, n, 4\)'),
        ((x, matrix_y, matrix_x, residual[:, :2]), ValueError, r"residual must have the output's shape \[1, 3, 2, 3\]"),
        ((x.bfloat16(), matrix_y, matrix_x, residual), TypeError, "residual must have x's dtype torch.bfloat16"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            separable_resample_triton(*args, False)
    # a meta tensor among them would dispatch to the fake; the check itself, as a CUDA/CPU mix meets it
    with pytest.raises(ValueError, match="matrix_x must be on x's device"):
        resample_op._check_inputs(x, matrix_y, matrix_x.to('meta'), None)


def test_cpu_tensors_without_the_interpreter_are_an_error(monkeypatch):
    """A kernel defined without the interpreter (TRITON_INTERPRET unset at its first use) is for GPUs only."""
    assert triton_kernels(), triton_kernels.error
    monkeypatch.setattr(triton_kernels.value.resample, 'INTERPRETED', False)
    x = channels_last(torch.randn(1, 3, 5, 4))
    with pytest.raises(RuntimeError, match=r'CPU tensors only under Triton.s interpreter \(TRITON_INTERPRET=1'):
        separable_resample_triton(x, banded(1, 2, 5), banded(1, 3, 4), None, False)


def count_triton_calls(monkeypatch) -> list:
    assert triton_kernels()
    calls = []
    module = triton_kernels.value.resample
    launch = module.launch

    def counted(x, *args):
        calls.append((x.device.type, x.dtype))
        return launch(x, *args)

    monkeypatch.setattr(module, 'launch', counted)
    return calls


def test_triton_backend_samples_channels_last_maps_in_the_kernel(backend, monkeypatch):
    backend('triton')
    x = on_device(channels_last(torch.randn(2, 8, 9, 9)))
    dy, dx, uy, ux = uniform_matrices(x, 4, 1 / 8, 1 / 8)
    calls = count_triton_calls(monkeypatch)
    z = resample(x, dy, dx)
    out = resample_residual(z, uy, ux, x, True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        resample(x, dy, dx)
    assert calls == [(x.device.type, torch.float32)] * 2 + [(x.device.type, torch.bfloat16)]
    resample(x.contiguous(), dy, dx)  # NCHW: the reference
    resample(x.double(), dy, dx)  # float64: the batched products
    assert len(calls) == 3
    ref = torch.relu(x + resample_reference(resample_reference(x, dy, dx), uy, ux))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(DEVICE != 'cpu', reason='the CPU dispatch')
def test_auto_backend_keeps_the_cpp_kernel_on_the_cpu(backend, monkeypatch):
    backend('auto')
    x = channels_last(torch.randn(2, 8, 9, 9))
    calls = count_triton_calls(monkeypatch)
    resample(x, *uniform_matrices(x, 4, 1 / 8, 1 / 8)[:2])
    assert calls == []


@pytest.fixture
def triton_missing(monkeypatch):
    """A process where Triton cannot be imported (as with PyTorch's CPU wheels)."""

    def fail():
        raise ModuleNotFoundError("No module named 'triton'")

    monkeypatch.setattr(triton_kernels, '_load', fail)
    for name, value in (('value', None), ('error', None), ('_loaded', False), ('_warned', False)):
        monkeypatch.setattr(triton_kernels, name, value)


def test_without_triton_auto_warns_once_and_the_forced_backends_raise(triton_missing, backend):
    backend('auto')
    with pytest.warns(RuntimeWarning, match="Triton sampling kernels could not be loaded .*No module named 'triton'"):
        assert not native.dispatch._triton_ready()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert not native.dispatch._triton_ready()
    assert triton_kernels.error == "ModuleNotFoundError: No module named 'triton'"
    for name in ('native', 'triton'):
        backend(name)
        with pytest.raises(RuntimeError, match=f'TIMM_SSB_SAMPLING_BACKEND={name}, but the Triton sampling kernel'):
            native.dispatch._triton_ready()


def test_compiled_sampler_keeps_the_op_in_one_graph(backend):
    backend('triton')
    check_compiled_sampler_matches_eager(DEVICE)


@pytest.mark.slow
def test_whole_model_on_the_triton_kernel_matches_the_reference_backend(backend, no_tf32):
    check_live_model_against_reference(backend, 'triton', DEVICE)


@pytest.mark.parametrize('arch', [90, 80])
def test_kernel_compiles_for_gpus_without_one(arch):
    """The interpreter runs the kernel as Python and NumPy; the compiler type-checks it and lowers ``tl.dot`` for
    real. Compiled in a fresh process (the interpreter, once it has run, changes how ``triton.language``
    traces): every specialisation the resampling's launcher makes, to a cubin, tensor cores for 16-bit maps; and
    the matrices' kernels."""
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    script = Path(__file__).resolve().parent.parent / 'tools' / 'compile_triton_kernels.py'
    done = subprocess.run(
        [sys.executable, str(script), str(arch)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    compiled = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(compiled) == 5
    for name, info in compiled.items():
        assert info['cubin_bytes'] > 0, name
        assert info['tensor_cores'] == (name.startswith('bf16') or name.startswith('fp16')), name


# (B, H, W, s): the three stages of a ResNet-D at 224 x 224, a non-square map, and a short side
MATRIX_SHAPES = [(3, 28, 28, 16), (2, 14, 14, 8), (2, 7, 7, 4), (2, 9, 13, 5), (1, 5, 40, 3)]


@pytest.mark.parametrize('shape', MATRIX_SHAPES)
def test_matrices_kernel_matches_the_reference(shape, backend):
    """Peaked saliency (the positions move away from the uniform grid), against PyTorch's ops."""
    batch_size, height, width, size = shape
    logits = torch.randn(batch_size, height, width) * 3
    backend('reference')
    expected = adaptive_matrices(logits[:, None], size, 0.18, 0.5 / size, 0.5 / size)
    got = native.adaptive_matrices_triton(on_device(logits), size, 0.18, 0.5 / size, 0.5 / size)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g.cpu(), e, rtol=1e-5, atol=1e-5)
    uniform = uniform_matrices(torch.empty(batch_size, 1, height, width), size, 0.5 / size, 0.5 / size)
    assert (expected[0] - uniform[0]).abs().max() > 1e-2


def test_matrices_kernel_samples_uniformly_under_constant_saliency():
    """As the reference: a fresh (zero-initialised) saliency conv gives the uniform sampler's matrices."""
    got = native.adaptive_matrices_triton(on_device(torch.full((2, 14, 14), 0.3)), 8, 0.18, 0.5 / 8, 0.5 / 8)
    uniform = uniform_matrices(torch.empty(2, 1, 14, 14), 8, 0.5 / 8, 0.5 / 8)
    for u, g in zip(uniform, got, strict=True):
        torch.testing.assert_close(g.cpu(), u, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('shape', MATRIX_SHAPES)
def test_matrices_kernel_gradient_matches_the_reference(shape, backend):
    """The logits' gradient from random gradients of all four matrices, and of some of them (``None`` for the
    others, as autograd passes them), against autograd through PyTorch's ops."""
    batch_size, height, width, size = shape
    logits = torch.randn(batch_size, height, width) * 3
    args = (size, 0.18, 0.5 / size, 0.5 / size)
    backend('reference')
    reference_logits = logits.clone().requires_grad_()
    expected = adaptive_matrices(reference_logits[:, None], *args)
    grads = [torch.randn_like(m) for m in expected]
    for chosen in ((0, 1, 2, 3), (0, 3), (2,)):
        (want,) = torch.autograd.grad(
            [expected[k] for k in chosen], reference_logits, [grads[k] for k in chosen], retain_graph=True
        )
        got = native.adaptive_matrices_triton_backward(
            on_device(logits), *[on_device(grads[k]) if k in chosen else None for k in range(4)], *args
        )
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_matrices_kernel_autograd_and_opcheck(backend):
    """Autograd reaches the backward kernel (the saliency conv learns on a GPU through it), and ``torch.library``'s
    checks of schema, fake tensor and autograd registration pass."""
    backend('triton')
    logits = on_device(torch.randn(2, 1, 14, 14) * 3).requires_grad_()
    assert native.native_matrices_op(logits) is native.adaptive_matrices_triton
    matrices = adaptive_matrices(logits, 8, 0.18, 0.5 / 8, 0.5 / 8)
    (grad,) = torch.autograd.grad(sum(m.square().sum() for m in matrices), logits)
    backend('reference')
    reference_logits = logits.detach().clone().requires_grad_()
    expected = adaptive_matrices(reference_logits, 8, 0.18, 0.5 / 8, 0.5 / 8)
    (want,) = torch.autograd.grad(sum(m.square().sum() for m in expected), reference_logits)
    torch.testing.assert_close(grad.cpu(), want.cpu(), rtol=1e-4, atol=1e-5 * want.abs().max().item())
    torch.library.opcheck(
        native.adaptive_matrices_triton,
        (logits.detach().reshape(2, 14, 14).contiguous().requires_grad_(), 8, 0.18, 0.1, 0.1),
    )


@pytest.mark.filterwarnings('ignore:All-NaN slice:RuntimeWarning', 'ignore:invalid value:RuntimeWarning')
def test_matrices_kernel_passes_nan_and_inf_on_like_the_reference(backend):
    """A NaN or +inf logit makes a sample's matrices and gradient all NaN, as in PyTorch (its log-softmax is NaN);
    a -inf logit is a saliency of zero, and the other samples are untouched. (The interpreter's NumPy warns of the
    NaNs it computes with; a GPU does not.)"""
    logits = torch.randn(4, 14, 14)
    logits[0, 3, 4], logits[1, 0, 0], logits[2, 5, 5] = float('nan'), float('inf'), float('-inf')
    args = (8, 0.18, 1 / 16, 1 / 16)
    backend('reference')
    reference_logits = logits.clone().requires_grad_()
    expected = adaptive_matrices(reference_logits[:, None], *args)
    grads = [torch.randn_like(m) for m in expected]  # (all ones would give a zero gradient: rows sum to one)
    (want,) = torch.autograd.grad(expected, reference_logits, grads)
    got = native.adaptive_matrices_triton(on_device(logits), *args)
    grad = native.adaptive_matrices_triton_backward(on_device(logits), *map(on_device, grads), *args).cpu()
    for e, g in zip(expected, got, strict=True):
        assert e[:2].isnan().all() and g[:2].isnan().all()
        torch.testing.assert_close(g[2:].cpu(), e[2:], rtol=1e-5, atol=1e-5)
    assert want[:2].isnan().all() and grad[:2].isnan().all()
    torch.testing.assert_close(grad[2:], want[2:], rtol=1e-4, atol=1e-5 * want[2:].abs().max().item())


def test_matrices_kernel_serves_maps_that_fit(backend):
    """Maps too large for one program per axis take PyTorch's ops."""
    backend('triton')
    assert native.native_matrices_op(on_device(torch.randn(2, 1, 14, 14))) is native.adaptive_matrices_triton
    assert native.native_matrices_op(on_device(torch.zeros(1, 1, 129, 129))) is None


def test_matrices_kernel_bad_inputs_are_clear_errors():
    """The kernels do not bound their reads: dtype, size, widths and the gradients' shapes are checked first."""
    logits = on_device(torch.randn(1, 6, 6))
    with pytest.raises(ValueError, match='logits must be contiguous float32'):
        native.adaptive_matrices_triton(logits.double(), 3, 0.18, 0.1, 0.1)
    with pytest.raises(ValueError, match=r'size must be in \(0, 6\)'):
        native.adaptive_matrices_triton(logits, 6, 0.18, 0.1, 0.1)
    with pytest.raises(ValueError, match='sigma_down must be a positive finite number; got 0.0'):
        native.adaptive_matrices_triton(logits, 3, 0.18, 0.0, 0.1)
    grad = on_device(torch.randn(1, 3, 6))
    with pytest.raises(ValueError, match=r'grad_up_x must be \[1, 6, 3\]'):
        native.adaptive_matrices_triton_backward(logits, grad, None, None, grad, 3, 0.18, 0.1, 0.1)
    with pytest.raises(ValueError, match='sigma_g must be a positive finite number; got nan'):
        native.adaptive_matrices_triton_backward(logits, grad, None, None, None, 3, float('nan'), 0.1, 0.1)


def test_whole_model_inference_on_the_triton_kernels_matches_the_reference_backend(backend, monkeypatch, no_tf32):
    """A live model's inference: both Triton kernels (matrices and resampling) serve every SSB block. (Training:
    the whole-model test above, with gradients.)"""
    torch.manual_seed(0)
    model = make_live(timm.create_model('ssb_resnetd26', num_classes=5, ssb_sizes=(4, 2, 1)))
    model = model.to(DEVICE).to(memory_format=torch.channels_last).eval()
    x = on_device(channels_last(torch.randn(2, 3, 48, 48)))
    launches = []
    assert triton_kernels()
    matrices_module = triton_kernels.value.matrices
    launcher = matrices_module.launch
    monkeypatch.setattr(matrices_module, 'launch', lambda *a: launches.append(1) or launcher(*a))
    outputs = {}
    for name in ('reference', 'triton'):
        backend(name)
        with torch.no_grad():
            outputs[name] = model(x)
    torch.testing.assert_close(outputs['triton'], outputs['reference'], rtol=1e-4, atol=1e-4)
    assert len(launches) == 3  # one per SSB block: the second block of layers 2, 3 and 4


# aten ops that allocate, view or reshape without moving data: no kernel launch on a GPU
NO_LAUNCH = {
    'alias', 'as_strided', 'detach', 'empty', 'empty_like', 'empty_strided', 'expand', 'lift_fresh', 'new_empty',
    'new_empty_strided', 'permute', 'reshape', 'select', 'slice', 'split', 'squeeze', 't', 'transpose', 'unbind',
    'unsqueeze', 'view', '_reshape_alias', '_unsafe_view',
}  # fmt: skip


class LaunchCount(TorchDispatchMode):
    """The kernels an eager GPU step launches: every aten op that moves data, and (counted by ``TritonLaunches``) the
    Triton kernels inside our custom ops, which themselves launch nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, name = func._schema.name.split('::')
        if namespace == 'aten' and name not in NO_LAUNCH:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


class CountedKernel:
    """A Triton kernel whose every launch (``kernel[grid](...)``) is counted in ``counter``."""

    def __init__(self, kernel, counter: Counter, name: str) -> None:
        self.kernel, self.counter, self.name = kernel, counter, name

    def __getitem__(self, grid):
        self.counter[self.name] += 1
        return self.kernel[grid]


@pytest.fixture
def triton_launches(monkeypatch) -> Counter:
    assert triton_kernels(), triton_kernels.error
    counter: Counter = Counter()
    for module in (triton_kernels.value.resample, triton_kernels.value.matrices):
        for name in module.__all__:
            if name.endswith('_kernel'):
                monkeypatch.setattr(module, name, CountedKernel(getattr(module, name), counter, name))
    return counter


def test_an_ssb_block_launches_few_more_kernels_than_its_baseline_block(backend, triton_launches, no_tf32, monkeypatch):
    """Issue #23's launch budget on the GPU path (each Triton launch counted, under the interpreter without a GPU,
    and every aten op that moves data): one live SSB block of layer2 against the timm bottleneck it replaces, its
    inference forward, its training forward and its backward. The forward meets the aim (at most 4 more launches:
    today 3, the two resamplings and the matrices' two launches against the block's fused residual add). The
    backward is held at today's count so that it cannot grow unnoticed: 27 more, from the Triton op's backward
    (transposed and identity matrices made contiguous, six resampling calls, two bmm and sums for the matrices'
    gradients); the aim there is 4 as well."""
    backend('triton')
    if DEVICE == 'cpu':  # as on a GPU, where the saliency conv runs as a conv (on CPU maps, a product over channels)
        monkeypatch.setattr(AdaptiveSampler, '_saliency_as_product', lambda self: False)
        monkeypatch.setattr(SSBBottleneck, '_convs_as_products', lambda self, z: False)  # likewise the branch's
    torch.manual_seed(0)
    ssb = make_live(timm.create_model('ssb_resnetd26', num_classes=5, ssb_sizes=(4, 2, 1))).layer2[1]
    base = make_live(timm.create_model('resnet26d', num_classes=5)).layer2[1]
    x = on_device(channels_last(torch.randn(2, 512, 8, 8)))
    counts = {}
    for name, block in (('ssb', ssb), ('base', base)):
        block = block.to(DEVICE).to(memory_format=torch.channels_last)
        for mode in ('inference', 'training'):
            block.train(mode == 'training')
            inputs = x.clone().requires_grad_(mode == 'training')
            triton_launches.clear()
            with LaunchCount() as forward:
                out = block(inputs)
            counts[name, mode] = sum(forward.ops.values()) + sum(triton_launches.values())
            if name == 'ssb':  # the matrices (one launch per axis), down and up
                assert triton_launches == {'axis_matrices_kernel': 2, 'separable_resample_kernel': 2}
        triton_launches.clear()
        with LaunchCount() as backward:
            out.backward(torch.ones_like(out))
        counts[name, 'backward'] = sum(backward.ops.values()) + sum(triton_launches.values())
    extra = {mode: counts['ssb', mode] - counts['base', mode] for mode in ('inference', 'training', 'backward')}
    assert extra['inference'] <= 4 and extra['training'] <= 4, (extra, counts)
    assert extra['backward'] <= 27, (extra, counts)


@pytest.mark.slow
def test_compiled_training_step_on_the_triton_ops_is_one_graph(backend, no_tf32, monkeypatch):
    """The compiled path CUDA maps take, checked without a GPU (issue #23): with the Triton ops a live model's
    training step under torch.compile(fullgraph=True) is one graph holding both custom ops (no graph break, no
    fallback to PyTorch's products), its backward traced by AOTAutograd, and its outputs and gradients are the
    eager ones."""
    from torch._dynamo.backends.debugging import aot_eager

    backend('triton')
    model = make_live(timm.create_model('ssb_resnetd26', num_classes=4, ssb_sizes=(4, 2, 1))).to(DEVICE)
    model = model.train().to(memory_format=torch.channels_last)
    x = on_device(channels_last(torch.randn(2, 3, 48, 48)))
    ops = []

    def recording(gm, example_inputs):
        ops.extend(str(node.target) for node in gm.graph.nodes if node.op == 'call_function')
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    out = torch.compile(model, backend=recording, fullgraph=True)(x)
    out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    assert any('separable_resample_triton' in op for op in ops) and any('adaptive_matrices_triton' in op for op in ops)
    assert not any('bmm' in op for op in ops)  # the sampling did not fall back to PyTorch's products
    model.zero_grad()
    # eager on the compiled step's graph: without the saliency gradient added in place (see test_models), and with
    # the small maps' convs as convs
    monkeypatch.setattr(AdaptiveSampler, '_fuses_saliency_gradient', lambda self, x: False)
    monkeypatch.setattr(SSBBottleneck, '_convs_as_products', lambda self, z: False)
    expected = model(x)
    expected.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    for (name, p), g in zip(model.named_parameters(), grads, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-3, atol=1e-4, msg=name)
