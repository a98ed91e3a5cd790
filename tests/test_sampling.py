"""Properties that pin the sampling maths, for each of its CPU implementations."""

import math
from typing import List

import pytest
import torch
import torch.nn.functional as F

from timm_ssb.layers import (
    AdaptiveSampler,
    BilinearSampler,
    DConvSampler,
    UniformSampler,
    adaptive_matrices,
    adaptive_positions,
    bilinear_matrices,
    create_sampler,
    gaussian_matrices,
    resample,
    resample_nhwc,
    resample_reference,
    resample_residual,
    saliency_positions,
    separable_matrices,
    uniform_matrices,
)
from timm_ssb.layers.native import get_sampling_backend, set_sampling_backend
from timm_ssb.layers.samplers import saliency_conv1x1
from timm_ssb.layers.sampling_matrices import (
    EXPORT_NHWC_MAX_POSITIONS,
    KERNEL_WEIGHT_LOG,
    add_residual,
    pixel_centres,
    tailless_softmax,
)


@pytest.fixture(autouse=True, params=['auto', 'reference'])
def sampling_backend(request):
    """Every property holds for the native CPU ops (matrices, resampling) and for the PyTorch reference."""
    saved = get_sampling_backend()
    set_sampling_backend(request.param)
    yield request.param
    set_sampling_backend(saved)


SIZES = [(28, 28, 16), (14, 9, 8), (7, 7, 4), (13, 20, 5)]


@pytest.mark.parametrize('height,width,size', SIZES)
@pytest.mark.parametrize('kind', ['adaptive', 'uniform', 'bilinear'])
def test_matrices_are_row_stochastic(kind, height, width, size):
    x = torch.randn(3, 8, height, width)
    sampler = create_sampler(kind, 8, size)
    if kind == 'adaptive':
        torch.nn.init.normal_(sampler.saliency.weight, std=2.0)
    dy, dx, uy, ux = sampler.matrices(x)
    assert dy.shape == (3, size, height) and dx.shape == (3, size, width)
    assert uy.shape == (3, height, size) and ux.shape == (3, width, size)
    for m in (dy, dx, uy, ux):
        assert (m >= 0).all()
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1]), rtol=0, atol=1e-6)


@pytest.mark.parametrize('height,width,size', SIZES)
def test_adaptive_with_zero_saliency_is_uniform_exactly(height, width, size):
    x = torch.randn(2, 16, height, width)
    adaptive = AdaptiveSampler(16, size, saliency_kernel=3)
    uniform = UniformSampler(size)
    for a, u in zip(adaptive.matrices(x), uniform.matrices(x), strict=True):
        assert torch.equal(a, u)
    za, _ = adaptive(x)
    zu, _ = uniform(x)
    assert torch.equal(za, zu)


def test_zero_saliency_positions_are_the_uniform_grid():
    for length, size in [(28, 16), (7, 4), (31, 3)]:
        log_m = torch.full((2, length), -3.7)
        assert torch.equal(saliency_positions(log_m, size, 0.18), pixel_centres(size, log_m.device).expand(2, size))


def test_both_axes_at_once_equal_each_axis_alone():
    """A square map's axes take one set of ops, over the axes stacked (fewer nodes in an exported graph): the
    positions and matrices equal those of each axis on its own, bit for bit."""
    torch.manual_seed(0)
    log_m = torch.log_softmax(3 * torch.randn(3, 2, 14), dim=-1)
    stacked = saliency_positions(log_m, 8, 0.18)
    for axis in range(2):
        assert torch.equal(stacked[:, axis], saliency_positions(log_m[:, axis], 8, 0.18))
    positions = list(stacked.unbind(1))
    both = separable_matrices([14, 14], 8, 3, log_m.device, positions, 0.05, 0.1)
    for axis, (down, up) in enumerate(((both.down_y, both.up_y), (both.down_x, both.up_x))):
        alone = gaussian_matrices(positions[axis], 14, 0.05, 0.1)
        assert torch.equal(down, alone[0]) and torch.equal(up, alone[1])


@pytest.mark.parametrize('height,width', [(14, 14), (14, 10)])
def test_positions_are_those_of_the_normalised_saliency_map(height, width):
    """The marginals are taken from the logits without the log-softmax that normalises the saliency map (a constant
    shift, which the positions do not see): the positions are those of the normalised map's marginals, whatever
    constant the logits carry."""
    torch.manual_seed(0)
    logits = 3 * torch.randn(2, 1, height, width)
    log_saliency = torch.log_softmax(logits.flatten(1), dim=-1).view(2, height, width)
    expected = [saliency_positions(torch.logsumexp(log_saliency, dim), 8, 0.18) for dim in (2, 1)]
    for shift in (0.0, 40.0, -40.0):
        for got, want in zip(adaptive_positions(logits + shift, 8, 0.18), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize('shape', [(2, 14, 14), (2, 3, 14, 14)])
def test_positions_name_logits_that_are_not_one_channel_maps(shape):
    with pytest.raises(ValueError, match=r'saliency_logits must be \(B, 1, H, W\); got shape'):
        adaptive_positions(torch.randn(shape), 8, 0.18)


@pytest.mark.parametrize('kind', ['adaptive', 'uniform', 'bilinear', 'dconv'])
def test_constant_map_stays_constant(kind):
    sampler = create_sampler(kind, 4, 6).eval()
    if kind == 'adaptive':
        torch.nn.init.normal_(sampler.saliency.weight, std=3.0)
    value = torch.arange(1.0, 5.0).view(1, 4, 1, 1)
    x = value.expand(2, 4, 17, 13).contiguous()
    z, state = sampler(x)
    if kind != 'dconv':  # its conv (zero-padded) is not an average
        torch.testing.assert_close(z, value.expand_as(z), rtol=1e-6, atol=1e-6)
    y = sampler.inverse(torch.ones_like(z) * 2.5, state, x)
    torch.testing.assert_close(y, torch.full_like(x, 2.5), rtol=1e-6, atol=1e-6)


def test_saliency_attracts_samples():
    """Mass on the left of the map pulls samples left: more of them read the salient region."""
    length, size = 28, 8
    logits = torch.zeros(1, 1, length, length)
    logits[..., :, :7] = 4.0
    _, dx, _, _ = adaptive_matrices(logits, size, 0.18, 0.5 / size, 0.5 / size)
    positions = (dx * pixel_centres(length, dx.device)).sum(-1)  # where each sample reads on average
    uniform = pixel_centres(size, dx.device)
    assert (positions[0] <= uniform + 1e-6).all()
    assert (positions[0] < 0.25).sum() > (uniform < 0.25).sum()


def test_large_logits_finite_outputs_and_gradients():
    sampler = AdaptiveSampler(8, 4, saliency_kernel=3)
    torch.nn.init.normal_(sampler.saliency.weight)
    with torch.no_grad():
        sampler.saliency.weight.mul_(1e4)
    x = torch.randn(2, 8, 14, 14, requires_grad=True)
    z, state = sampler(x)
    y = sampler.inverse(z * 2, state, x)
    assert torch.isfinite(z).all() and torch.isfinite(y).all()
    (y.square().mean() + z.mean()).backward()
    assert torch.isfinite(x.grad).all()
    assert torch.isfinite(sampler.saliency.weight.grad).all()
    assert torch.isfinite(sampler.saliency.bias.grad).all()


def test_gradient_reaches_saliency_conv():
    sampler = AdaptiveSampler(8, 4, saliency_kernel=1)  # zero-initialised, as in a fresh model
    x = torch.randn(2, 8, 14, 14)
    z, state = sampler(x)
    y = sampler.inverse(z.square(), state, x)
    y.sum().backward()
    assert sampler.saliency.weight.grad.abs().sum() > 0


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('channels_last', [True, False])
def test_saliency_logits_are_the_convs_values_and_gradients(dtype, channels_last):
    """The 1x1 saliency conv computed as a product over channels (channels-last maps) is the conv: same values,
    dtype and gradients, in float32 and under bfloat16 autocast."""
    sampler = AdaptiveSampler(24, 4)
    torch.nn.init.normal_(sampler.saliency.weight)
    torch.nn.init.normal_(sampler.saliency.bias)
    x = torch.randn(3, 24, 9, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x_conv = x.clone().requires_grad_()
    x = x.requires_grad_()
    grad = torch.randn(3, 1, 9, 7)
    results = []
    for inputs, logits_of in ((x, sampler.saliency_logits), (x_conv, sampler.saliency)):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            logits = logits_of(inputs)
        weight_grad, bias_grad, x_grad = torch.autograd.grad(
            logits, (sampler.saliency.weight, sampler.saliency.bias, inputs), grad.to(logits.dtype)
        )
        results.append((logits, weight_grad, bias_grad, x_grad))
    (logits, *grads), (conv_logits, *conv_grads) = results
    assert logits.shape == conv_logits.shape == (3, 1, 9, 7) and logits.dtype == conv_logits.dtype == dtype
    tol = dict(rtol=2e-2, atol=5e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, conv_logits, **tol)
    for got, want in zip(grads, conv_grads, strict=True):
        torch.testing.assert_close(got, want, **tol)


def test_saliency_conv_hooks_still_run():
    """A hook on the saliency conv fires: the product path is taken only where calling the conv runs no hook."""
    sampler = AdaptiveSampler(8, 4)
    torch.nn.init.normal_(sampler.saliency.weight)
    seen = []
    sampler.saliency.register_forward_hook(lambda module, args, out: seen.append(out))
    x = torch.randn(2, 8, 14, 14).contiguous(memory_format=torch.channels_last)
    logits = sampler.saliency_logits(x)
    assert len(seen) == 1 and torch.equal(seen[0], logits)


def _graph_holds(tensor, node_name):
    """Whether ``node_name`` is among the autograd nodes ``tensor``'s gradient passes through."""
    seen, todo = set(), [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == node_name:
            return True
        todo.extend(next_node for next_node, _ in node.next_functions)
    return False


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32, torch.bfloat16])
def test_saliency_gradient_added_into_the_way_downs_is_autograds(dtype, monkeypatch):
    """In training on a channels-last CPU map the saliency conv's gradient with respect to the map is added in place
    into the way down's: the map's and the conv's gradients are those of the plain graph (float64 and float32 to
    their rounding, bfloat16 autocast within its rounding)."""
    sampler = AdaptiveSampler(24, 4).to(torch.float64 if dtype == torch.float64 else torch.float32)
    torch.nn.init.normal_(sampler.saliency.weight)
    torch.nn.init.normal_(sampler.saliency.bias)
    x = torch.randn(3, 24, 13, 9, dtype=sampler.saliency.weight.dtype).contiguous(memory_format=torch.channels_last)
    grads = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(AdaptiveSampler, '_fuses_saliency_gradient', lambda self, x: False)
        inputs = x.clone().requires_grad_()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            z, state = sampler(inputs)
            out = sampler.inverse(z.square(), state, inputs)
        assert _graph_holds(z, '_SaliencyGradientIntoInputBackward') == fused
        params = (inputs, sampler.saliency.weight)
        grads.append(torch.autograd.grad(out.float().square().sum(), params))
    tol = dict(rtol=2e-2, atol=2e-2 * grads[1][0].abs().max().item()) if dtype == torch.bfloat16 else {}
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, **tol)


def test_saliency_gradient_is_fused_only_where_it_applies():
    """Eager training, a channels-last CPU map that the way down resamples, a 1x1 saliency conv without hooks."""
    sampler = AdaptiveSampler(8, 4)
    x = torch.randn(2, 8, 14, 14, requires_grad=True)
    assert sampler._fuses_saliency_gradient(x.contiguous(memory_format=torch.channels_last))
    assert not sampler._fuses_saliency_gradient(x)  # NCHW: the conv runs
    assert not sampler._fuses_saliency_gradient(x.detach().contiguous(memory_format=torch.channels_last))
    with torch.no_grad():
        assert not sampler._fuses_saliency_gradient(x.contiguous(memory_format=torch.channels_last))
    small = torch.randn(2, 8, 4, 4, requires_grad=True).contiguous(memory_format=torch.channels_last)
    assert not sampler._fuses_saliency_gradient(small)  # no axis sampled: the way down is the map itself
    assert not AdaptiveSampler(8, 4, saliency_kernel=3)._fuses_saliency_gradient(
        x.contiguous(memory_format=torch.channels_last)
    )
    sampler.saliency.register_forward_hook(lambda *args: None)
    assert not sampler._fuses_saliency_gradient(x.contiguous(memory_format=torch.channels_last))


@pytest.mark.parametrize('length,size', [(28, 16), (14, 8), (7, 4), (9, 2), (4, 3)])
def test_bilinear_matrices_match_interpolate(length, size):
    x = torch.randn(2, 3, length, length + 3)
    dy, dx, uy, ux = bilinear_matrices(x, size)
    ref_down = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False)
    torch.testing.assert_close(resample(x, dy, dx), ref_down, rtol=1e-5, atol=1e-5)
    z = torch.randn(2, 3, size, size)
    ref_up = F.interpolate(z, size=(length, length + 3), mode='bilinear', align_corners=False)
    torch.testing.assert_close(resample(z, uy, ux), ref_up, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kind', ['adaptive', 'uniform', 'bilinear'])
@pytest.mark.parametrize('height,width', [(4, 4), (3, 9), (1, 1)])
def test_axis_not_longer_than_size_is_left_alone(kind, height, width):
    sampler = create_sampler(kind, 5, 4)
    x = torch.randn(2, 5, height, width)
    z, state = sampler(x)
    assert z.shape[-2:] == (min(height, 4), min(width, 4))
    if height <= 4 and width <= 4:
        assert torch.equal(z, x)
        assert torch.equal(sampler.inverse(z, state, x), x)


def test_resample_channels_last_matches_contiguous():
    x = torch.randn(3, 16, 20, 12)
    dy, dx, uy, ux = uniform_matrices(x, 6, 1 / 12, 1 / 12)
    ref = resample(x, dy, dx)
    out = resample(x.contiguous(memory_format=torch.channels_last), dy, dx)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_resample_casts_matrices_to_input_dtype():
    x = torch.randn(2, 4, 10, 10, dtype=torch.bfloat16)
    dy, dx, _, _ = uniform_matrices(x, 5, 0.1, 0.1)
    assert dy.dtype == torch.float32
    out = resample(x, dy, dx)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), resample(x.float(), dy, dx), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize('kind', ['adaptive', 'uniform', 'bilinear'])
def test_sampler_takes_fp32_channels_last_under_autocast(kind):
    """Autocast hands a reusable sampler fp32 maps (e.g. a network's input): the fast path's products run in
    bf16 like ``torch.matmul``'s, and the fused residual end adds the fp32 residual as the reference does."""
    sampler = create_sampler(kind, 64, 8)
    if kind == 'adaptive':
        torch.nn.init.normal_(sampler.saliency.weight, std=0.2)
    x = torch.randn(2, 64, 28, 28).contiguous(memory_format=torch.channels_last)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        z, state = sampler(x)
        out = sampler.inverse_residual(z * 2, state, x, relu=True)
        z_ref, state_ref = sampler(x.contiguous())
        out_ref = sampler.inverse_residual(z_ref * 2, state_ref, x.contiguous(), relu=True)
    assert z.dtype == z_ref.dtype == torch.bfloat16 and out.dtype == out_ref.dtype == torch.float32
    torch.testing.assert_close(z.float(), z_ref.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, out_ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize('kind', ['adaptive', 'uniform'])
@pytest.mark.parametrize('length,size', [(112, 16), (56, 8), (28, 16), (14, 4)])
def test_sampling_weights_hold_no_subnormal_floats(kind, length, size):
    """Subnormal weights make every multiply an Intel microcode assist; the Gaussian tails would hold them."""
    sampler = create_sampler(kind, 8, size)
    if kind == 'adaptive':
        torch.nn.init.normal_(sampler.saliency.weight, std=2.0)
    tiny = torch.finfo(torch.float32).tiny
    for m in sampler.matrices(torch.randn(2, 8, length, length + 3)):
        assert not ((m != 0) & (m.abs() < tiny)).any()
        smallest = torch.where(m != 0, m, torch.inf).amin(-1)  # each row's smallest non-zero weight
        assert (smallest >= math.exp(-50) * m.amax(-1) * 0.99).all()  # so products with normal maps stay normal
        if m.shape[-1] != m.shape[-2]:  # Gaussian kernels: band-limited at KERNEL_WEIGHT_LOG (~6 sigma)
            assert (smallest >= math.exp(KERNEL_WEIGHT_LOG) * m.amax(-1) * 0.99).all()
    logits = -torch.linspace(0, 200, 400).square().view(1, 20, 20)  # tails from 1 down to exp(-40000)
    plain, tailless = torch.softmax(logits, -1), tailless_softmax(logits, -1)
    assert ((plain != 0) & (plain < tiny)).any()  # the case exists: plain softmax makes subnormals here
    assert not ((tailless != 0) & (tailless < tiny)).any()
    torch.testing.assert_close(tailless, plain, rtol=0, atol=1e-21)


@pytest.mark.parametrize('length,size', [(28, 16), (14, 8), (7, 4), (56, 5)])
def test_band_limited_kernels_change_results_by_less_than_1e_7(length, size):
    """The ~6 sigma cut (``KERNEL_WEIGHT_LOG``, as ``gaussian_matrices`` applies it) against plain softmax
    Gaussians at random positions, in float64 so that only the cut differs."""
    positions = torch.rand(3, size, dtype=torch.float64)
    centres = (torch.arange(length, dtype=torch.float64) + 0.5) / length
    logits = (positions.unsqueeze(-1) - centres).square() * (-0.5 / (0.5 / size) ** 2)  # (B, s, L)
    x = torch.rand(3, length, 64, dtype=torch.float64)
    y = torch.rand(3, size, 64, dtype=torch.float64)
    for dim, m in ((-1, x), (-2, y)):  # down: over pixels, applied to a map; up: over samples, applied to a result
        cut = tailless_softmax(logits, dim, smallest_weight_log=KERNEL_WEIGHT_LOG)
        plain = torch.softmax(logits, dim)
        assert (cut == 0).any()  # the cut did cut
        cut, plain = (cut, plain) if dim == -1 else (cut.transpose(-1, -2), plain.transpose(-1, -2))
        assert ((cut @ m - plain @ m).abs().max() / (plain @ m).abs().max()) < 1e-7


def test_saliency_softmax_in_float32_under_autocast():
    sampler = AdaptiveSampler(8, 4)
    x = torch.randn(2, 8, 14, 14)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        mats = sampler.matrices(x)
        z, _ = sampler(x)
    assert all(m.dtype == torch.float32 for m in mats)
    assert z.dtype == torch.bfloat16


def test_dconv_sampler_halves_and_restores():
    sampler = DConvSampler(6)
    x = torch.randn(2, 6, 27, 14)
    z, state = sampler(x)
    assert z.shape == (2, 6, 14, 7)
    assert sampler.inverse(z, state, x).shape == x.shape
    assert sum(p.numel() for p in sampler.parameters()) == 6 * 27


@pytest.mark.parametrize(
    'kwargs,match',
    [
        (dict(name='nearest', in_chs=4, size=4), "name must be one of 'adaptive'"),
        (dict(name='uniform', in_chs=4, size=0), 'size must be a positive int'),
        (dict(name='adaptive', in_chs=4, size=4, saliency_kernel=2), '^saliency_kernel must be a positive odd int'),
        (dict(name='adaptive', in_chs=4, size=4, sampler_args=dict(sigma_g=-1.0)), 'sigma_g must be a finite number'),
        (dict(name='adaptive', in_chs=4, size=4, sampler_args=dict(sigma_g=1e-20)), 'sigma_g must be a finite number'),
        (dict(name='adaptive', in_chs=4, size=4, sampler_args=dict(sigma_g=float('inf'))), 'sigma_g must be a finite'),
        (dict(name='uniform', in_chs=4, size=4, sampler_args=dict(sigma_down=float('nan'))), 'sigma_down must be a'),
        (dict(name='uniform', in_chs=4, size=4, sampler_args=dict(sigma_up=0.0)), 'sigma_up must be a finite number'),
        (dict(name='uniform', in_chs=4, size=None), 'size is required'),
    ],
)
def test_sampler_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_sampler(**kwargs)


def test_sampler_classes_are_what_create_sampler_builds():
    assert isinstance(create_sampler('adaptive', 4, 4), AdaptiveSampler)
    assert isinstance(create_sampler('uniform', 4, 4), UniformSampler)
    assert isinstance(create_sampler('bilinear', 4, 4), BilinearSampler)
    assert isinstance(create_sampler('dconv', 4, None), DConvSampler)


def test_saliency_gets_an_exact_zero_gradient_where_no_axis_is_sampled():
    """A 4x4 map with size 4 is left as it is: the loss does not depend on saliency, its gradient is zero (not None)."""
    sampler = AdaptiveSampler(8, 4)
    torch.nn.init.normal_(sampler.saliency.weight)
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    z, state = sampler(x)
    sampler.inverse(z.square(), state, x).sum().backward()
    assert torch.count_nonzero(sampler.saliency.weight.grad) == 0
    torch.testing.assert_close(x.grad, 2 * x.detach())


DEVICES = [
    'cpu',
    pytest.param('cuda', marks=pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device here')),
]


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('shape,n,m', [((2, 16, 20, 12), 6, 5), ((3, 8, 16, 16), 24, 24), ((1, 4, 7, 9), 7, 4)])
def test_channels_last_fast_path_matches_reference_values_and_gradients(shape, n, m, device, no_tf32):
    """The custom-autograd channels-last path against the reference (fp32, relative error <= 1e-5)."""
    x = torch.randn(*shape, device=device)
    my = torch.softmax(torch.randn(shape[0], n, shape[2], device=device), -1)
    mx = torch.softmax(torch.randn(shape[0], m, shape[3], device=device), -1)
    g = torch.randn(shape[0], shape[1], n, m, device=device)
    results = []
    for fast in (True, False):
        xi = x.contiguous(memory_format=torch.channels_last) if fast else x.clone()
        xi.requires_grad_()
        myi, mxi = my.clone().requires_grad_(), mx.clone().requires_grad_()
        out = resample(xi, myi, mxi) if fast else resample_reference(xi, myi, mxi)
        (out * g).sum().backward()
        results.append((out, xi.grad, myi.grad, mxi.grad))
        if fast:
            assert out.is_contiguous(memory_format=torch.channels_last)
            assert xi.grad.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(*results, strict=True):  # error relative to the tensor's scale (sums of many products)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('relu', [True, False])
@pytest.mark.parametrize('shape,n,m', [((2, 16, 6, 5), 20, 12), ((3, 8, 8, 8), 14, 14), ((2, 4, 7, 9), 7, 4)])
def test_channels_last_residual_path_matches_reference_values_and_gradients(shape, n, m, relu, device, no_tf32):
    """``relu(residual + resample(x))`` fused on channels-last maps against the reference, all four gradients."""
    x = torch.randn(*shape, device=device)
    my = torch.softmax(torch.randn(shape[0], n, shape[2], device=device), -1)
    mx = torch.softmax(torch.randn(shape[0], m, shape[3], device=device), -1)
    residual = torch.randn(shape[0], shape[1], n, m, device=device)
    g = torch.randn(shape[0], shape[1], n, m, device=device)
    results = []
    for fast in (True, False):
        layout = torch.channels_last if fast else torch.contiguous_format
        xi = x.contiguous(memory_format=layout).requires_grad_()
        ri = residual.contiguous(memory_format=layout).requires_grad_()
        myi, mxi = my.clone().requires_grad_(), mx.clone().requires_grad_()
        out = resample_residual(xi, myi, mxi, ri, relu)
        (out * g).sum().backward()
        results.append((out, xi.grad, myi.grad, mxi.grad, ri.grad))
        if fast:
            assert out.is_contiguous(memory_format=torch.channels_last) and out._base is None
            assert xi.grad.is_contiguous(memory_format=torch.channels_last)
    assert (results[0][0] == 0).any() == relu  # the ReLU did clip where it was asked to
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize('channels_last', [False, True])
def test_residual_of_the_wrong_shape_is_a_value_error(channels_last):
    """Even one with the right number of elements (H and W swapped), which a reshape would accept."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 4, 3, 3).contiguous(memory_format=layout)
    my, mx = torch.softmax(torch.randn(2, 6, 3), -1), torch.softmax(torch.randn(2, 5, 3), -1)
    residual = torch.randn(2, 4, 5, 6).contiguous(memory_format=layout)
    with pytest.raises(ValueError, match=r'residual must have the shape of the resampled map, \[2, 4, 6, 5\]'):
        resample_residual(x, my, mx, residual, True)


def test_channels_last_residual_path_bfloat16_within_bf16_tolerance():
    x = torch.randn(2, 8, 7, 7)
    my = torch.softmax(torch.randn(2, 14, 7), -1)
    mx = torch.softmax(torch.randn(2, 14, 7), -1)
    residual = torch.randn(2, 8, 14, 14)
    xb = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last).requires_grad_()
    rb = residual.to(torch.bfloat16).contiguous(memory_format=torch.channels_last).requires_grad_()
    out = resample_residual(xb, my, mx, rb, True)
    out.float().sum().backward()
    ref = torch.relu(residual + resample_reference(x, my, mx))
    assert out.dtype == torch.bfloat16 and xb.grad.dtype == torch.bfloat16 and rb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_residual_path_output_can_be_modified_in_place_under_autograd():
    """The fused output is a fresh tensor, not a view made inside the autograd function (with ``relu`` the
    output is saved for backward, so there, as after ``torch.relu``, autograd's version check forbids it)."""
    x = torch.randn(2, 4, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    my = torch.softmax(torch.randn(2, 6, 3), -1)
    residual = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    out = resample_residual(x, my, my, residual, False)
    out.mul_(2.0).square().sum().backward()
    expected = torch.autograd.grad((2.0 * (residual + resample_reference(x, my, my))).square().sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)


def test_channels_last_fast_path_bfloat16_within_bf16_tolerance():
    x = torch.randn(2, 8, 14, 14)
    my = torch.softmax(torch.randn(2, 8, 14), -1)
    mx = torch.softmax(torch.randn(2, 8, 14), -1)
    xb = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last).requires_grad_()
    out = resample(xb, my, mx)
    out.float().sum().backward()
    ref = resample_reference(x, my, mx)
    assert out.dtype == torch.bfloat16 and xb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_map_not_larger_than_size_skips_the_identity_products():
    sampler = AdaptiveSampler(8, 4)
    x = torch.randn(2, 8, 4, 3)
    with torch.no_grad():
        z, state = sampler(x)
        assert z is x and sampler.inverse(z, state, x) is z  # nothing computed on the map itself
    z, _ = sampler(x)
    assert torch.equal(z, x) and z.grad_fn is not None  # tied to the saliency for its (zero) gradient


@pytest.mark.parametrize(
    'shape,rows,cols', [((2, 5, 14, 14), 8, 8), ((2, 3, 7, 9), 4, 5), ((2, 4, 4, 3), 14, 6), ((2, 3, 7, 9), 4, 12)]
)
def test_nhwc_form_is_the_separable_products(shape, rows, cols):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, generator=generator)
    matrix_y = torch.rand(shape[0], rows, shape[2], dtype=torch.float64, generator=generator)
    matrix_x = torch.rand(shape[0], cols, shape[3], dtype=torch.float64, generator=generator)
    torch.testing.assert_close(
        resample_nhwc(x.permute(0, 2, 3, 1), matrix_y, matrix_x),
        resample_reference(x, matrix_y, matrix_x).permute(0, 2, 3, 1),
        rtol=1e-12,
        atol=1e-12,
    )


def _traced_kinds(traced: torch.jit.ScriptFunction) -> List[str]:
    return [n.kind() for n in traced.graph.nodes()]


@pytest.mark.parametrize('height,size', [(28, 16), (14, 8), (7, 4), (20, 8), (24, 12)])
@pytest.mark.parametrize('way', ['down', 'up'])
def test_export_records_small_maps_in_nhwc_order(height, size, way):
    """Tracing (what the TorchScript ONNX exporter does) records the resampling of a map of at most
    EXPORT_NHWC_MAX_POSITIONS positions in NHWC order (permutes around the products), of a larger map in NCHW order
    (no permute); values unchanged. The full-resolution map decides, on the way down and on the way up alike."""
    small, large = (height, size) if way == 'down' else (size, height)
    x = torch.randn(2, 6, small, small)
    matrix_y, matrix_x = torch.rand(2, large, small), torch.rand(2, large, small)
    nhwc = height * height <= EXPORT_NHWC_MAX_POSITIONS
    traced = torch.jit.trace(resample, (x, matrix_y, matrix_x))
    kinds = _traced_kinds(traced)
    assert kinds.count('aten::matmul') == 2
    assert kinds.count('aten::permute') == (2 if nhwc else 0)
    torch.testing.assert_close(traced(x, matrix_y, matrix_x), resample_reference(x, matrix_y, matrix_x))


@pytest.mark.parametrize('height,size', [(14, 8), (28, 16)])
@pytest.mark.parametrize('relu', [True, False])
def test_export_records_the_residual_add_in_the_order_of_the_products(height, size, relu):
    """On a small map the residual is permuted to NHWC and added there, so that the block's output leaves in that
    order (one permute back) and the next block's permute into it cancels; values unchanged."""
    y = torch.randn(2, 6, size, size)
    matrix_y, matrix_x = torch.rand(2, height, size), torch.rand(2, height, size)
    residual = torch.randn(2, 6, height, height)
    traced = torch.jit.trace(lambda *a: resample_residual(*a, relu), (y, matrix_y, matrix_x, residual))
    assert _traced_kinds(traced).count('aten::permute') == (3 if height * height <= EXPORT_NHWC_MAX_POSITIONS else 0)
    torch.testing.assert_close(
        traced(y, matrix_y, matrix_x, residual), add_residual(resample_reference(y, matrix_y, matrix_x), residual, relu)
    )


@pytest.mark.parametrize('height,width', [(5, 7), (28, 28), (14, 14)])
def test_export_records_the_saliency_conv_as_a_product_over_channels(height, width):
    """Tracing (what the TorchScript ONNX exporter does) records a product over the map's channels, which keeps
    ONNX Runtime from changing each block's input to its blocked layout for a one-channel conv; on the maps whose
    resampling it records in NHWC order it reads that order (a permute); values unchanged."""
    x, weight, bias = torch.randn(2, 6, height, width), torch.randn(1, 6, 1, 1), torch.randn(1)
    traced = torch.jit.trace(saliency_conv1x1, (x, weight, bias))
    kinds = _traced_kinds(traced)
    assert 'aten::matmul' in kinds and not any('convolution' in kind for kind in kinds)
    assert ('aten::permute' in kinds) == (height * width <= EXPORT_NHWC_MAX_POSITIONS)
    torch.testing.assert_close(traced(x, weight, bias), F.conv2d(x, weight, bias))


@pytest.mark.parametrize(
    'matrix_y,matrix_x,match',
    [
        (torch.rand(2, 4, 6), torch.rand(2, 4, 5), 'matrix_y must be'),
        (torch.rand(3, 4, 7), torch.rand(2, 4, 5), 'matrix_y must be'),
        (torch.rand(2, 4, 7), torch.rand(2, 4, 6), 'matrix_x must be'),
        (torch.rand(2, 4, 7), torch.rand(4, 5), 'matrix_x must be'),
    ],
)
def test_nhwc_form_names_the_matrix_that_does_not_fit(matrix_y, matrix_x, match):
    with pytest.raises(ValueError, match=match):
        resample_nhwc(torch.randn(2, 7, 5, 3), matrix_y, matrix_x)


def test_nhwc_form_names_a_map_that_is_not_nhwc():
    with pytest.raises(ValueError, match=r'x must be a \(B, H, W, C\) map; got shape \(7, 5, 3\)'):
        resample_nhwc(torch.randn(7, 5, 3), torch.rand(2, 4, 7), torch.rand(2, 4, 5))
