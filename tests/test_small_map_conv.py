"""Convolutions on maps of a few positions as matrix products: the maths, the rule, and the model's use of them."""

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_ssb.models.ssb_resnet as ssb_resnet
from ssb_reference import make_live, output_and_gradients
from timm_ssb.layers.small_map_conv import SMALL_MAP_POSITIONS, conv2d_as_product, convs_run_as_products
from timm_ssb.models.ssb_resnet import SSBBottleneck


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize('kernel', [1, 3])
@pytest.mark.parametrize('weight_layout', ['contiguous', 'channels_last'])
@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('size', [(4, 4), (3, 5), (1, 1)])
def test_conv2d_as_product_equals_conv2d_values_and_gradients(kernel, weight_layout, bias, size):
    x = _channels_last(torch.randn(3, 6, *size, dtype=torch.float64)).requires_grad_()
    weight = torch.randn(5, 6, kernel, kernel, dtype=torch.float64)
    if weight_layout == 'channels_last':
        weight = _channels_last(weight)
    weight.requires_grad_()
    b = torch.randn(5, dtype=torch.float64, requires_grad=True) if bias else None
    grad_out = torch.randn(3, 5, *size, dtype=torch.float64)
    results = []
    for fn in (conv2d_as_product, lambda x, w, b: F.conv2d(x, w, b, padding=kernel // 2)):
        out = fn(x, weight, b)
        grads = torch.autograd.grad(out, [x, weight] + ([b] if bias else []), grad_out)
        results.append((out, grads))
    (out, grads), (want, want_grads) = results
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, want)
    for got, expected in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize('kernel', [1, 3])
def test_conv2d_as_product_under_autocast_has_the_convs_dtype(kernel):
    x = _channels_last(torch.randn(2, 16, 4, 4))
    weight = torch.randn(8, 16, kernel, kernel) / 4
    with torch.autocast('cpu', torch.bfloat16):
        out = conv2d_as_product(x, weight, None)
        want = F.conv2d(x, weight, padding=kernel // 2)
    assert out.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_conv2d_as_product_names_what_it_refuses():
    with pytest.raises(ValueError, match='weight must be 1x1 or 3x3, got 5x5'):
        conv2d_as_product(torch.randn(1, 2, 4, 4), torch.randn(2, 2, 5, 5), None)
    with pytest.raises(ValueError, match='x and weight must be 4-D.*got 3-D and 4-D'):
        conv2d_as_product(torch.randn(2, 4, 4), torch.randn(2, 2, 1, 1), None)


def _conv(**kwargs) -> nn.Conv2d:
    return nn.Conv2d(8, 8, **{'kernel_size': 3, 'padding': 1, 'bias': False, **kwargs})


SMALL_MAP = _channels_last(torch.randn(2, 8, 4, 4))


def test_the_rule_takes_small_channels_last_cpu_maps_and_plain_convs():
    assert SMALL_MAP_POSITIONS == 25
    assert convs_run_as_products([_conv(), _conv(kernel_size=1, padding=0)], SMALL_MAP)
    assert convs_run_as_products([_conv()], _channels_last(torch.randn(2, 8, 5, 5)))
    assert convs_run_as_products([_conv()], _channels_last(torch.randn(2, 8, 2, 12)))  # 24 positions, any shape


def test_the_rule_reads_its_threshold_at_each_call(monkeypatch):
    """Setting ``SMALL_MAP_POSITIONS`` to 0 (the documented switch) calls the convs everywhere."""
    from timm_ssb.layers import small_map_conv

    monkeypatch.setattr(small_map_conv, 'SMALL_MAP_POSITIONS', 0)
    assert not convs_run_as_products([_conv()], SMALL_MAP)


@pytest.mark.parametrize(
    'conv',
    [
        _conv(stride=2),
        _conv(groups=2),
        _conv(dilation=2, padding=2),
        _conv(padding=0),
        _conv(kernel_size=5, padding=2),
        _conv(padding_mode='reflect'),
    ],
    ids=['stride', 'groups', 'dilation', 'padding', 'kernel', 'padding_mode'],
)
def test_the_rule_calls_other_convs(conv):
    assert not convs_run_as_products([_conv(), conv], SMALL_MAP)


def test_the_rule_calls_conv_subclasses_and_hooked_convs():
    class MyConv(nn.Conv2d):
        pass

    assert not convs_run_as_products([MyConv(8, 8, 3, padding=1)], SMALL_MAP)
    hooked = _conv()
    handle = hooked.register_forward_pre_hook(lambda m, args: None)
    assert not convs_run_as_products([hooked], SMALL_MAP)
    handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda m, args, out: None)
    try:
        assert not convs_run_as_products([_conv()], SMALL_MAP)
    finally:
        handle.remove()


def test_the_rule_calls_the_convs_on_larger_or_nchw_maps_and_in_traces():
    conv = _conv()
    assert not convs_run_as_products([conv], _channels_last(torch.randn(2, 8, 2, 13)))
    assert not convs_run_as_products([conv], torch.randn(2, 8, 4, 4))
    assert not convs_run_as_products([conv], torch.randn(2, 8, 1, 1))  # both layouts at once: NCHW's user

    def traced(x):
        assert not convs_run_as_products([conv], x)
        return x

    torch.jit.trace(traced, SMALL_MAP, check_trace=False)


def _ssb_model(**kwargs):
    torch.manual_seed(0)
    model = make_live(timm.create_model('ssb_resnetd50', num_classes=4, **kwargs))
    return model.to(memory_format=torch.channels_last)


def _count_products(monkeypatch) -> list:
    calls = []

    def counted(x, weight, bias):
        calls.append(tuple(x.shape[-2:]))
        return conv2d_as_product(x, weight, bias)

    monkeypatch.setattr(ssb_resnet, 'conv2d_as_product', counted)
    return calls


@pytest.mark.parametrize('train', [False, True])
def test_model_runs_stage_4_convs_as_products_with_the_convs_values_and_gradients(monkeypatch, train):
    """At 160 x 160 the default sizes sample stage 4's 5 x 5 map to 4 x 4 (stages 2 and 3 to 16 and 8): the three
    convs of each of its two SSB blocks run as products, and the model's outputs and gradients are the convs' (in
    float64, so that the two summation orders agree to rounding)."""
    model = _ssb_model().double().train(train)
    x = _channels_last(torch.randn(2, 3, 160, 160, dtype=torch.float64))
    calls = _count_products(monkeypatch)
    as_products = output_and_gradients(model, x)
    monkeypatch.setattr(SSBBottleneck, '_convs_as_products', lambda self, z: False)
    as_convs = output_and_gradients(model, x)
    assert calls == [(4, 4)] * 6
    for got, want in zip(as_products, as_convs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * max(1.0, want.abs().max().item()))


def test_model_calls_a_hooked_conv(monkeypatch):
    model = _ssb_model().eval()
    block = model.layer4[1]
    seen = []
    block.conv2.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    calls = _count_products(monkeypatch)
    with torch.no_grad():
        model(_channels_last(torch.randn(1, 3, 160, 160)))
    assert seen == [torch.Size([1, 512, 4, 4])]
    assert len(calls) == 3  # the other SSB block of stage 4 only


def test_model_takes_the_products_on_small_maps_only(monkeypatch):
    """``ssb_sizes`` are absolute: at 224 x 224 stage 4's branches run on 4 x 4 maps as at 160 x 160; with a
    sampled side of 6 there (36 positions) every conv is called."""
    x = _channels_last(torch.randn(1, 3, 224, 224))
    calls = _count_products(monkeypatch)
    with torch.no_grad():
        _ssb_model().eval()(x)
        assert calls == [(4, 4)] * 6
        calls.clear()
        _ssb_model(ssb_sizes=(16, 8, 6)).eval()(x)
    assert calls == []
