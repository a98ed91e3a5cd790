import json

import pytest
import torch

from timm_ssb.benchmark import BenchSettings, run_benchmark
from timm_ssb.cli import main


def test_benchmark_writes_table_and_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('MALLOC_TRIM_THRESHOLD_', '123456789')
    path = tmp_path / 'results' / 'bench.json'
    settings = BenchSettings(batch_size=2, img_size=64, rounds=2, iters=1, warmup=1, train=True, threads=2)
    results = run_benchmark(['ssb_resnetd50'], settings, json_path=str(path))
    out = capsys.readouterr().out
    assert 'training step on cpu' in out and 'ssb_resnetd50    resnet50d' in out
    payload = json.loads(path.read_text())
    assert payload['settings']['batch_size'] == 2 and payload['settings']['train'] is True
    assert payload['machine']['torch'] == torch.__version__ and 'processor' in payload['machine']
    assert payload['machine']['allocator_env']['MALLOC_TRIM_THRESHOLD_'] == '123456789'
    assert 'allocator: ' in out and 'MALLOC_TRIM_THRESHOLD_=123456789' in out
    (row,) = payload['results']
    assert row['model'] == 'ssb_resnetd50' and row['baseline'] == 'resnet50d'
    assert row['ratio'] == pytest.approx(results[0].ratio) and len(row['ratio_rounds']) == 2
    assert row['throughput'] > 0 and row['baseline_throughput'] > 0
    assert row['memory_mb'] > 0 and row['memory_kind'] == 'saved for backward (MB)'
    assert row['gmacs_ratio'] == pytest.approx(row['baseline_gmacs'] / row['gmacs'])
    assert row['page_faults'] >= 0 and row['baseline_page_faults'] >= 0
    assert 'minor page faults per step, SSB / baseline: ssb_resnetd50' in out


def test_benchmark_stage_times(capsys):
    settings = BenchSettings(batch_size=1, img_size=64, rounds=1, iters=1, warmup=1, stages=True)
    (result,) = run_benchmark(['ssb_resnetd50'], settings)
    assert set(result.stages_ms) == {'stem', 'layer1', 'layer2', 'layer3', 'layer4', 'head'}
    assert all(v > 0 for v in result.baseline_stages_ms.values())
    assert 'inference ms per part' in capsys.readouterr().out


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
