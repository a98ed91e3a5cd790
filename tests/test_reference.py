"""Every path of the package against the independent float64 reference (``ssb_reference.py``), with live
branches, and small cases pinned to values derived by hand."""

import math

import pytest
import timm
import torch
import torch.nn as nn

from ssb_reference import make_live, reference_block, reference_model, sampling_matrices
from timm_ssb.layers import AdaptiveSampler, adaptive_positions, create_sampler
from timm_ssb.models import SSBBottleneck

SAMPLERS = ['adaptive', 'uniform', 'bilinear', 'dconv']


def softmax(values):
    total = sum(math.exp(-v) for v in values)
    return [math.exp(-v) / total for v in values]


# ---------------------------------------------------------------------------------------------------------
# Small cases by hand


def test_uniform_matrices_by_hand():
    """L = 4, s = 2, default widths sigma = 1/2 sample spacing = 0.25: targets 0.25, 0.75, pixels 1/8, 3/8, 5/8,
    7/8; exponents (u - q)^2 / (2 * 0.25^2) are 0.125, 0.125, 1.125, 3.125 for the first sample."""
    down_y, down_x, up_y, up_x = create_sampler('uniform', 1, 2).matrices(torch.zeros(1, 1, 4, 4))
    row0 = softmax([0.125, 0.125, 1.125, 3.125])
    expected_down = torch.tensor([row0, row0[::-1]])
    first, second = softmax([0.125, 3.125]), softmax([0.125, 1.125])  # output pixels 1/8 and 3/8
    expected_up = torch.tensor([first, second, second[::-1], first[::-1]])
    for got, expected in ((down_y, expected_down), (down_x, expected_down), (up_y, expected_up), (up_x, expected_up)):
        torch.testing.assert_close(got[0], expected, rtol=1e-6, atol=1e-7)


def test_bilinear_matrices_by_hand():
    """4 -> 2 reads pixel pairs (source positions 0.5 and 2.5); 2 -> 4 reads at -0.25 (clamped), 0.25, 0.75, 1.25."""
    down_y, down_x, up_y, up_x = create_sampler('bilinear', 1, 2).matrices(torch.zeros(1, 1, 4, 4))
    expected_down = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]])
    expected_up = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    for got, expected in ((down_y, expected_down), (down_x, expected_down), (up_y, expected_up), (up_x, expected_up)):
        torch.testing.assert_close(got[0], expected, rtol=0, atol=1e-7)


def _one_sample_position(a: float, sigma_g: float) -> float:
    """L = 2, s = 1, marginal (a, 1 - a): the target p = 1/2; the extended pixels -3/4 .. 7/4 lie at distances
    5/4, 3/4, 1/4, 1/4, 3/4, 5/4 from it (marginal a, a, a, b, b, b). Constant saliency's mean is 1/2 by symmetry,
    so u = 1/2 + sum(m g q) / sum(m g) - 1/2."""
    b = 1.0 - a
    g1, g2, g3 = (math.exp(-(d**2) / (2 * sigma_g**2)) for d in (1.25, 0.75, 0.25))
    num = a * (-0.75 * g1 - 0.25 * g2 + 0.25 * g3) + b * (0.75 * g3 + 1.25 * g2 + 1.75 * g1)
    return num / ((a + b) * (g1 + g2 + g3))


def test_adaptive_positions_and_matrices_by_hand():
    saliency = torch.tensor([[0.5, 0.3], [0.1, 0.1]])  # marginals: rows (0.8, 0.2), columns (0.6, 0.4)
    sampler = AdaptiveSampler(1, 1)  # sigma_g 0.18, sigma_down = sigma_up = 0.5
    logits = saliency.log().view(1, 1, 2, 2)
    u_y, u_x = (p.item() for p in adaptive_positions(logits, 1, sampler.sigma_g))
    assert u_y == pytest.approx(_one_sample_position(0.8, 0.18), abs=1e-6)
    assert u_x == pytest.approx(_one_sample_position(0.6, 0.18), abs=1e-6)
    assert u_y < u_x < 0.5  # mass on the first row and column pulls the sample there, rows more
    with torch.no_grad():
        sampler.saliency.bias.fill_(0.0)
    x = logits.expand(1, 1, 2, 2)  # a 1x1 conv with weight 1 and bias 0 gives the logits themselves
    with torch.no_grad():
        sampler.saliency.weight.fill_(1.0)
        down_y, down_x, up_y, up_x = sampler.matrices(x)
    for got, u in ((down_y, u_y), (down_x, u_x)):
        torch.testing.assert_close(got[0, 0], torch.tensor(softmax([(u - q) ** 2 / 0.5 for q in (0.25, 0.75)])))
    for got in (up_y, up_x):  # one sample: every output pixel reads it with weight one
        torch.testing.assert_close(got[0], torch.ones(2, 1))


@pytest.mark.parametrize('kind', ['adaptive', 'uniform', 'bilinear'])
def test_axis_not_longer_than_size_gives_identity(kind):
    down_y, down_x, up_y, up_x = create_sampler(kind, 3, 5).matrices(torch.randn(2, 3, 5, 9))
    for m in (down_y, up_y):
        assert torch.equal(m, torch.eye(5).expand(2, 5, 5))
    assert down_x.shape == (2, 5, 9) and up_x.shape == (2, 9, 5)


# ---------------------------------------------------------------------------------------------------------
# Matrices, blocks and models against the float64 reference


@pytest.mark.parametrize(
    'kind,sampler_args',
    [
        ('adaptive', {}),
        ('adaptive', {'sigma_g': 0.05, 'sigma_down': 0.03, 'sigma_up': 0.11}),
        ('uniform', {}),
        ('uniform', {'sigma_down': 0.2, 'sigma_up': 0.04}),
        ('bilinear', {}),
    ],
)
@pytest.mark.parametrize('height,width,size', [(15, 11, 6), (28, 28, 16), (7, 7, 4), (5, 9, 6)])
def test_matrices_equal_the_reference(kind, sampler_args, height, width, size):
    sampler = make_live(create_sampler(kind, 8, size, sampler_args=sampler_args))
    x = torch.randn(3, 8, height, width)
    with torch.no_grad():
        got = sampler.matrices(x)
        expected = sampling_matrices(sampler.double() if kind == 'adaptive' else sampler, x.double())
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-6)


def _block(kind: str, size: int = 6, **kwargs) -> SSBBottleneck:
    torch.manual_seed(0)
    block = SSBBottleneck(32, 8, sampler=kind, sampler_size=None if kind == 'dconv' else size, **kwargs)
    return make_live(block, seed=1)


def _run(module: nn.Module, x: torch.Tensor, weights: torch.Tensor, autocast: bool = False):
    """Output and the gradients of ``sum(out * weights)`` for the input and every parameter."""
    x = x.detach().clone().requires_grad_()
    module.zero_grad()
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        out = module(x)
    (out.double() * weights).sum().backward()
    grads = {'input': x.grad}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return out, grads


def _assert_close_to(got: torch.Tensor, expected: torch.Tensor, rel: float, what: str, floor: float = 0.0) -> None:
    """``|got - expected| <= rel * max(max|expected|, floor)`` elementwise, with ``expected`` in float64.

    ``floor`` is for tensors that are zero in exact arithmetic (the saliency bias: softmax ignores a shift)."""
    scale = max(expected.abs().max().item(), floor)
    error = (got.double() - expected).abs().max().item()
    assert error <= rel * scale, f'{what}: max error {error:.3g} > {rel} x scale {scale:.3g}'


def _assert_grads_close(grads, ref_grads, rel: float, floor_fraction: float = 1e-3) -> None:
    """Every gradient elementwise, each against its own scale or ``floor_fraction`` of the largest gradient's,
    whichever is larger (for gradients that are zero in exact arithmetic, or small by cancellation)."""
    assert grads.keys() == ref_grads.keys()
    floor = floor_fraction * max(g.abs().max().item() for g in ref_grads.values())
    for name, grad in grads.items():
        _assert_close_to(grad, ref_grads[name], rel, f'gradient of {name}', floor)


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected).norm() / expected.norm()).item()


def _assert_bf16_close(out, grads, ref_out, ref_grads, grad_rel: float) -> None:
    """bf16 keeps 8 significant bits: the output within 1% (relative norm); the input gradient, all parameter
    gradients taken together and the saliency conv's within ``grad_rel``."""
    assert _relative_error(out, ref_out) < 1e-2
    assert _relative_error(grads['input'], ref_grads['input']) < grad_rel
    names = [k for k in grads if k != 'input']
    flat = [torch.cat([d[k].double().flatten() for k in names]) for d in (grads, ref_grads)]
    assert _relative_error(*flat) < grad_rel
    if 'sampler.saliency.weight' in grads:  # sums of many cancelling bf16 products: its direction
        got, expected = grads['sampler.saliency.weight'].double(), ref_grads['sampler.saliency.weight']
        assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.9


FP32_OUT = 1e-5  # relative to each tensor's largest value
FP32_GRAD = 1e-4
BF16_GRAD = {'eval': 0.1, 'train': 0.2}
"""bf16 gradients in training are looser: batch-statistics norms of a tiny batch amplify rounding (the
``dconv`` sampler, whose backward is all PyTorch's, is off by 13% there too)."""


@pytest.mark.parametrize('kind', SAMPLERS)
@pytest.mark.parametrize('layout', ['nchw', 'channels_last'])
@pytest.mark.parametrize('precision', ['fp32', 'bf16', 'autocast'])
@pytest.mark.parametrize('mode', ['eval', 'train'])
@pytest.mark.parametrize('shape', [(15, 11), (5, 9)])
def test_block_equals_reference(kind, layout, precision, mode, shape):
    """Values and every gradient (input, saliency, convs, norms) of one SSB block against the reference.

    ``eval`` ends on the fused ReLU end; ``train`` normalises with batch statistics. ``(5, 9)`` with ``s = 6``
    leaves the rows as they are and samples the columns."""
    block = _block(kind).train(mode == 'train')
    ref = reference_block(block)
    memory_format = torch.channels_last if layout == 'channels_last' else torch.contiguous_format
    x = torch.randn(2, 32, *shape)
    ref_out, ref_grads = _run(ref, x.double(), weights := torch.randn(2, 32, *shape, dtype=torch.float64))
    if precision == 'bf16':
        block = block.to(torch.bfloat16)
        x = x.to(torch.bfloat16)
    block = block.to(memory_format=memory_format)
    out, grads = _run(block, x.contiguous(memory_format=memory_format), weights, autocast=precision == 'autocast')
    assert out.dtype == (torch.bfloat16 if precision == 'bf16' else torch.float32)  # autocast: x + y promotes
    if layout == 'channels_last' and kind != 'dconv':
        assert out.is_contiguous(memory_format=torch.channels_last)
    if precision == 'fp32':
        _assert_close_to(out, ref_out, FP32_OUT, 'output')
        _assert_grads_close(grads, ref_grads, FP32_GRAD)
    else:
        _assert_bf16_close(out, grads, ref_out, ref_grads, BF16_GRAD[mode])


@pytest.mark.parametrize('kind', ['adaptive', 'uniform', 'bilinear'])
@pytest.mark.parametrize('layout', ['nchw', 'channels_last'])
@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_block_with_silu_and_drop_path_equals_reference(kind, layout, mode):
    """The unfused end: another activation, and drop path in training (here a deterministic stand-in that
    halves the branch in training and is the identity in eval, as drop path is); with SE in the branch, as
    in ResNet-RS."""

    class HalfInTraining(nn.Module):
        def forward(self, y):
            return y * 0.5 if self.training else y

    block = _block(kind, act_layer=nn.SiLU, drop_path=HalfInTraining(), attn_layer='se').train(mode == 'train')
    ref = reference_block(block)
    memory_format = torch.channels_last if layout == 'channels_last' else torch.contiguous_format
    x = torch.randn(2, 32, 15, 11)
    weights = torch.randn(2, 32, 15, 11, dtype=torch.float64)
    ref_out, ref_grads = _run(ref, x.double(), weights)
    out, grads = _run(block.to(memory_format=memory_format), x.contiguous(memory_format=memory_format), weights)
    _assert_close_to(out, ref_out, FP32_OUT, 'output')
    _assert_grads_close(grads, ref_grads, FP32_GRAD)


def test_act3_swapped_after_construction_equals_reference():
    block = _block('adaptive').eval()
    block.act3 = nn.GELU()
    ref = reference_block(block)
    x = torch.randn(2, 32, 15, 11).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        _assert_close_to(block.to(memory_format=torch.channels_last)(x), ref(x.double()), FP32_OUT, 'output')


MODEL_SIZES = dict(ssb_sizes=(4, 2, 1))  # at 64 x 64 the maps of stages 2-4 are 8, 4, 2: every SSB block samples


def _model(kind: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    extra = {} if kind == 'dconv' else MODEL_SIZES
    return make_live(timm.create_model('ssb_resnetd26', ssb_sampler=kind, num_classes=10, **extra, **kwargs), seed=2)


@pytest.mark.parametrize('kind', SAMPLERS)
@pytest.mark.parametrize('layout', ['nchw', 'channels_last'])
@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_model_equals_reference_and_differs_from_its_baseline(kind, layout, mode):
    model = _model(kind).train(mode == 'train')
    ref = reference_model(model)
    baseline = timm.create_model('resnet26d', num_classes=10).train(mode == 'train')
    baseline.load_state_dict({k: v for k, v in model.state_dict().items() if '.sampler.' not in k})
    memory_format = torch.channels_last if layout == 'channels_last' else torch.contiguous_format
    x = torch.randn(4, 3, 64, 64)
    weights = torch.randn(4, 10, dtype=torch.float64)
    ref_out, ref_grads = _run(ref, x.double(), weights)
    model = model.to(memory_format=memory_format)
    out, grads = _run(model, x.contiguous(memory_format=memory_format), weights)
    # A whole model: ~30 layers of fp32 rounding, and in training batch-statistics norms over maps down to
    # 1 x 1 (four values a channel) that amplify it; the dconv model, all PyTorch's, needs the same.
    # Gradients by norm (a pre-activation within rounding of zero flips a ReLU in one precision), each against
    # its own norm or 1% of the largest gradient's, whichever is larger (some are zero in exact arithmetic,
    # some small by cancellation).
    _assert_close_to(out, ref_out, 10 * FP32_OUT if mode == 'eval' else 1e-3, 'output')
    floor = 1e-2 * max(g.norm().item() for g in ref_grads.values())
    for name, grad in grads.items():
        error = (grad.double() - ref_grads[name]).norm().item() / max(ref_grads[name].norm().item(), floor)
        assert error < 5e-2, f'gradient of {name}: relative error {error:.3g}'
    with torch.no_grad():
        base_out = baseline(x)
    # the sampling is visible: SSB and its baseline (same weights) differ by far more than the tolerance
    assert (base_out.double() - ref_out).abs().max() > 1e3 * FP32_OUT * ref_out.abs().max()


@pytest.mark.parametrize('kind', ['adaptive', 'uniform'])
@pytest.mark.parametrize('layout', ['nchw', 'channels_last'])
def test_model_bf16_is_close_to_reference_and_far_from_its_baseline(kind, layout):
    model = _model(kind).eval()
    ref = reference_model(model)
    baseline = timm.create_model('resnet26d', num_classes=10).eval()
    baseline.load_state_dict({k: v for k, v in model.state_dict().items() if '.sampler.' not in k})
    memory_format = torch.channels_last if layout == 'channels_last' else torch.contiguous_format
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        expected = ref(x.double())
        distance_to_baseline = (baseline(x).double() - expected).norm() / expected.norm()
        model = model.to(memory_format=memory_format)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            amp = model(x.contiguous(memory_format=memory_format))
        pure = model.to(torch.bfloat16)(x.to(torch.bfloat16).contiguous(memory_format=memory_format))
    for out in (amp, pure):
        error = (out.double() - expected).norm() / expected.norm()
        assert error < 0.1 * distance_to_baseline, (error, distance_to_baseline)
