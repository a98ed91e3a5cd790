"""Train -> checkpoint -> publish --dry-run -> load back through every timm path, without a network."""

import argparse
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.utils import ModelEmaV3

from timm_ssb.cli import main as cli_main
from timm_ssb.models.ssb_resnet import WARM_START_SOURCES, warm_start_tag
from timm_ssb.publish import PublishError, publish

TEST_ORG = 'timm-ssb-test'
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
        str(tmp / 'checkpoint.pth.tar'), 'ssb_resnetd50', f'{TEST_ORG}/ssb_resnetd50.in1k', str(tmp / 'out'), True
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


REGISTERED_TAG_SCRIPT = """
import sys, timm, torch
import timm_ssb
x, expected = torch.load(sys.argv[1])
model = timm.create_model('ssb_resnetd50', pretrained=True, ssb_sizes=[4, 2, 1]).eval()
with torch.no_grad():
    assert torch.equal(model(x), expected), 'registered tag: outputs differ'
adapted = timm.create_model('ssb_resnetd50.in1k', pretrained=True, num_classes=7, in_chans=1, ssb_sizes=[4, 2, 1])
assert adapted.fc.out_features == 7 and adapted.conv1[0].in_channels == 1
assert torch.equal(adapted.layer3[1].conv2.weight, model.layer3[1].conv2.weight)
assert 'ssb_resnetd50.in1k' in timm.list_models('ssb_*', pretrained=True)
print('ok')
"""


def test_registered_tag_loads_bit_identical_offline(published, hub_cache, tmp_path):
    """With ``TIMM_SSB_HUB_ORG`` set (read at import, hence a fresh interpreter) the ``.in1k`` tag loads from it."""
    out, expected, _ = published
    lay_out_repo(hub_cache, f'{TEST_ORG}/ssb_resnetd50.in1k', {p.name: p for p in out.iterdir()})
    torch.save((X, expected), tmp_path / 'expected.pt')
    env = {**os.environ, 'TIMM_SSB_HUB_ORG': TEST_ORG, 'HF_HUB_OFFLINE': '1', 'HF_HUB_CACHE': str(hub_cache)}
    result = subprocess.run(
        [sys.executable, '-c', REGISTERED_TAG_SCRIPT, str(tmp_path / 'expected.pt')],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr[-2000:]


def test_pretrained_without_published_weights_is_a_clear_error(hub_cache):
    with pytest.raises(RuntimeError) as exc:
        timm.create_model('ssb_resnetd101', pretrained=True)
    message = str(exc.value)
    assert message.startswith('ssb_resnetd101.in1k: no weights are published for this tag; it is a placeholder')
    assert 'pretrained=False' in message and "'ssb_resnetd101.warmstart_ra2_in1k'" in message
    assert 'TIMM_SSB_HUB_ORG' in message


def test_what_lists_as_pretrained_is_timm_weights_that_exist():
    """Placeholders (``.in1k`` without ``TIMM_SSB_HUB_ORG``) are not listed; every listed tag is a warm start
    from timm weights that timm itself lists as pretrained."""
    listed = timm.list_models('ssb_*', pretrained=True)
    assert sorted(listed) == sorted(f'{name}.{warm_start_tag(name)}' for name in WARM_START_SOURCES)
    timm_pretrained = set(timm.list_models(pretrained=True))
    for name in WARM_START_SOURCES:
        cfg = timm.get_pretrained_cfg(f'{name}.{warm_start_tag(name)}')
        assert cfg.hf_hub_id == f'timm/{WARM_START_SOURCES[name]}' and WARM_START_SOURCES[name] in timm_pretrained
        assert timm.get_pretrained_cfg(name).tag == 'in1k' and not timm.get_pretrained_cfg(name).has_weights


def test_warm_start_tags_carry_the_source_weights_data_config():
    for name, source in WARM_START_SOURCES.items():
        ours = timm.get_pretrained_cfg(f'{name}.{warm_start_tag(name)}').to_dict()
        theirs = timm.get_pretrained_cfg(source).to_dict()
        for key in ('input_size', 'test_input_size', 'interpolation', 'crop_pct', 'test_crop_pct', 'mean', 'std'):
            assert ours.get(key) == theirs.get(key), (name, key)
    assert timm.get_pretrained_cfg('ssb_resnetrs152.warmstart_tf_in1k').input_size == (3, 256, 256)
    assert timm.get_pretrained_cfg('ssb_resnetd50.warmstart_ra2_in1k').interpolation == 'bicubic'


def test_warm_start_offline_names_the_source_weights_and_why(hub_cache):
    with pytest.raises(RuntimeError) as exc:
        timm.create_model('ssb_resnetd50.warmstart_ra2_in1k', pretrained=True)
    message = str(exc.value)
    assert message.startswith(
        'ssb_resnetd50.warmstart_ra2_in1k: the pretrained weights could not be loaded from the Hub repository '
        "'timm/resnet50d.ra2_in1k': HF_HUB_OFFLINE is set and they are not in the local Hub cache."
    )
    assert "timm.create_model('resnet50d.ra2_in1k', pretrained=True)" in message and 'None' not in message


def test_missing_pretrained_file_is_a_clear_error(tmp_path):
    missing = tmp_path / 'nowhere.safetensors'
    with pytest.raises(FileNotFoundError, match=f"the pretrained weights file '{missing}' does not exist"):
        timm.create_model('ssb_resnetd50', pretrained=True, pretrained_cfg_overlay={'file': str(missing)})


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

    fresh = tmp_path / 'fresh'  # a valid --out: each error below is about something else
    corrupt = tmp_path / 'corrupt.safetensors'
    corrupt.write_bytes(b'\x08\x00\x00\x00\x00\x00\x00\x00{"a":')
    truncated = tmp_path / 'truncated.pth.tar'
    truncated.write_bytes(checkpoint.read_bytes()[:5000])
    for bad in (corrupt, truncated, tmp_path / 'missing.pth'):
        with pytest.raises(PublishError, match='could not be read|does not exist'):
            publish(str(bad), 'ssb_resnetd50', 'me/x', str(fresh), True)

    with pytest.raises(PublishError, match=r'does not fit ssb_resnetd101.*missing keys: layer3\.'):
        publish(str(checkpoint), 'ssb_resnetd101', 'me/x', str(fresh), True)
    with pytest.raises(PublishError, match='shape mismatches: fc.bias, fc.weight'):
        publish(str(checkpoint), 'ssb_resnetd50', 'me/x', str(fresh), True, model_args={**SMALL, 'num_classes': 10})
    with pytest.raises(PublishError, match='--model must be one of'):
        publish(str(checkpoint), 'resnet50d', 'me/x', str(fresh), True)
    with pytest.raises(PublishError, match='--repo-id must be ORG/NAME'):
        publish(str(checkpoint), 'ssb_resnetd50', 'no-org', str(fresh), True)
    with pytest.raises(PublishError, match=r"--out '.*notes.txt' is a file; give a folder"):
        publish(str(checkpoint), 'ssb_resnetd50', 'me/x', str(out / 'notes.txt'), True)
    assert (out / 'config.json').read_text() == 'keep' and (out / 'notes.txt').read_text() == 'mine'
    assert sorted(p.name for p in out.iterdir()) == ['config.json', 'notes.txt'] and not fresh.exists()


def test_upload_without_token_is_a_clear_error_before_anything_is_written(published, tmp_path, monkeypatch):
    _, _, checkpoint = published
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.setattr(huggingface_hub, 'get_token', lambda: None)
    with pytest.raises(PublishError, match='no Hugging Face token'):
        publish(str(checkpoint), 'ssb_resnetd50', 'me/x', str(tmp_path / 'up'), dry_run=False)
    assert not (tmp_path / 'up').exists()


def test_upload_offline_is_a_clear_error_before_anything_is_written(published, tmp_path, hub_cache):
    _, _, checkpoint = published
    with pytest.raises(PublishError, match='HF_HUB_OFFLINE is set, so nothing can be uploaded'):
        publish(str(checkpoint), 'ssb_resnetd50', 'me/x', str(tmp_path / 'up'), dry_run=False, token='hf_x')
    assert not (tmp_path / 'up').exists()


def test_upload_with_no_network_is_a_clear_error(published, tmp_path, monkeypatch):
    """The real Hub client against a closed port on this machine: a one-line error, the folder kept."""
    _, _, checkpoint = published
    monkeypatch.setattr(huggingface_hub.constants, 'ENDPOINT', 'http://127.0.0.1:9')
    with pytest.raises(PublishError, match=r"uploading to 'me/x' failed \(ConnectError: .*the folder .* is complete"):
        publish(str(checkpoint), 'ssb_resnetd50', 'me/x', str(tmp_path / 'up'), dry_run=False, token='hf_x')
    assert sorted(p.name for p in (tmp_path / 'up').iterdir()) == ['README.md', 'config.json', 'model.safetensors']


def test_upload_sends_exactly_the_files_publish_wrote(published, tmp_path, monkeypatch):
    _, _, checkpoint = published
    out = tmp_path / 'up'
    out.mkdir()
    (out / '.env').write_text('HF_TOKEN=secret')
    (out / 'other.ckpt').write_bytes(b'not for the Hub')
    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, 'create_repo', lambda self, repo_id, **kw: calls.append(repo_id))
    monkeypatch.setattr(
        huggingface_hub.HfApi,
        'create_commit',
        lambda self, repo_id, operations, **kw: calls.append(sorted(op.path_in_repo for op in operations)),
    )
    publish(str(checkpoint), 'ssb_resnetd50', 'me/x', str(out), dry_run=False, token='hf_x')
    assert calls == ['me/x', ['README.md', 'config.json', 'model.safetensors']]


def test_published_files_have_the_permissions_of_any_new_file(published):
    out, _, _ = published
    umask = os.umask(0)
    os.umask(umask)
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


def test_corrupt_weights_in_local_dir_are_a_clear_error(published, tmp_path):
    out, _, _ = published
    bad = tmp_path / 'bad'
    shutil.copytree(out, bad)
    data = (bad / 'model.safetensors').read_bytes()
    (bad / 'model.safetensors').write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match='pretrained weights could not be loaded'):
        timm.create_model(f'local-dir:{bad}', pretrained=True)
