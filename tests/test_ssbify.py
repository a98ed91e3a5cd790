"""``ssbify`` and the ``ssb_resnet`` model: any timm bottleneck ResNet, with its weights, to its SSB version."""

import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from ssb_reference import make_live
from test_hub import hub_cache, lay_out_repo  # noqa: F401  (hub_cache is a fixture)
from timm_ssb import SSBResNet, ssbify
from timm_ssb.layers import AdaptiveSampler
from timm_ssb.models.ssb_resnet import SSBBottleneck

SAMPLERS = ['adaptive', 'uniform', 'bilinear', 'dconv']
SMALL_SIZES = (4, 2, 1)  # at 64x64 the maps of stages 2-4 are 8, 4, 2: every SSB block samples
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def _sizes(sampler):
    return None if sampler == 'dconv' else SMALL_SIZES


def _ssb_blocks(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SSBBottleneck)}


def _outputs_and_grads(model, train):
    model.train(train)
    model.zero_grad()
    out = model(X)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
@pytest.mark.parametrize('sampler', SAMPLERS)
def test_ssbify_resnet50d_equals_ssb_resnetd50(sampler, train):
    """Same tensors under the same names, and the same outputs and gradients with the same (live) weights."""
    kwargs = dict(ssb_sampler=sampler) if sampler == 'dconv' else dict(ssb_sampler=sampler, ssb_sizes=SMALL_SIZES)
    built = make_live(timm.create_model('ssb_resnetd50', **kwargs), seed=1)
    source = timm.create_model('resnet50d')
    source.load_state_dict({k: v for k, v in built.state_dict().items() if '.sampler.' not in k})  # strict
    converted = ssbify(source, sizes=_sizes(sampler), sampler=sampler)
    assert list(converted.state_dict()) == list(built.state_dict())
    converted.load_state_dict(built.state_dict())  # the sampler tensors too (dconv's are random at init)
    assert {n: type(b.sampler) for n, b in _ssb_blocks(converted).items()} == {
        n: type(b.sampler) for n, b in _ssb_blocks(built).items()
    }
    out, grads = _outputs_and_grads(converted, train)
    ref_out, ref_grads = _outputs_and_grads(built, train)
    assert torch.equal(out, ref_out)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        assert torch.equal(grads[k], ref_grads[k]), k
    resnet = make_live(timm.create_model('resnet50d'), seed=1).train(train)
    assert (resnet(X) - out).abs().max() > 1e-2  # the sampling is live: it is not the plain ResNet


def test_ssbify_keeps_every_tensor_and_leaves_the_source_unless_inplace():
    torch.manual_seed(0)
    source = make_live(timm.create_model('resnet26d'), seed=2)
    before = {k: v.clone() for k, v in source.state_dict().items()}
    converted = ssbify(source, sizes=SMALL_SIZES)
    assert converted is not source and type(converted) is type(source)
    assert not _ssb_blocks(source)
    for k, v in source.state_dict().items():
        assert torch.equal(v, before[k])
    state = converted.state_dict()
    assert {k for k in state if '.sampler.' not in k} == set(before)
    for k, v in before.items():
        assert torch.equal(state[k], v), k
    assert state['layer2.1.conv1.weight'].data_ptr() != source.state_dict()['layer2.1.conv1.weight'].data_ptr()
    assert sorted(_ssb_blocks(converted)) == ['layer2.1', 'layer3.1', 'layer4.1']
    assert converted.pretrained_cfg == source.pretrained_cfg
    assert (converted.ssb_sizes, converted.ssb_sampler, converted.ssb_saliency_kernel) == (SMALL_SIZES, 'adaptive', 1)

    inplace = ssbify(source, sizes=SMALL_SIZES, inplace=True)
    assert inplace is source and sorted(_ssb_blocks(source)) == ['layer2.1', 'layer3.1', 'layer4.1']
    for k, v in before.items():
        assert torch.equal(source.state_dict()[k], v), k


def test_converted_saliency_is_zero_so_it_starts_as_uniform_sampling():
    torch.manual_seed(0)
    source = make_live(timm.create_model('resnet26d'), seed=2).eval()
    adaptive = ssbify(source, sizes=SMALL_SIZES)
    samplers = [m for m in adaptive.modules() if isinstance(m, AdaptiveSampler)]
    assert len(samplers) == 3
    assert all(not s.saliency.weight.any() and not s.saliency.bias.any() for s in samplers)
    uniform = ssbify(source, sizes=SMALL_SIZES, sampler='uniform')
    with torch.no_grad():
        assert torch.equal(adaptive(X), uniform(X))
        assert (adaptive(X) - source(X)).abs().max() > 1e-2


@pytest.mark.parametrize('name', ['resnext50_32x4d', 'seresnext26d_32x4d', 'ecaresnet26t', 'resnetrs50'])
def test_resnext_se_and_eca_resnets_convert_and_train(name):
    torch.manual_seed(0)
    source = timm.create_model(name, num_classes=5, drop_path_rate=0.1)
    model = make_live(ssbify(source, sizes=SMALL_SIZES, sampler_args=dict(sigma_g=0.2)), seed=3).train()
    blocks = _ssb_blocks(model)
    assert len(blocks) == sum(len(getattr(model, s)) - 1 for s in ('layer2', 'layer3', 'layer4'))
    for block in blocks.values():
        assert block.sampler.sigma_g == 0.2
    if name != 'resnext50_32x4d':
        assert all(block.se is not None for block in blocks.values())
    assert next(iter(blocks.values())).conv2.groups == source.layer2[1].conv2.groups
    out = model(X)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(b.sampler.saliency.weight.grad.abs().sum() > 0 for b in blocks.values())


def test_converted_model_keeps_device_dtype_mode_and_scripts():
    model = ssbify(timm.create_model('resnet26d', device='meta'))
    assert all(p.device.type == 'meta' for p in model.parameters())
    model = ssbify(timm.create_model('resnet26d').to(torch.bfloat16).eval(), sizes=SMALL_SIZES)
    saliency = model.layer2[1].sampler.saliency
    assert saliency.weight.dtype == torch.bfloat16 and not model.layer2[1].training
    with torch.no_grad():
        assert model(X.bfloat16()).dtype == torch.bfloat16
    eager = make_live(ssbify(timm.create_model('resnet26d'), sizes=SMALL_SIZES), 0).eval()
    scripted = torch.jit.script(eager)
    with torch.no_grad():
        torch.testing.assert_close(scripted(X), eager(X))


def _stride_in_conv1(model):
    model.layer3[1].conv1.stride = (2, 2)
    return model


def _anti_aliased_block(model):
    model.layer3[1].aa = torch.nn.AvgPool2d(3, stride=1, padding=1)
    return model


def _strided_block(model):
    model.layer3[1].stride = 2
    return model


@pytest.mark.parametrize(
    'make,match',
    [
        (lambda: timm.create_model('resnet18'), r'layer1\.0 is a BasicBlock .*resnet18/34'),
        (lambda: timm.create_model('vit_tiny_patch16_224'), 'converts timm ResNet models .*got a VisionTransformer'),
        (lambda: timm.create_model('resnet26d', features_only=True), 'features_only wrapper: convert the model first'),
        (lambda: timm.create_model('ssb_resnetd26'), r'already SSB \(layer2\.1 is an SSBBottleneck\)'),
        (lambda: ssbify(timm.create_model('resnet26d')), r'already SSB \(layer2\.1'),
        (
            lambda: _stride_in_conv1(timm.create_model('resnet26d')),
            r'layer3\.1\.conv1 has stride \(2, 2\) .*wrong place',
        ),
        (lambda: _strided_block(timm.create_model('resnet26d')), r'layer3\.1 has stride 2; only the first block'),
        (lambda: _anti_aliased_block(timm.create_model('resnet26d')), r'layer3\.1 anti-aliases \(aa\)'),
    ],
    ids=[
        'basic-block',
        'vit',
        'features-only',
        'ssb-model',
        'converted-twice',
        'stride-in-conv1',
        'strided-block',
        'anti-aliased',
    ],
)
def test_models_that_cannot_be_converted_say_why(make, match):
    model = make()
    with pytest.raises(ValueError, match=match):
        ssbify(model)


@pytest.mark.parametrize(
    'kwargs,match',
    [
        (dict(sizes=(16, 8)), 'sizes must be three positive ints'),
        (dict(sampler='nearest'), "sampler must be one of 'adaptive'"),
        (dict(sampler='dconv', sizes=(14, 7, 4)), "sizes does not apply to sampler='dconv'"),
        (dict(saliency_kernel=2), 'saliency_kernel must be a positive odd int'),
        (dict(sampler='uniform', saliency_kernel=3), "saliency_kernel applies to sampler='adaptive' only"),
        (dict(sampler_args={'sigma_g': 0.0}), r"sampler_args \{'sigma_g': 0.0\} do not fit sampler='adaptive'"),
    ],
)
def test_bad_arguments_name_the_parameter_and_leave_the_model(kwargs, match):
    model = timm.create_model('resnet26d', device='meta')
    with pytest.raises(ValueError, match=f'^{match}'):
        ssbify(model, inplace=True, **kwargs)
    assert not _ssb_blocks(model)


def test_ssb_resnet_model_converts_a_named_source():
    model = timm.create_model('ssb_resnet', ssb_source='seresnext26d_32x4d', ssb_sizes=[4, 2, 1], num_classes=3)
    assert type(model) is not SSBResNet and len(_ssb_blocks(model)) == 3
    assert model.layer2[1].sampler.size == 4 and model.num_classes == 3
    cfg = model.pretrained_cfg
    source_cfg = timm.get_pretrained_cfg('seresnext26d_32x4d')
    assert (cfg['interpolation'], cfg['mean'], cfg['first_conv']) == (
        source_cfg.interpolation,
        source_cfg.mean,
        source_cfg.first_conv,
    )
    assert cfg['architecture'] == 'ssb_resnet' and not cfg.get('hf_hub_id')
    features = timm.create_model('ssb_resnet', ssb_source='resnet26d', features_only=True, out_indices=(2, 3))
    assert [f.shape[1] for f in features(X)] == [512, 1024]
    with pytest.raises(ValueError, match="ssb_source must name a timm model .*got 'resnet_nope'"):
        timm.create_model('ssb_resnet', ssb_source='resnet_nope')
    with pytest.raises(ValueError, match=r"ssb_source must name .*got 'resnet26d.nope': Invalid pretrained tag"):
        timm.create_model('ssb_resnet', ssb_source='resnet26d.nope')
    with pytest.raises(ValueError, match='ssbify converts ResNets built from timm Bottleneck blocks'):
        timm.create_model('ssb_resnet', ssb_source='resnet18')
    with pytest.raises(ValueError, match='^ssb_sizes must be three positive ints'):
        timm.create_model('ssb_resnet', ssb_source='resnet26d', ssb_sizes=(1, 2))


def test_ssb_resnet_pretrained_loads_the_source_weights_then_converts(hub_cache, tmp_path):  # noqa: F811
    """pretrained=True takes the source's timm weights (a Hub cache laid out offline) and keeps every one."""
    torch.manual_seed(0)
    weights = make_live(timm.create_model('resnet26d'), seed=4).state_dict()
    save_file({k: v.contiguous() for k, v in weights.items()}, tmp_path / 'model.safetensors')
    lay_out_repo(hub_cache, 'timm/resnet26d.bt_in1k', {'model.safetensors': tmp_path / 'model.safetensors'})
    model = timm.create_model('ssb_resnet', ssb_source='resnet26d.bt_in1k', pretrained=True, ssb_sizes=SMALL_SIZES)
    state = model.state_dict()
    for k, v in weights.items():
        assert torch.equal(state[k], v), k
    assert not model.layer2[1].sampler.saliency.weight.any()
    assert model.pretrained_cfg['architecture'] == 'ssb_resnet'
    local = timm.create_model(  # the same weights as a local file: completed with the (zero) sampler tensors
        'ssb_resnet',
        ssb_source='resnet26d',
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(tmp_path / 'model.safetensors')),
        ssb_sizes=SMALL_SIZES,
    )
    for k, v in local.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert model.pretrained_cfg['crop_pct'] == timm.get_pretrained_cfg('resnet26d.bt_in1k').crop_pct


def test_ssb_resnet_round_trips_through_a_hub_folder(tmp_path):
    """Trained SSB weights of a converted model: save_for_hf's config.json rebuilds it with local-dir:."""
    from timm.models import save_for_hf

    kwargs = dict(ssb_source='ecaresnet26t', ssb_sizes=[4, 2, 1], num_classes=4)
    torch.manual_seed(0)
    model = make_live(timm.create_model('ssb_resnet', **kwargs), seed=5).eval()
    save_for_hf(model, tmp_path, model_args=kwargs, safe_serialization=True)
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['architecture'] == 'ssb_resnet' and config['model_args']['ssb_source'] == 'ecaresnet26t'
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))
    again = timm.create_model(
        'ssb_resnet',
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(tmp_path / 'model.safetensors'), num_classes=4),
        **kwargs,
    ).eval()
    with torch.no_grad():
        assert torch.equal(again(X), model(X))
    assert again.pretrained_cfg['interpolation'] == timm.get_pretrained_cfg('ecaresnet26t').interpolation


def test_a_trained_converted_model_publishes_and_loads_back(tmp_path):
    """A train.py checkpoint of ``--model ssb_resnet --model-kwargs ssb_source=...``: publish, then local-dir:."""
    import argparse

    from timm_ssb.publish import publish

    kwargs = dict(ssb_source='resnet26d', ssb_sizes=[4, 2, 1], ssb_sampler='uniform')
    torch.manual_seed(0)
    model = make_live(timm.create_model('ssb_resnet', num_classes=3, **kwargs), seed=6).eval()
    args = argparse.Namespace(model='ssb_resnet', model_kwargs=dict(kwargs), epochs=1)
    torch.save({'arch': 'ssb_resnet', 'state_dict': model.state_dict(), 'args': args}, tmp_path / 'last.pth.tar')
    out = publish(str(tmp_path / 'last.pth.tar'), 'ssb_resnet', 'me/ssb_resnet26d', str(tmp_path / 'out'), True)
    config = json.loads((out / 'config.json').read_text())
    assert {k: config['model_args'][k] for k in kwargs} == kwargs and config['num_classes'] == 3
    card = (out / 'README.md').read_text()
    assert "ssb_resnet of timm's `resnet26d`, sampler `uniform`, sizes `(4, 2, 1)`" in card
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))


def test_ssb_resnet_pretrained_offline_names_the_source_and_why(hub_cache):  # noqa: F811
    with pytest.raises(
        RuntimeError, match=r"ssb_source='resnet26d.bt_in1k' could not be loaded: HF_HUB_OFFLINE is set"
    ):
        timm.create_model('ssb_resnet', ssb_source='resnet26d.bt_in1k', pretrained=True)
