"""Training with timm's scripts: the script runner, DDP on CPU, and (when a timm checkout is given) train.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
TIMM_SOURCE = os.environ.get('TIMM_SOURCE_DIR')


def test_runner_registers_models_and_passes_arguments(tmp_path):
    script = tmp_path / 'script.py'
    script.write_text(
        'import sys, timm\n'
        'print("registered", timm.is_model("ssb_resnetd50"))\n'
        'print("argv", sys.argv[1:])\n'
        'print("main", __name__)\n'
    )
    result = subprocess.run(
        [sys.executable, '-m', 'timm_ssb.run', str(script), '--model', 'ssb_resnetd50', '-b', '2'],
        capture_output=True,
        text=True,
        check=True,
    )
    assert 'registered True' in result.stdout
    assert "argv ['--model', 'ssb_resnetd50', '-b', '2']" in result.stdout
    assert 'main __main__' in result.stdout


def test_runner_errors():
    result = subprocess.run([sys.executable, '-m', 'timm_ssb.run', 'no/such/script.py'], capture_output=True, text=True)
    assert result.returncode != 0 and "script 'no/such/script.py' not found" in result.stderr
    result = subprocess.run([sys.executable, '-m', 'timm_ssb.run'], capture_output=True, text=True)
    assert result.returncode != 0 and 'usage: python -m timm_ssb.run SCRIPT.py' in result.stderr


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import timm

    import timm_ssb  # noqa: F401

    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world_size)
    torch.manual_seed(0)  # same initial weights on every rank
    model = timm.create_model('ssb_resnetd50', num_classes=4, ssb_sizes=(4, 2, 1))
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and m.out_channels == 1:
            torch.nn.init.normal_(m.weight, std=0.05)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(100 + rank)  # different data on every rank
    for _ in range(3):
        x = torch.randn(2, 3, 64, 64, generator=generator)
        y = torch.randint(0, 4, (2,), generator=generator)
        loss = torch.nn.functional.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    state = {k: v.detach() for k, v in model.named_parameters()}  # buffers (BN statistics) stay per replica in DDP
    torch.save({'start': start, 'params': params, 'state': state}, os.path.join(out_dir, f'rank{rank}.pt'))
    dist.destroy_process_group()


def test_ddp_replicas_stay_bit_identical(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / 'init'), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f'rank{r}.pt') for r in range(2))
    assert torch.equal(r0['params'], r1['params'])
    for k in r0['state']:
        assert torch.equal(r0['state'][k], r1['state'][k]), k
    saliency = [k for k in r0['state'] if k.endswith('sampler.saliency.weight')]
    assert saliency
    assert all(not torch.equal(r0['state'][k], r0['start'][k]) for k in saliency)  # they learned, in sync


def _tiny_image_folder(root: Path) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ('train', 'validation'):
        for cls in ('a', 'b'):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(4):
                pixels = (torch.rand(48, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(d / f'{i}.png')
    return root


TINY_RUN = (
    '--model ssb_resnetd50 --model-kwargs ssb_sizes=(4,2,1) --num-classes 2 --img-size 64 -j 0 --device cpu '
    '--no-prefetcher'
).split()
NEEDS_TIMM_SOURCE = pytest.mark.skipif(
    not TIMM_SOURCE, reason="set TIMM_SOURCE_DIR to a timm source checkout (with train.py) to run timm's scripts"
)


def _run_ok(cmd, cwd) -> None:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
@NEEDS_TIMM_SOURCE
def test_timm_train_py_with_a_config_of_ours(tmp_path):
    """timm's train.py with configs/ssb_resnetd50.yaml (which carries device_modules: [timm_ssb]), then publish."""
    import yaml

    data = _tiny_image_folder(tmp_path / 'data')
    config = yaml.safe_load((REPO / 'configs' / 'ssb_resnetd50.yaml').read_text())
    assert config['device_modules'] == ['timm_ssb']
    config.update(amp=False, channels_last=False)  # switches the CPU run must turn off (no --no-amp flag)
    (tmp_path / 'tiny.yaml').write_text(yaml.safe_dump(config))
    out = tmp_path / 'output'
    _run_ok(
        [sys.executable, Path(TIMM_SOURCE) / 'train.py', data, '--config', tmp_path / 'tiny.yaml', *TINY_RUN,
         '-b', '4', '--epochs', '1', '--warmup-epochs', '0', '--output', out, '--experiment', 'tiny',
         '--log-interval', '1', '--model-ema', '--aa', '', '--reprob', '0'],
        tmp_path,
    )  # fmt: skip
    checkpoint = out / 'tiny' / 'last.pth.tar'
    assert checkpoint.is_file()
    from timm_ssb.publish import publish

    folder = publish(str(checkpoint), 'ssb_resnetd50', 'me/tiny', str(tmp_path / 'pub'), dry_run=True)
    assert (folder / 'model.safetensors').is_file()


@pytest.mark.slow
@NEEDS_TIMM_SOURCE
def test_timm_scripts_through_the_runner_and_torchrun(tmp_path):
    """train.py under torchrun via ``-m timm_ssb.run`` (no --device-modules), then validate.py on its checkpoint."""
    data = _tiny_image_folder(tmp_path / 'data')
    _run_ok(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '1', '-m', 'timm_ssb.run',
         Path(TIMM_SOURCE) / 'train.py', data, *TINY_RUN, '-b', '2', '--epochs', '1', '--warmup-epochs', '0',
         '--output', tmp_path / 'out', '--experiment', 'run'],
        tmp_path,
    )  # fmt: skip
    checkpoint = tmp_path / 'out' / 'run' / 'last.pth.tar'
    _run_ok(
        [sys.executable, '-m', 'timm_ssb.run', Path(TIMM_SOURCE) / 'validate.py', data / 'validation', *TINY_RUN,
         '-b', '2', '--checkpoint', checkpoint, '--results-file', tmp_path / 'results.json'],
        tmp_path,
    )  # fmt: skip
    assert (tmp_path / 'results.json').read_text().splitlines()[1].startswith('ssb_resnetd50,')


@pytest.mark.slow
@NEEDS_TIMM_SOURCE
def test_timm_train_py_fine_tunes_a_converted_pretrained_resnet(tmp_path):
    """The README's example: train.py --model ssb_resnet --model-kwargs ssb_source=... --pretrained, with the
    source's timm weights in a Hub cache laid out offline; the checkpoint starts from those weights."""
    import timm
    from safetensors.torch import save_file

    from test_hub import lay_out_repo

    torch.manual_seed(0)
    weights = timm.create_model('resnet26d').state_dict()
    save_file(weights, tmp_path / 'model.safetensors')
    cache = tmp_path / 'hub'
    lay_out_repo(cache, 'timm/resnet26d.bt_in1k', {'model.safetensors': tmp_path / 'model.safetensors'})
    data = _tiny_image_folder(tmp_path / 'data')
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(cache))
    result = subprocess.run(
        [sys.executable, Path(TIMM_SOURCE) / 'train.py', data, '--model', 'ssb_resnet', '--device-modules', 'timm_ssb',
         '--model-kwargs', 'ssb_source=resnet26d.bt_in1k', 'ssb_sizes=(4,2,1)', '--pretrained', '--num-classes', '2',
         '--img-size', '64', '-j', '0', '--device', 'cpu', '--no-prefetcher', '-b', '4', '--epochs', '1',
         '--warmup-epochs', '0', '--lr', '0', '--output', tmp_path / 'out', '--experiment', 'ft'],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = torch.load(tmp_path / 'out' / 'ft' / 'last.pth.tar', weights_only=False)['state_dict']
    assert 'layer2.1.sampler.saliency.weight' in state and state['fc.weight'].shape == (2, 2048)
    source = weights['layer3.1.conv2.weight']  # lr 0 (timm's schedulers still take a step of ~1e-5): the source's
    torch.testing.assert_close(state['layer3.1.conv2.weight'], source, rtol=1e-3, atol=1e-5)
    assert (source - timm.create_model('resnet26d').state_dict()['layer3.1.conv2.weight']).abs().max() > 1e-2


WARM_START_CONFIGS = sorted((REPO / 'configs').glob('*_warmstart.yaml'))


@pytest.mark.parametrize('path', WARM_START_CONFIGS, ids=lambda p: p.stem)
def test_warm_start_configs_name_the_baseline_as_source_and_teacher(path):
    """Each recipe starts the SSB model from its baseline's timm weights and distils from that same model."""
    import timm
    import yaml

    from timm_ssb.models.ssb_resnet import WARM_START_SOURCES, warm_start_tag

    config = yaml.safe_load(path.read_text())
    assert config['device_modules'] == ['timm_ssb'] and config['pretrained'] is True
    assert config['kd_distill_type'] == 'logit' and config['epochs'] < 120
    if config['model'] == 'ssb_resnet':
        source = config['model_kwargs']['ssb_source']
    else:
        name, tag = config['model'].split('.')
        assert path.stem == f'{name}_warmstart' and tag == warm_start_tag(name)
        source = WARM_START_SOURCES[name]
        assert timm.models.get_pretrained_cfg(config['model']).hf_hub_id == f'timm/{source}'
    assert config['kd_model_name'] == source and timm.is_model(source.split('.')[0])


def test_warm_start_recipe_runs_with_timms_logit_distillation(tmp_path, monkeypatch):
    """configs/ssb_resnetd50_warmstart.yaml as train.py runs it, offline: the student from its warm-start tag with
    --pretrained, the teacher by name, both loading one set of baseline weights from a Hub cache laid out here,
    and timm's LogitDistillationTask with the config's temperature and weights. The student starts with the
    teacher's weights and zero saliency convs, and a few steps train it, saliency included, while the teacher
    stays as it was."""
    import huggingface_hub
    import timm
    import yaml
    from safetensors.torch import save_file
    from timm.task import LogitDistillationTask

    import timm_ssb  # noqa: F401
    from test_hub import lay_out_repo

    config = yaml.safe_load((REPO / 'configs' / 'ssb_resnetd50_warmstart.yaml').read_text())
    torch.manual_seed(0)
    baseline = timm.create_model('resnet50d')
    for name, t in baseline.state_dict().items():  # live branches: timm zero-initialises every bn3.weight
        if name.endswith('bn3.weight'):
            t.uniform_(0.5, 1.0)
    save_file(baseline.state_dict(), tmp_path / 'model.safetensors')
    cache = tmp_path / 'hub'
    lay_out_repo(cache, f'timm/{config["kd_model_name"]}', {'model.safetensors': tmp_path / 'model.safetensors'})
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(cache))

    student = timm.create_model(config['model'], pretrained=config['pretrained'], ssb_sizes=(4, 2, 1))
    task = LogitDistillationTask(
        student,
        config['kd_model_name'],
        loss_type='kl',
        distill_loss_weight=config['distill_loss_weight'],
        task_loss_weight=config['task_loss_weight'],
        temperature=config['kd_temperature'],
        verbose=False,
    )
    teacher = task.teacher.model
    teacher_start = {k: v.clone() for k, v in teacher.state_dict().items()}
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for name, t in baseline.state_dict().items():  # the student starts from the teacher's weights
        assert torch.equal(student.state_dict()[name], t) and torch.equal(teacher_start[name], t), name
    saliency = {k: v.clone() for k, v in student.state_dict().items() if k.endswith('saliency.weight')}
    assert saliency and all(torch.count_nonzero(v) == 0 for v in saliency.values())
    student.train()
    opt = torch.optim.SGD(student.parameters(), lr=0.01)
    target = torch.tensor([0, 1, 2, 3])
    weights = config['task_loss_weight'], config['distill_loss_weight']
    for _ in range(2):
        result = task(x, target)
        combined = weights[0] * result['task_loss'] + weights[1] * result['kd_loss']
        torch.testing.assert_close(result['loss'], combined)  # the recipe's weighting, as configured
        assert torch.isfinite(result['loss']) and result['kd_loss'] > 0
        opt.zero_grad()
        result['loss'].backward()
        opt.step()
    moved = student.state_dict()
    assert all(torch.count_nonzero(moved[k]) > 0 for k in saliency)  # the sampler learns where to look
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_start[k]), k


@pytest.mark.slow
@NEEDS_TIMM_SOURCE
def test_timm_train_py_runs_the_warm_start_recipe_offline(tmp_path):
    """timm's train.py with configs/ssb_resnetd50_warmstart.yaml: warm start (--pretrained through the tag) and
    logit distillation from the baseline, both from one Hub cache laid out here, on tiny generated data."""
    import timm
    import yaml
    from safetensors.torch import save_file

    from test_hub import lay_out_repo

    config = yaml.safe_load((REPO / 'configs' / 'ssb_resnetd50_warmstart.yaml').read_text())
    config.update(amp=False, channels_last=False)  # switches the CPU run must turn off (no --no-amp flag)
    (tmp_path / 'tiny.yaml').write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    save_file(timm.create_model('resnet50d').state_dict(), tmp_path / 'model.safetensors')
    cache = tmp_path / 'hub'
    lay_out_repo(cache, f'timm/{config["kd_model_name"]}', {'model.safetensors': tmp_path / 'model.safetensors'})
    data = _tiny_image_folder(tmp_path / 'data')
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(cache))
    result = subprocess.run(
        [sys.executable, Path(TIMM_SOURCE) / 'train.py', data, '--config', tmp_path / 'tiny.yaml',
         '--model-kwargs', 'ssb_sizes=(4,2,1)', '--num-classes', '2', '--img-size', '64', '-j', '0', '--device',
         'cpu', '--no-prefetcher', '-b', '4', '--epochs', '1', '--warmup-epochs', '0', '--output', tmp_path / 'out',
         '--experiment', 'warm', '--log-interval', '1'],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert 'LogitDistillationTask' in log or 'KD teacher' in log, log[-3000:]
    state = torch.load(tmp_path / 'out' / 'warm' / 'last.pth.tar', weights_only=False)['state_dict']
    assert 'layer2.1.sampler.saliency.weight' in state and state['fc.weight'].shape == (2, 2048)
