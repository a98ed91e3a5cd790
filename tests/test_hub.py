"""Train -> checkpoint -> publish --dry-run -> load back through every timm path, without a network."""

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.utils import ModelEmaV3

from timm_ssb.cli import main as cli_main
from timm_ssb.models.ssb_resnet import HUB_ORG
from timm_ssb.publish import PublishError, publish

SMALL = {'ssb_sizes': [4, 2, 1]}  # every SSB block samples at 64x64
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hugging Face Hub cache the test lays out by hand."""
    cache = tmp_path / 'hub'
    cache.mkdir()
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(cache))
    return cache


def lay_out_repo(cache: Path, repo_id: str, files: dict) -> None:
    """``models--ORG--NAME/refs/main`` + ``snapshots/<commit>/<files>``, as the Hub client writes them."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = cache / f'models--{repo_id.replace("/", "--")}'
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(commit)
    snapshot = repo / 'snapshots' / commit
    snapshot.mkdir(parents=True)
    for name, src in files.items():
        shutil.copy2(src, snapshot / name)


def train_and_checkpoint(path: Path, num_classes: int = 1000) -> torch.nn.Module:
    """A few SGD steps with EMA, saved the way timm's train.py saves; returns the EMA model."""
    torch.manual_seed(0)
    model = timm.create_model('ssb_resnetd50', num_classes=num_classes, **SMALL)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and m.out_channels == 1:
            torch.nn.init.normal_(m.weight, std=0.05)  # saliency that actually moves samples
    ema = ModelEmaV3(model, decay=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.arange(4) % num_classes)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
    args = argparse.Namespace(model='ssb_resnetd50', model_kwargs=dict(SMALL), epochs=1, lr=0.01, batch_size=4)
    torch.save(
        {
            'epoch': 0,
            'arch': 'ssb_resnetd50',
            'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()},  # as saved under DDP
            'state_dict_ema': ema.module.state_dict(),
            'args': args,
        },
        path,
    )
    return ema.module.eval()


@pytest.fixture(scope='module')
def published(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('published')
    ema = train_and_checkpoint(tmp / 'checkpoint.pth.tar')
    out = publish(
        str(tmp / 'checkpoint.pth.tar'), 'ssb_resnetd50', f'{HUB_ORG}/ssb_resnetd50.in1k', str(tmp / 'out'), True
    )
    with torch.no_grad():
        expected = ema(X)
    return out, expected, tmp / 'checkpoint.pth.tar'


def test_publish_writes_safetensors_config_and_card(published):
    out, _, _ = published
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'ssb_resnetd50'
    assert config['num_classes'] == 1000
    assert len(config['label_names']) == 1000 and config['label_names'][0] == 'n01440764'
    assert config['model_args']['ssb_sizes'] == [4, 2, 1]
    assert config['pretrained_cfg']['paper_ids'] == 'arXiv:2207.11511'
    card = (out / 'README.md').read_text()
    assert 'import timm_ssb' in card and 'library_name: timm' in card and 'arXiv:2207.11511' in card
    assert "'state_dict_ema'" in card or 'state_dict_ema' in card


def test_local_dir_loads_bit_identical(published):
    out, expected, _ = published
    model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(model(X), expected)


def test_hf_hub_loads_bit_identical_offline(published, hub_cache):
    out, expected, _ = published
    lay_out_repo(hub_cache, 'someone/my-ssb', {p.name: p for p in out.iterdir()})
    model = timm.create_model('hf-hub:someone/my-ssb', pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(model(X), expected)


def test_registered_tag_loads_bit_identical_offline(published, hub_cache):
    out, expected, _ = published
    lay_out_repo(hub_cache, f'{HUB_ORG}/ssb_resnetd50.in1k', {p.name: p for p in out.iterdir()})
    model = timm.create_model('ssb_resnetd50', pretrained=True, **SMALL).eval()
    with torch.no_grad():
        assert torch.equal(model(X), expected)
    adapted = timm.create_model('ssb_resnetd50.in1k', pretrained=True, num_classes=7, in_chans=1, **SMALL)
    assert adapted.fc.out_features == 7 and adapted.conv1[0].in_channels == 1
    assert torch.equal(adapted.layer3[1].conv2.weight, model.layer3[1].conv2.weight)


def test_pretrained_without_published_weights_is_a_clear_error(hub_cache):
    with pytest.raises(RuntimeError) as exc:
        timm.create_model('ssb_resnetd101', pretrained=True)
    message = str(exc.value)
    assert 'ssb_resnetd101' in message and f'{HUB_ORG}/ssb_resnetd101.in1k' in message
    assert 'pretrained=False' in message and 'warmstart_ra2_in1k' in message


def test_warm_start_from_timm_baseline_weights(hub_cache, tmp_path):
    torch.manual_seed(2)
    baseline = timm.create_model('resnet50d').eval()
    save_file(baseline.state_dict(), tmp_path / 'model.safetensors')
    lay_out_repo(hub_cache, 'timm/resnet50d.ra2_in1k', {'model.safetensors': tmp_path / 'model.safetensors'})
    for model in (
        timm.create_model('ssb_resnetd50.warmstart_ra2_in1k', pretrained=True).eval(),
        timm.create_model(
            'ssb_resnetd50', pretrained=True, pretrained_cfg_overlay={'file': str(tmp_path / 'model.safetensors')}
        ).eval(),
    ):
        own = model.state_dict()
        assert all(torch.equal(own[k], v) for k, v in baseline.state_dict().items())
        saliency = [v for k, v in own.items() if '.sampler.saliency.' in k]
        assert saliency and all(torch.count_nonzero(v) == 0 for v in saliency)
        x = torch.randn(2, 3, 32, 32)  # maps no larger than the sizes: the SSB model computes its baseline
        with torch.no_grad():
            torch.testing.assert_close(model(x), baseline(x), rtol=1e-5, atol=1e-5)


def test_publish_prefers_ema_and_reports_it(published, capsys, tmp_path):
    _, expected, checkpoint = published
    publish(str(checkpoint), 'ssb_resnetd50', 'me/x', str(tmp_path / 'again'), True)
    assert "using weights from 'state_dict_ema'" in capsys.readouterr().out


def test_cli_publish_dry_run(published, tmp_path, capsys):
    _, _, checkpoint = published
    assert (
        cli_main(
            [
                'publish',
                str(checkpoint),
                '--model',
                'ssb_resnetd50',
                '--repo-id',
                'me/x',
                '--dry-run',
                '--out',
                str(tmp_path / 'cli'),
            ]
        )
        == 0
    )
    assert (tmp_path / 'cli' / 'model.safetensors').is_file()


def test_publish_errors_leave_out_untouched(published, tmp_path):
    _, _, checkpoint = published
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'config.json').write_text('keep')
    (out / 'notes.txt').write_text('mine')
    with pytest.raises(PublishError, match='already has config.json'):
        publish(str(checkpoint), 'ssb_resnetd50', 'me/x', str(out), True)

    corrupt = tmp_path / 'corrupt.safetensors'
    corrupt.write_bytes(b'\x08\x00\x00\x00\x00\x00\x00\x00{"a":')
    truncated = tmp_path / 'truncated.pth.tar'
    truncated.write_bytes(checkpoint.read_bytes()[:5000])
    for bad in (corrupt, truncated, tmp_path / 'missing.pth'):
        with pytest.raises(PublishError, match='could not be read|does not exist'):
            publish(str(bad), 'ssb_resnetd50', 'me/x', str(out), True)

    with pytest.raises(PublishError, match=r'does not fit ssb_resnetd101.*missing keys: layer3\.'):
        publish(str(checkpoint), 'ssb_resnetd101', 'me/x', str(out), True)
    with pytest.raises(PublishError, match='shape mismatches: fc.bias, fc.weight'):
        publish(str(checkpoint), 'ssb_resnetd50', 'me/x', str(out), True, model_args={**SMALL, 'num_classes': 10})
    with pytest.raises(PublishError, match='--model must be one of'):
        publish(str(checkpoint), 'resnet50d', 'me/x', str(out), True)
    with pytest.raises(PublishError, match='--repo-id must be ORG/NAME'):
        publish(str(checkpoint), 'ssb_resnetd50', 'no-org', str(out), True)
    assert (out / 'config.json').read_text() == 'keep' and (out / 'notes.txt').read_text() == 'mine'
    assert sorted(p.name for p in out.iterdir()) == ['config.json', 'notes.txt']


def test_upload_without_token_is_a_clear_error(published, tmp_path, monkeypatch):
    _, _, checkpoint = published
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.setattr(huggingface_hub, 'get_token', lambda: None)
    with pytest.raises(PublishError, match='no Hugging Face token'):
        publish(str(checkpoint), 'ssb_resnetd50', 'me/x', str(tmp_path / 'up'), dry_run=False)


def test_corrupt_weights_in_local_dir_are_a_clear_error(published, tmp_path):
    out, _, _ = published
    bad = tmp_path / 'bad'
    shutil.copytree(out, bad)
    data = (bad / 'model.safetensors').read_bytes()
    (bad / 'model.safetensors').write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match='pretrained weights could not be loaded'):
        timm.create_model(f'local-dir:{bad}', pretrained=True)
