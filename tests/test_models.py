"""The timm contract for SSB models, beyond what timm's own test_models.py runs for outside modules."""

import math
import warnings

import pytest
import timm
import torch
from timm.models import create_feature_extractor

from ssb_reference import make_live, output_and_gradients
from timm_ssb.layers import AdaptiveSampler
from timm_ssb.models import baseline_of
from timm_ssb.models.ssb_resnet import SSBBottleneck

MODELS = [
    'ssb_resnet',
    'ssb_resnetd26',
    'ssb_resnetd50',
    'ssb_resnetd101',
    'ssb_resnetd152',
    'ssb_resnetrs50',
    'ssb_resnetrs101',
    'ssb_resnetrs152',
    'ssb_resnetrs200',
    'ssb_resnetrs270',
    'ssb_resnetrs350',
    'ssb_resnetrs420',
]
SAMPLERS = ['adaptive', 'uniform', 'bilinear', 'dconv']


# At 64x64 the maps of stages 2-4 are 8, 4 and 2 pixels: these sizes sample every SSB block, so the
# contract tests below run the sampling they are meant to check (default sizes would leave them as is).
SMALL = dict(ssb_sizes=(4, 2, 1))


def _ssb_blocks(model):
    return [m for m in model.modules() if isinstance(m, SSBBottleneck)]


def _create(name='ssb_resnetd50', seed=0, **kwargs):
    """A model with live SSB branches (non-trivial norms, non-zero saliency convs: in a fresh model every
    branch adds exactly zero and samples uniformly), the same weights per seed."""
    torch.manual_seed(seed)
    return make_live(timm.create_model(name, **{**SMALL, **kwargs}), seed)


def test_models_are_registered_once():
    assert timm.list_models('ssb_*') == MODELS
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        import importlib

        importlib.import_module('timm_ssb.models.ssb_resnet')  # a second import registers nothing
    assert timm.list_models('ssb_*') == MODELS
    for name in MODELS:
        assert timm.is_model(name)


@pytest.mark.parametrize('name', MODELS)
def test_ssb_in_every_stride1_block_of_stages_2_to_4(name):
    model = timm.create_model(name, device='meta')
    baseline = timm.create_model(baseline_of(name), device='meta')
    assert not any(isinstance(b, SSBBottleneck) for b in model.layer1)
    for stage, size in zip((model.layer2, model.layer3, model.layer4), (16, 8, 4), strict=True):
        assert not isinstance(stage[0], SSBBottleneck) and stage[0].downsample is not None
        assert all(isinstance(b, SSBBottleneck) and b.sampler.size == size for b in stage[1:])
    ssb_keys = {k: v.shape for k, v in model.state_dict().items() if '.sampler.' not in k}
    assert ssb_keys == {k: v.shape for k, v in baseline.state_dict().items()}


@pytest.mark.parametrize('name', MODELS)
def test_forward_backward(name):
    # at 128x128 the maps of stages 2-4 are 16, 8 and 4 pixels: sizes (8, 4, 2) sample every SSB block
    model = timm.create_model(name, num_classes=7, ssb_sizes=(8, 4, 2)).train()
    x = torch.randn(2, 3, 128, 128)
    out = model(x)
    assert out.shape == (2, 7)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize('sampler', SAMPLERS)
def test_samplers_build_and_run(sampler):
    model = timm.create_model('ssb_resnetd50', ssb_sampler=sampler, num_classes=10).eval()
    assert model.ssb_sampler == sampler
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 96)).shape == (1, 10)


def test_issue_example_kwargs():
    model = timm.create_model('ssb_resnetd152', ssb_sizes=(12, 6, 3), ssb_sampler='uniform', num_classes=10)
    assert model.ssb_sizes == (12, 6, 3)
    assert [b.sampler.size for b in _ssb_blocks(model)][:1] == [12]
    assert model.fc.out_features == 10


def test_zero_saliency_adaptive_model_equals_uniform_model_exactly():
    """Live branches (a fresh model's add zero), saliency convs at zero as in a fresh model."""
    torch.manual_seed(1)
    adaptive = make_live(timm.create_model('ssb_resnetd50', **SMALL), saliency_std=0.0).eval()
    for block in _ssb_blocks(adaptive):
        block.sampler.reset_saliency()
    uniform = timm.create_model('ssb_resnetd50', ssb_sampler='uniform', **SMALL).eval()
    missing, unexpected = uniform.load_state_dict(adaptive.state_dict(), strict=False)
    assert not missing and all('.sampler.saliency.' in k for k in unexpected)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(adaptive(x), uniform(x))


def test_kwargs_are_json_serialisable_and_round_trip():
    import json

    kwargs = dict(
        ssb_sizes=[20, 10, 5], ssb_sampler='adaptive', ssb_saliency_kernel=3, ssb_sampler_args={'sigma_g': 0.1}
    )
    model = timm.create_model('ssb_resnetd50', **json.loads(json.dumps(kwargs)))
    assert model.ssb_sizes == (20, 10, 5)
    assert model.ssb_saliency_kernel == 3
    blocks = _ssb_blocks(model)
    assert blocks[0].sampler.saliency.kernel_size == (3, 3) and blocks[0].sampler.sigma_g == 0.1


@pytest.mark.parametrize(
    'kwargs,match',
    [
        (dict(ssb_sampler='nearest'), "ssb_sampler must be one of 'adaptive', 'uniform', 'bilinear', 'dconv'"),
        (dict(ssb_sizes=(16, 8)), 'ssb_sizes must be three positive ints'),
        (dict(ssb_sizes=(16, 8, 4, 2)), 'ssb_sizes must be three positive ints'),
        (dict(ssb_sizes=(16, 0, 4)), 'ssb_sizes must be three positive ints'),
        (dict(ssb_sizes=(16, -8, 4)), 'ssb_sizes must be three positive ints'),
        (dict(ssb_sizes=(16.0, 8, 4)), 'ssb_sizes must be three positive ints'),
        (dict(ssb_sizes=16), 'ssb_sizes must be three positive ints'),
        (dict(ssb_saliency_kernel=2), r'ssb_saliency_kernel must be a positive odd int \(1, 3, 5, ...\)'),
        (dict(ssb_saliency_kernel=0), 'ssb_saliency_kernel must be a positive odd int'),
        (dict(ssb_saliency_kernel=-3), 'ssb_saliency_kernel must be a positive odd int'),
        (dict(ssb_saliency_kernel=3.0), 'ssb_saliency_kernel must be a positive odd int'),
        (dict(ssb_sampler='uniform', ssb_saliency_kernel=3), "applies to ssb_sampler='adaptive' only"),
        (dict(ssb_sampler='dconv', ssb_sizes=(14, 7, 4)), "ssb_sizes does not apply to ssb_sampler='dconv'"),
        (dict(ssb_sampler_args=[0.1]), 'ssb_sampler_args must be a dict'),
        (dict(ssb_sampler_args={'sigma_g': 1e-20}), r"ssb_sampler_args \{'sigma_g': 1e-20\} do not fit .*sigma_g must"),
        (dict(ssb_sampler_args={'sigma_g': float('inf')}), 'sigma_g must be a finite number'),
        (dict(ssb_sampler_args={'sigma_d': 0.1}), "do not fit ssb_sampler='adaptive'.*sigma_d"),
        (dict(ssb_sampler='bilinear', ssb_sampler_args={'sigma_g': 0.1}), "do not fit ssb_sampler='bilinear'"),
    ],
)
def test_bad_ssb_arguments_raise_value_error_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model('ssb_resnetd50', device='meta', **kwargs)


def test_unknown_kwarg_is_type_error():
    with pytest.raises(TypeError):
        timm.create_model('ssb_resnetd50', device='meta', ssb_size=(16, 8, 4))


def test_pretrained_cfg():
    for name in MODELS:
        cfg = timm.get_pretrained_cfg(name).to_dict()
        assert cfg['input_size'] == (3, 224, 224) and cfg['pool_size'] == (7, 7)
        assert cfg['first_conv'] == 'conv1.0' and cfg['classifier'] == 'fc'
        assert cfg['paper_ids'] == 'arXiv:2207.11511'
        assert cfg['license'] == 'apache-2.0'
        assert cfg['mean'] == timm.data.IMAGENET_DEFAULT_MEAN and cfg['crop_pct'] == 0.875
        model = timm.create_model(name, device='meta')
        assert dict(model.get_submodule(cfg['first_conv']).named_parameters())['weight'].shape[1] == 3
        assert model.get_classifier() is model.get_submodule(cfg['classifier'])


@pytest.mark.parametrize('size', [(32, 32), (33, 47), (64, 64), (97, 130), (224, 224), (300, 200), (512, 512)])
def test_any_input_size(size):
    model = timm.create_model('ssb_resnetd50', num_classes=5).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 5) and torch.isfinite(out).all()


def test_tiny_input_is_exactly_the_baseline():
    """At 32x32 every map of stages 2-4 is 4x4 or smaller than its size: SSB blocks compute a plain bottleneck."""
    torch.manual_seed(3)
    ssb = make_live(timm.create_model('ssb_resnetd50')).eval()
    base = timm.create_model('resnet50d').eval()
    base.load_state_dict({k: v for k, v in ssb.state_dict().items() if '.sampler.' not in k})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ssb(x), base(x), rtol=1e-5, atol=1e-5)


def test_batch_size_one_eval_matches_batched():
    model = _create().eval()
    x = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        batched = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(single, batched, rtol=1e-4, atol=1e-4)


def test_features_only_list_and_dict():
    x = torch.randn(2, 3, 96, 64)
    model = _create(features_only=True, out_indices=(1, 2, 3, 4)).eval()
    with torch.no_grad():
        feats = model(x)
    assert [f.shape[1] for f in feats] == model.feature_info.channels() == [256, 512, 1024, 2048]
    assert [tuple(f.shape[-2:]) for f in feats] == [(96 // r, 64 // r) for r in model.feature_info.reduction()]
    dict_model = _create(features_only=True, out_indices=(1, 2, 3, 4), feature_cls='dict').eval()
    with torch.no_grad():
        out = dict_model(x)
    assert len(out) == 4
    assert all(torch.equal(a, b) for a, b in zip(feats, out.values(), strict=True))


@pytest.mark.parametrize('feature_cls', ['hook', 'getter', 'fx'])
def test_features_only_forms_equal_the_default(feature_cls):
    x = torch.randn(2, 3, 64, 64)
    ref = _create('ssb_resnetrs152', features_only=True, out_indices=(1, 2, 3, 4)).eval()
    other = _create('ssb_resnetrs152', features_only=True, out_indices=(1, 2, 3, 4), feature_cls=feature_cls).eval()
    with torch.no_grad():
        a, b = ref(x), other(x)
    b = list(b.values()) if isinstance(b, dict) else b
    assert len(a) == len(b) == 4
    for fa, fb in zip(a, b, strict=True):
        assert torch.equal(fa, fb)


def test_forward_intermediates_equal_forward_features():
    model = _create().eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert len(inter) == 5
        assert [f.shape[1] for f in inter] == [64, 256, 512, 1024, 2048]
        only = model.forward_intermediates(x, indices=(2, 3), intermediates_only=True, stop_early=True)
        assert all(torch.equal(a, b) for a, b in zip(only, inter[2:4], strict=True))
        model.set_grad_checkpointing(True)
        final_ckpt, _ = model.forward_intermediates(x)
        torch.testing.assert_close(final_ckpt, final)


def test_prune_intermediate_layers():
    model = _create().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _, full = model.forward_intermediates(x)
        kept = model.prune_intermediate_layers(indices=(1, 2), prune_head=True)
        assert kept == [1, 2]
        pruned = model.forward_intermediates(x, indices=(1, 2), intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(pruned, full[1:3], strict=True))
    assert len(model.layer3) == 0 and len(model.layer4) == 0


def test_grad_checkpointing_identical_outputs_and_grads():
    x = torch.randn(2, 3, 64, 64)
    results = []
    for ckpt in (False, True):
        model = _create(drop_path_rate=0.0).train()
        model.set_grad_checkpointing(ckpt)
        out = model(x)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    for g0, g1 in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(g1, g0)


def test_features_only_grad_checkpointing_backward():
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for ckpt in (False, True):
        model = _create(features_only=True).train()
        model.set_grad_checkpointing(ckpt)
        sum(f.pow(2).mean() for f in model(x)).backward()
        grads.append([p.grad for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for g0, g1 in zip(*grads, strict=True):
        torch.testing.assert_close(g1, g0)


def test_reset_classifier():
    model = timm.create_model('ssb_resnetd50').eval()
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2048)
    model.reset_classifier(4, 'max')
    assert model.global_pool.pool_type == 'max'


@pytest.mark.parametrize('sampler', SAMPLERS)
def test_torchscript(sampler):
    model = _create(ssb_sampler=sampler, **({} if sampler != 'dconv' else {'ssb_sizes': None})).eval()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 80, 64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('sampler', SAMPLERS)
def test_fx_feature_extraction_exactly_equals_eager(sampler):
    model = _create(ssb_sampler=sampler, **({} if sampler != 'dconv' else {'ssb_sizes': None})).eval()
    extractor = create_feature_extractor(model, return_nodes={'layer3': 'l3', 'layer4': 'l4', 'fc': 'logits'})
    x = torch.randn(2, 3, 96, 72)
    with torch.no_grad():
        out = extractor(x)
        assert torch.equal(out['logits'], model(x))
        _, inter = model.forward_intermediates(x)
    assert torch.equal(out['l3'], inter[3]) and torch.equal(out['l4'], inter[4])


def test_meta_device_creation():
    model = timm.create_model('ssb_resnetrs152', device='meta')
    assert all(p.is_meta for p in model.parameters())
    out = model(torch.empty(2, 3, 224, 224, device='meta'))
    assert out.shape == (2, 1000)
    model.to_empty(device='cpu')
    model.init_weights()
    saliency = [b.sampler.saliency for b in _ssb_blocks(model)]
    assert all(torch.count_nonzero(s.weight) == 0 and torch.count_nonzero(s.bias) == 0 for s in saliency)


def test_fresh_model_saliency_is_zero():
    model = timm.create_model('ssb_resnetd50')
    assert all(torch.count_nonzero(b.sampler.saliency.weight) == 0 for b in _ssb_blocks(model))


@pytest.mark.parametrize('channels_last', [False, True])
def test_bfloat16_model_and_autocast(channels_last):
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = _create().eval().to(memory_format=layout)
    x = torch.randn(2, 3, 96, 96).contiguous(memory_format=layout)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            amp = model(x)
        model_bf16 = model.to(torch.bfloat16)
        pure = model_bf16(x.to(torch.bfloat16))
    assert pure.dtype == torch.bfloat16 and amp.dtype == torch.bfloat16
    for out in (amp, pure):
        assert torch.isfinite(out).all()
        cos = torch.nn.functional.cosine_similarity(out.float().flatten(), ref.flatten(), dim=0)
        assert cos > 0.99


def test_autocast_channels_last_training_step():
    """bf16 autocast on the channels-last fast paths (products written into preallocated outputs)."""
    model = _create(num_classes=4).train().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_training_gradients_with_the_saliency_gradient_fused_are_autograds(monkeypatch):
    """A live model's training gradients (input and every parameter) with each saliency conv's map gradient added
    into its way down's in place are those of the plain graph. 160 x 160: every SSB block samples with the default
    sizes. In float64: with stage 4's convs as products, float32 rounding alone moved a saliency bias's gradient of
    ~3e-6 by 1e-5."""
    model = make_live(timm.create_model('ssb_resnetd50', num_classes=4)).train().double()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 160, 160, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    fusing = AdaptiveSampler._forward_fusing_saliency_gradient
    calls = []

    def counted(sampler, inputs):
        calls.append(sampler)
        return fusing(sampler, inputs)

    monkeypatch.setattr(AdaptiveSampler, '_forward_fusing_saliency_gradient', counted)
    fused = output_and_gradients(model, x)
    monkeypatch.setattr(AdaptiveSampler, '_fuses_saliency_gradient', lambda self, x: False)
    plain = output_and_gradients(model, x)
    assert len(calls) == len(_ssb_blocks(model)) == 10  # every SSB block fused, once
    for got, want in zip(fused, plain, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * max(1.0, want.abs().max().item()))


def test_channels_last_matches_contiguous():
    model = _create().eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('sampler', SAMPLERS)
def test_torch_compile_fullgraph_no_graph_breaks(sampler):
    model = _create(ssb_sampler=sampler, **({} if sampler != 'dconv' else {'ssb_sizes': None})).eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend='eager')
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.slow
def test_torch_compile_inductor_eval_and_train_step():
    """Inductor against eager with live branches. Training normalises with batch statistics, which amplify
    rounding where maps are small (at 64 x 64 with sizes (4, 2, 1) layer4's branch sees 1 x 1 maps, two values
    a channel at batch 2, and the outputs differ by 0.4 in fp32): hence 128 x 128, sizes (8, 4, 2), batch 4."""
    x = torch.randn(2, 3, 64, 64)
    model = _create(num_classes=4).eval()
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), rtol=1e-4, atol=1e-4)
    sizes = dict(ssb_sizes=(8, 4, 2))
    model, ref = _create(num_classes=4, **sizes).train(), _create(num_classes=4, **sizes).train()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 3, 128, 128)
    weights = torch.randn(4, 4)
    out = compiled(x)
    (out * weights).sum().backward()
    expected = ref(x)
    (expected * weights).sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)
    floor = 1e-2 * max(q.grad.norm().item() for q in ref.parameters())
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        error = (p.grad - q.grad).norm().item() / max(q.grad.norm().item(), floor)
        assert error < 0.1, f'gradient of {name}: relative error {error:.3g}'


@pytest.mark.parametrize('output_stride', [8, 16])
def test_output_stride(output_stride):
    model = _create(output_stride=output_stride, features_only=True).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape[-2:]) for f in feats] == [
        (math.ceil(64 / r), math.ceil(96 / r)) for r in model.feature_info.reduction()
    ]


def test_torch_compile_fullgraph_channels_last_training_step(monkeypatch):
    """The channels-last fast path (a custom autograd function) compiles without graph breaks, forward and backward.
    Compiled, the saliency conv's map gradient is not added in place into the way down's, and the convs of maps of a
    few positions are convs: the eager step it is checked against does the same (the two forms agree to float64
    rounding; with batch statistics over a 2 x 2 map, float32 rounding differences grow past this test's
    tolerance)."""
    model = _create(num_classes=4).train().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend='eager')
    out = compiled(x)
    out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    monkeypatch.setattr(AdaptiveSampler, '_fuses_saliency_gradient', lambda self, x: False)
    monkeypatch.setattr(SSBBottleneck, '_convs_as_products', lambda self, z: False)
    expected = model(x)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize('channels_last', [False, True])
def test_block_fused_end_equals_act_of_shortcut_plus_inverse(channels_last):
    """An SSB block ends with the sampler's fused ``relu(shortcut + inverse(branch))``; values and gradients
    equal the unfused expression."""
    block = _ssb_blocks(_create().train())[0]
    layout = torch.channels_last if channels_last else torch.contiguous_format
    block = block.to(memory_format=layout)
    x = torch.randn(2, block.conv1.in_channels, 16, 16).contiguous(memory_format=layout).requires_grad_()

    def unfused(x):
        z, state = block.sampler(x)
        return torch.relu(x + block.sampler.inverse(block.residual_branch(z), state, x))

    assert isinstance(block.act3, torch.nn.ReLU)
    outs, grads = [], []
    for fn in (block, unfused):
        out = fn(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out)
        grads.append([x.grad.clone()] + [p.grad.clone() for p in block.parameters()])
        x.grad = None
        block.zero_grad()
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_non_relu_activation_and_drop_path_take_the_unfused_end():
    x = torch.randn(2, 3, 64, 64)
    silu = _create(act_layer='silu').eval()
    assert all(isinstance(b.act3, torch.nn.SiLU) for b in _ssb_blocks(silu))
    with torch.no_grad():
        assert torch.isfinite(silu(x)).all()
    # an activation swapped in after construction is honoured, not silently replaced by the fused ReLU
    block = _ssb_blocks(_create().eval())[0]
    block.act3 = torch.nn.GELU()
    xb = torch.randn(2, block.conv1.in_channels, 16, 16)
    with torch.no_grad():
        z, state = block.sampler(xb)
        expected = torch.nn.functional.gelu(xb + block.sampler.inverse(block.residual_branch(z), state, xb))
        torch.testing.assert_close(block(xb), expected, rtol=1e-5, atol=1e-5)
    # training with drop path takes the unfused end; at drop probability 0 it must equal the fused one
    fused, unfused = _create().train(), _create(drop_path_rate=0.2).train()
    assert [b for b in _ssb_blocks(unfused) if b.drop_path is not None]
    for m in unfused.modules():  # every block's, plain ones too: with live branches they all count
        if hasattr(m, 'drop_prob'):
            m.drop_prob = 0.0
    torch.testing.assert_close(unfused(x), fused(x), rtol=1e-5, atol=1e-5)
    unfused(x).sum().backward()


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device here')


@needs_cuda
def test_cuda_forward_backward_without_host_syncs():
    """CUDA-graph friendliness, first half: no op of a training step waits for the device."""
    model = _create(num_classes=4).cuda().train().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 96, 96, device='cuda').contiguous(memory_format=torch.channels_last)
    model(x).sum().backward()  # warm up (lazy initialisation may synchronise)
    torch.cuda.set_sync_debug_mode('error')
    try:
        with torch.autocast('cuda', dtype=torch.bfloat16):
            out = model(x)
        out.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode('default')


@needs_cuda
def test_cuda_graph_capture_replays_eval_forward():
    """CUDA-graph friendliness, second half: the eval forward captures and replays to the eager result."""
    model = _create().cuda().eval().to(memory_format=torch.channels_last)
    static_x = torch.randn(2, 3, 96, 96, device='cuda').contiguous(memory_format=torch.channels_last)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(2):
            model(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = model(static_x)
    new_x = torch.randn_like(static_x)
    static_x.copy_(new_x)
    graph.replay()
    with torch.no_grad():
        expected = model(new_x)
    torch.testing.assert_close(static_out, expected, rtol=1e-4, atol=1e-4)


@needs_cuda
def test_cuda_compiled_reduce_overhead_replays_to_eager():
    """torch.compile(mode='reduce-overhead') captures the compiled eval forward in CUDA graphs (no host sync may
    break the capture, no autotuning inside it) and replays it to the eager result, on new inputs too."""
    model = _create().cuda().eval().to(memory_format=torch.channels_last)
    torch._dynamo.reset()
    compiled = torch.compile(model, mode='reduce-overhead', fullgraph=True)
    with torch.no_grad():
        for _ in range(3):  # record, then replay
            x = torch.randn(2, 3, 96, 96, device='cuda').contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(compiled(x).clone(), model(x), rtol=1e-3, atol=1e-3)
