import json

import pytest
import timm
import torch

from timm_ssb.benchmark import BenchSettings, run_benchmark, stage_times
from timm_ssb.cli import main


def test_benchmark_writes_table_and_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('MALLOC_TRIM_THRESHOLD_', '123456789')
    monkeypatch.setenv('THP_MEM_ALLOC_ENABLE', '1')  # read by PyTorch at its first allocation: recorded, not used here
    path = tmp_path / 'results' / 'bench.json'
    settings = BenchSettings(batch_size=2, img_size=64, rounds=2, iters=1, warmup=1, train=True, threads=2)
    results = run_benchmark(['ssb_resnetd50'], settings, json_path=str(path))
    out = capsys.readouterr().out
    assert 'training step on cpu' in out and 'ssb_resnetd50    resnet50d' in out
    payload = json.loads(path.read_text())
    assert payload['settings']['batch_size'] == 2 and payload['settings']['train'] is True
    assert payload['machine']['torch'] == torch.__version__ and 'processor' in payload['machine']
    recorded = payload['machine']['allocator_env']
    assert recorded['MALLOC_TRIM_THRESHOLD_'] == '123456789' and recorded['THP_MEM_ALLOC_ENABLE'] == '1'
    assert 'allocator: ' in out and 'MALLOC_TRIM_THRESHOLD_=123456789' in out
    (row,) = payload['results']
    assert row['model'] == 'ssb_resnetd50' and row['baseline'] == 'resnet50d'
    assert row['ratio'] == pytest.approx(results[0].ratio) and len(row['ratio_rounds']) == 2
    assert row['throughput'] > 0 and row['baseline_throughput'] > 0
    assert row['memory_mb'] > 0 and row['memory_kind'] == 'saved for backward (MB)'
    assert row['gmacs_ratio'] == pytest.approx(row['baseline_gmacs'] / row['gmacs'])
    assert row['page_faults'] >= 0 and row['baseline_page_faults'] >= 0
    assert 'minor page faults per step, SSB / baseline: ssb_resnetd50' in out
    spread = f"each round's SSB / baseline, lowest-highest: ssb_resnetd50 {min(row['ratio_rounds']):.2f}-"
    assert spread + f'{max(row["ratio_rounds"]):.2f}' in out


def test_benchmark_stage_times(capsys):
    settings = BenchSettings(batch_size=1, img_size=64, rounds=1, iters=1, warmup=1, stages=True)
    (result,) = run_benchmark(['ssb_resnetd50'], settings)
    assert set(result.stages_ms) == {'stem', 'layer1', 'layer2', 'layer3', 'layer4', 'head'}
    assert all(v > 0 for v in result.baseline_stages_ms.values())
    assert 'inference ms per part' in capsys.readouterr().out


def test_stage_times_run_under_the_benchmark_s_autocast_and_compile(monkeypatch):
    """With ``--amp`` the parts run under autocast and with ``--compile`` each is compiled on its own, as the
    whole-model timings are; else eager and in fp32."""
    compiled = []
    monkeypatch.setattr(torch, 'compile', lambda module: compiled.append(module) or module)
    model = timm.create_model('resnet10t', num_classes=3)
    seen = []
    model.layer2.register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled('cpu')))
    x = torch.randn(1, 3, 32, 32)
    times = stage_times(model, x, rounds=1, amp_dtype=torch.bfloat16, compile=True)
    assert set(times) == {'stem', 'layer1', 'layer2', 'layer3', 'layer4', 'head'} and seen == [True, True]
    assert len(compiled) == 6 and compiled[2] is model.layer2
    seen.clear()
    stage_times(model, x, rounds=1)
    assert seen == [False, False] and len(compiled) == 6


def test_bench_cli_rejects_bad_arguments():
    with pytest.raises(SystemExit, match='--models must be among'):
        main(['bench', '--models', 'resnet50d'])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match='no CUDA device'):
            main(['bench', '--device', 'cuda'])
    with pytest.raises(SystemExit):
        main(['bench', '--batch-size', '0'])


@pytest.mark.slow
@pytest.mark.parametrize('flags', [['--amp', 'bfloat16'], ['--compile'], ['--compile', '--amp', 'bfloat16']])
def test_bench_cli_bf16_autocast_and_compile_on_cpu(tmp_path, capsys, flags):
    path = tmp_path / 'bench.json'
    args = ['bench', '--models', 'ssb_resnetd26', '--batch-size', '1', '--img-size', '64', '--rounds', '1']
    assert main([*args, '--iters', '1', '--warmup', '1', '--threads', '2', '--json', str(path), *flags]) == 0
    out = capsys.readouterr().out
    settings = json.loads(path.read_text())['settings']
    assert settings['compile'] == ('--compile' in flags)
    assert settings['amp_dtype'] == ('bfloat16' if '--amp' in flags else None)
    assert ('bfloat16 autocast' in out) == ('--amp' in flags) and ('torch.compile' in out) == ('--compile' in flags)
    (row,) = json.loads(path.read_text())['results']
    assert row['ratio'] > 0 and row['throughput'] > 0
