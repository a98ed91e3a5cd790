"""The scripts in benchmarks/ run and write what their docs say (tiny settings; their numbers are not checked)."""

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from timm_ssb.benchmark import SPEED_TARGETS
from timm_ssb.layers.native.calibration import NATIVE_MARGIN

BENCHMARKS = Path(__file__).resolve().parent.parent / 'benchmarks'


def run_script(name: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True, check=False, timeout=600
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_sampling_products_writes_table_and_json(tmp_path):
    path = tmp_path / 'products.json'
    out = run_script('sampling_products.py', '--batch-size', '1', '--repeats', '1', '--json', str(path))
    assert 'up+res+relu ms' in out and 'matrices ms (ref)' in out and 'torch.mm 2048^3 (MKL)' in out
    payload = json.loads(path.read_text())
    assert [r['stage'] for r in payload['results']] == ['layer2', 'layer3', 'layer4']
    shapes = [(r['channels'], r['side'], r['size']) for r in payload['results']]
    assert shapes == [(512, 28, 16), (1024, 14, 8), (2048, 7, 4)]
    layer2 = payload['results'][0]
    assert layer2['gmacs_each_way'] == pytest.approx(512 * 16 * 28 * (28 + 16) / 1e9)
    assert layer2['down_gmacs_per_s'] == pytest.approx(layer2['gmacs_each_way'] / layer2['down_ms'] * 1e3)
    keys = ('matrices_ms', 'matrices_fwd_bwd_ms', 'reference_matrices_ms', 'reference_matrices_fwd_bwd_ms')
    assert all(r[k] > 0 for r in payload['results'] for k in keys)
    for r in payload['results']:  # one pair each: its ratio is the ratio of the two times
        for op in ('down', 'up_residual_relu', 'down_fwd_bwd', 'up_fwd_bwd'):
            assert r[f'{op}_ratio'] == pytest.approx(r[f'{op}_ms'] / r[f'reference_{op}_ms'])
    assert 'median of the per-pair ratios' in out
    assert payload['references']['mm_gmacs_per_s'] > 0 and payload['references']['conv1x1_gmacs_per_s'] > 0
    assert 'allocator_env' in payload['machine']
    assert "floor / PyTorch's time" in out
    assert payload['references']['floor_gmacs_per_s'] == payload['references']['mm_gmacs_per_s']  # float32
    macs_per_ms = payload['references']['floor_gmacs_per_s'] * 1e6
    for r in payload['results']:
        assert 0 < r['down_band_macs'] <= r['gmacs_each_way'] * 1e9 and 0 < r['up_band_macs']
        for op, macs, traffic in (
            ('down', r['down_band_macs'], r['read_ms']),
            ('up_residual_relu', r['up_band_macs'], r['copy_ms']),
        ):
            assert r[f'{op}_floor_ms'] == pytest.approx(max(traffic, macs / macs_per_ms))
            # Forward + backward: the least traffic timed through autograd, plus where a pass's multiply-adds take
            # longer than its traffic, the difference.
            arithmetic = macs / macs_per_ms
            excess = max(0.0, arithmetic - traffic) + max(0.0, 2 * arithmetic - r['copy_ms'])
            fwd_bwd = op.split('_')[0] + '_fwd_bwd'
            assert r[f'{fwd_bwd}_least_traffic_ms'] > 0
            assert r[f'{fwd_bwd}_floor_ms'] == pytest.approx(r[f'{fwd_bwd}_least_traffic_ms'] + excess)
        for op in ('down', 'up_residual_relu', 'down_fwd_bwd', 'up_fwd_bwd'):
            assert r[f'{op}_floor_ratio'] == pytest.approx(r[f'{op}_floor_ms'] / r[f'reference_{op}_ms'])
            assert f'{r[f"{op}_floor_ratio"]:5.2f}' in out


@pytest.mark.parametrize('way', ['down', 'up'])
def test_least_traffic_stand_ins_make_the_gradients_the_ops_make(way):
    """The stand-ins whose time through autograd is the forward + backward floor allocate what the op's backward
    allocates: a new map-sized gradient in the map's layout, accumulated into ``x.grad``."""
    spec = importlib.util.spec_from_file_location('sampling_products', BENCHMARKS / 'sampling_products.py')
    products = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(products)
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    stand_in = {'down': products._LeastTrafficDown, 'up': products._LeastTrafficUp}[way]
    out = stand_in.apply(x)
    assert out.shape == ((2, 8, 1, 1) if way == 'down' else x.shape)
    grad = torch.randn_like(out)
    torch.autograd.backward(out, grad)
    first = x.grad.clone()
    assert first.shape == x.shape and x.grad.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(first, x.detach() * 0.5 if way == 'down' else grad)
    torch.autograd.backward(stand_in.apply(x), grad)
    assert torch.equal(x.grad, 2 * first)


def test_band_macs_count_the_products_on_the_nonzero_entries_in_the_cheaper_order():
    spec = importlib.util.spec_from_file_location('sampling_products', BENCHMARKS / 'sampling_products.py')
    products = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(products)
    batch, channels, rows, height, cols, width = 2, 3, 4, 10, 5, 6
    dense_y, dense_x = torch.rand(batch, rows, height) + 0.1, torch.rand(batch, cols, width) + 0.1
    y_first = batch * channels * (rows * height * width + cols * width * rows)
    x_first = batch * channels * (cols * width * height + rows * height * cols)
    assert products.band_macs(dense_y, dense_x, channels) == min(y_first, x_first) == y_first
    band_x = dense_x.clone()
    band_x[:, :, 1:] = 0  # one input column an output column: along x first is then the cheaper order
    y_first = batch * channels * (rows * height * width + cols * 1 * rows)
    x_first = batch * channels * (cols * 1 * height + rows * height * cols)
    assert products.band_macs(dense_y, band_x, channels) == min(y_first, x_first) == x_first
    band_y = dense_y.clone()
    band_y[:, :, 3:] = 0  # 3 of 10 weights a row
    assert products.band_macs(band_y, band_x, channels) == batch * channels * (rows * 3 * width + cols * 1 * rows)


def test_sampling_products_reports_the_medians_over_fresh_processes(tmp_path):
    path = tmp_path / 'products.json'
    out = run_script(
        'sampling_products.py', '--batch-size', '1', '--repeats', '1', '--processes', '3', '--json', str(path)
    )
    assert 'medians over 3 processes' in out and 'the same in each process (lowest-highest)' in out
    payload = json.loads(path.read_text())
    assert payload['settings']['processes'] == 3
    for r in payload['results']:
        for op in ('down', 'up_residual_relu', 'down_fwd_bwd', 'up_fwd_bwd'):
            ratios = r[f'{op}_ratios']
            assert len(ratios) == 3 and r[f'{op}_ratio'] == statistics.median(ratios)
            assert f'{min(ratios):.2f}-{max(ratios):.2f}' in out


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_small_map_convs_writes_table_and_json(tmp_path, dtype):
    path = tmp_path / 'convs.json'
    args = ['--batch-size', '1', '--repeats', '1', '--dtype', dtype, '--json', str(path)]
    out = run_script('small_map_convs.py', *args)
    assert 'branch prod/conv' in out and dtype in out
    rows = json.loads(path.read_text())['results']
    assert [(r['stage'], r['side']) for r in rows] == [
        ('layer2', 12), ('layer2', 16), ('layer2', 20), ('layer3', 6), ('layer3', 8), ('layer3', 10),
        ('layer4', 3), ('layer4', 4), ('layer4', 5),
    ]  # fmt: skip
    assert [r['rule'] for r in rows] == ['conv'] * 6 + ['products'] * 3
    for r in rows:
        assert r['branch_product_ms'] == pytest.approx(sum(r[f'conv{i}_product_ms'] for i in (1, 2, 3)))
        assert r['branch_ratio_fwd_bwd'] == pytest.approx(r['branch_product_fwd_bwd_ms'] / r['branch_conv_fwd_bwd_ms'])


def test_saliency_pass_writes_table_and_json(tmp_path):
    path = tmp_path / 'pass.json'
    out = run_script(
        'saliency_pass.py', '--models', 'ssb_resnetd26', '--batch-size', '1', '--rounds', '2', '--json', str(path)
    )
    assert 'passing ms' in out and 'ssb_resnetd26' in out
    (row,) = json.loads(path.read_text())['results']
    assert row['speedup'] == pytest.approx(row['plain_ms'] / row['passing_ms'])
    assert len(row['times_s']['passing']) == len(row['times_s']['plain']) == 2


@pytest.mark.slow
def test_time_ceiling_writes_table_and_json(tmp_path):
    path = tmp_path / 'ceiling.json'
    args = ['--models', 'ssb_resnetd50', '--batch-size', '1', '--img-size', '64', '--rounds', '1', '--json', str(path)]
    out = run_script('time_ceiling.py', *args)
    assert 'ceiling@branch' in out and 'ceiling@floor' in out and 'ssb_resnetd50' in out
    (row,) = json.loads(path.read_text())['results']
    assert row['model'] == 'ssb_resnetd50' and set(row['per_stage']) == {'layer2', 'layer3', 'layer4'}
    assert row['ratio'] == pytest.approx(row['base_ms'] / row['ssb_ms'])
    assert row['ceiling_if_free'] >= row['ceiling_at_branch'] > row['ceiling_at_floor']
    assert row['ceiling_at_floor'] == pytest.approx(
        row['base_ms'] / (row['shared_ms'] + row['blocks_branch_ms'] + row['sampling_floor_ms'])
    )
    assert row['sampling_ms'] == pytest.approx(row['blocks_ssb_ms'] - row['blocks_branch_ms'])
    assert row['sampling_share'] == pytest.approx(row['sampling_ms'] / row['blocks_ssb_ms'])
    out = run_script('time_ceiling.py', *args, '--amp', 'bfloat16')
    assert 'bfloat16 autocast' in out and json.loads(path.read_text())['settings']['amp'] == 'bfloat16'


@pytest.mark.slow
def test_calibration_stability_calibrates_in_fresh_processes_leaving_the_cache_alone(tmp_path):
    from timm_ssb.layers.native.calibration import CALIBRATION_FILE
    from timm_ssb.layers.native.cpu.build import cache_dir, cpu_library

    if not cpu_library():
        pytest.skip(f'the native CPU kernels cannot be built here: {cpu_library.error}')
    kept = cache_dir() / CALIBRATION_FILE
    before = kept.read_bytes() if kept.exists() else None
    path = tmp_path / 'stability.json'
    out = run_script('calibration_stability.py', '--processes', '2', '--json', str(path))
    assert 'native chosen' in out and 'of 2' in out
    rows = json.loads(path.read_text())['results']
    assert [(r['dtype'], r['mode'], r['way']) for r in rows] == [
        (dtype, mode, way)
        for dtype in ('float32', 'bfloat16')
        for mode in ('inference', 'training')
        for way in ('down', 'up')
    ]
    for row in rows:
        assert len(row['ratios']) == 2 and all(r > 0 for r in row['ratios'])
        assert row['native_chosen'] == sum(r <= NATIVE_MARGIN for r in row['ratios'])
    assert (kept.read_bytes() if kept.exists() else None) == before


@pytest.mark.slow
def test_kernel_ab_times_a_revisions_kernel_against_the_working_trees(tmp_path):
    from timm_ssb.layers.native.cpu.build import build_tools

    if None in build_tools().values():
        pytest.skip('kernel_ab.py compiles the kernels: no C++ compiler or ninja here')
    path = tmp_path / 'ab.json'
    args = ('--base', 'HEAD', '--ops', 'down,up_into,up_fb', '--stages', 'layer4', '--dtypes', 'float32,bfloat16')
    out = run_script('kernel_ab.py', *args, '--batch-size', '1', '--repeats', '1', '--json', str(path))
    assert 'new / base' in out and 'against HEAD' in out
    payload = json.loads(path.read_text())
    rows = payload['results']
    assert [(r['op'], r['dtype'], r['stage']) for r in rows] == [
        (op, dtype, 'layer4') for dtype in ('float32', 'bfloat16') for op in ('down', 'up_into', 'up_fb')
    ]
    for row in rows:  # one pair each: its ratio is the ratio of the two times
        assert row['ratio'] == pytest.approx(row['new_ms'] / row['base_ms'])
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, cwd=BENCHMARKS).stdout
    assert payload['settings']['base_commit'] == head.strip()
    assert set(payload['sources_sha256']) == {'base', 'new'} and payload['machine']['kernel_arch']


def test_kernel_ab_rejects_an_unknown_op_or_revision():
    ops = subprocess.run(
        [sys.executable, str(BENCHMARKS / 'kernel_ab.py'), '--ops', 'down,sideways'], capture_output=True, text=True
    )
    assert (
        ops.returncode == 2
        and '--ops must be a comma-separated list of down, up, up_into, down_fb, up_fb' in ops.stderr
    )
    base = subprocess.run(
        [sys.executable, str(BENCHMARKS / 'kernel_ab.py'), '--base', 'no-such-revision'], capture_output=True, text=True
    )
    assert base.returncode != 0 and "--base 'no-such-revision': git cannot show" in base.stderr


def test_benchmark_scripts_reject_bad_arguments():
    for name, args in [
        ('sampling_products.py', ['--repeats', '0']),
        ('small_map_convs.py', ['--repeats', '0']),
        ('time_ceiling.py', ['--models', 'resnet50d']),
    ]:
        result = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True)
        assert result.returncode == 2 and ('--repeats must be positive' in result.stderr or '--models' in result.stderr)


def test_gpu_sampling_needs_a_gpu_and_checks_its_arguments():
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / 'gpu_sampling.py'), '--repeats', '0'], capture_output=True, text=True
    )
    assert result.returncode == 2 and '--repeats must be positive' in result.stderr
    if not torch.cuda.is_available():
        result = subprocess.run([sys.executable, str(BENCHMARKS / 'gpu_sampling.py')], capture_output=True, text=True)
        assert result.returncode == 2 and 'needs a CUDA GPU' in result.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device here')
def test_gpu_sampling_writes_table_and_json(tmp_path):
    path = tmp_path / 'gpu_sampling.json'
    out = run_script('gpu_sampling.py', '--batch-size', '2', '--repeats', '1', '--json', str(path))
    assert 'triton down' in out and 'reference f+b' in out
    rows = json.loads(path.read_text())['results']
    assert [r['stage'] for r in rows] == ['layer2', 'layer3', 'layer4']
    ops = ('down', 'up', 'forward_backward', 'matrices', 'matrices_forward_backward')
    assert all(r[f'{b}_{op}_ms'] > 0 for r in rows for b in ('triton', 'reference') for op in ops)


def test_subnormal_products_counts_subnormals_and_records_the_run(tmp_path):
    path = tmp_path / 'subnormal.json'
    out = run_script('subnormal_products.py', '--batch-size', '1', '--rounds', '1', '--iters', '1', '--json', str(path))
    assert 'plain/cut' in out
    payload = json.loads(path.read_text())
    layer2, layer3, layer4 = payload['rows']
    assert (layer2['subnormal_weights'], layer2['weights']) == (18, 16 * 28)  # the plain Gaussian tails hold some
    assert layer2['speedup'] == pytest.approx(layer2['plain_ms'] / layer2['tailless_ms'])
    assert (
        payload['machine']['command'].startswith('python ') and 'subnormal_products.py' in payload['machine']['command']
    )
    assert 'git_commit' in payload['machine'] and path.with_suffix('.txt').read_text().startswith('sampling down')
    bad = subprocess.run(
        [sys.executable, str(BENCHMARKS / 'subnormal_products.py'), '--rounds', '0'], capture_output=True, text=True
    )
    assert bad.returncode == 2 and '--rounds must be a positive int' in bad.stderr


def test_gpu_profile_checks_its_arguments():
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(BENCHMARKS / 'gpu_profile.py'), *args], capture_output=True, text=True
        )

    result = run('--steps', '0')
    assert result.returncode == 2 and '--steps must be positive' in result.stderr
    result = run('--device', 'tpu')
    assert result.returncode == 2 and "--device must be cpu or cuda[:N]; got 'tpu'" in result.stderr
    if not torch.cuda.is_available():
        result = run('--device', 'cuda')
        assert result.returncode == 2 and '--device cuda needs a CUDA GPU' in result.stderr


def test_gpu_profile_writes_table_and_json(tmp_path):
    """On the CPU (the profiler then records operators, not kernels): a row per model with its top entries."""
    path = tmp_path / 'profile.json'
    args = ['--device', 'cpu', '--models', 'ssb_resnetd26', '--batch-size', '1', '--img-size', '64']
    out = run_script(
        'gpu_profile.py', *args, '--warmup', '0', '--steps', '1', '--top', '3', '--shapes', '--json', str(path)
    )
    assert 'ssb_resnetd26:' in out and 'launches per step' in out and '(input shapes)' in out
    (row,) = json.loads(path.read_text())['results']
    assert row['wall_ms'] > 0 and row['busy_ms'] > 0 and row['launches'] >= len(row['top']) == 3
    assert sum(k['ms'] for k in row['top']) <= row['busy_ms'] + 1e-9
    assert row['top'][0]['ms'] >= row['top'][-1]['ms']
    assert len(row['operators']) == 3 and row['operators'][0]['ms'] >= row['operators'][-1]['ms'] > 0
    assert all(op['shapes'].startswith('[') for op in row['operators'])


def test_onnx_inference_writes_table_and_json(tmp_path):
    path = tmp_path / 'onnx.json'
    args = ['--models', 'ssb_resnetd26', '--batch-size', '1', '--img-size', '160', '--rounds', '2', '--iters', '1']
    extra = ['--warmup', '1', '--profile', '--sampling-floor', '--matrices-free', '--json', str(path)]
    out = run_script('onnx_inference.py', *args, *extra)
    assert 'onnxruntime' in out and 'ssb_resnetd26' in out and 'resnet26d' in out
    payload = json.loads(path.read_text())
    (row,) = payload['results']
    assert row['baseline'] == 'resnet26d' and len(row['ratios']) == 2
    assert row['ratio'] == pytest.approx(sum(row['ratios']) / 2)  # the median of two
    spread = f"each round's SSB / baseline, lowest-highest: ssb_resnetd26 {min(row['ratios']):.2f}-"
    assert spread + f'{max(row["ratios"]):.2f}' in out
    assert row['nodes'] > row['baseline_nodes'] > 0
    assert payload['machine']['cpu_isa'] and payload['settings']['onnxruntime']
    assert {'Conv', 'MatMul'} <= set(row['operator_ms']) and 'MatMul' not in row['baseline_operator_ms']
    assert 'ms per run by operator' in out
    # The floor's graph: the resampling as one read (ReduceMean) and a broadcast add, no products, no saliency.
    assert row['sampling_floor_ratio'] > 0 and 'with its resampling at the memory floor' in out
    assert {'ReduceMean', 'Expand', 'Conv'} <= set(row['sampling_floor_operator_ms'])
    assert 'MatMul' not in row['sampling_floor_operator_ms']
    # The uniform sampler's graph: the same products, its matrices constants that onnxruntime folds (no softmax left).
    assert row['matrices_free_ratio'] > 0 and 'with its saliency and matrices free' in out
    assert 'MatMul' in row['matrices_free_operator_ms'] and 'Softmax' in row['operator_ms']
    assert 'Softmax' not in row['matrices_free_operator_ms']


def test_sampling_products_in_bf16_times_the_floors_and_pytorchs_forward(tmp_path):
    path = tmp_path / 'products.json'
    args = ['--batch-size', '1', '--repeats', '1', '--dtype', 'bfloat16', '--json', str(path)]
    out = run_script('sampling_products.py', *args)
    assert 'bfloat16' in out and 'read ms' in out and 'copy ms' in out
    payload = json.loads(path.read_text())
    assert payload['settings']['dtype'] == 'bfloat16'
    keys = ('reference_down_ms', 'reference_up_residual_relu_ms', 'read_ms', 'copy_ms', 'down_fwd_bwd_floor_ms')
    assert all(r[k] > 0 for r in payload['results'] for k in keys)
    assert payload['references']['floor_gmacs_per_s'] > 0


def test_speed_tables_are_made_from_the_result_files():
    """Every CPU class with result files gets its rows, named by the CPU the files record."""
    script = BENCHMARKS.parent / 'tools' / 'doc_tables.py'
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout
    payload = json.loads((BENCHMARKS / 'results' / 'cpu_inference_fp32_avx512_amx_native.json').read_text())
    ratios = ' / '.join(f'{row["ratio"]:.2f}' for row in payload['results'])
    commit = payload['machine']['git_commit'][:7]
    assert f'| Intel Xeon, AVX-512 + AMX: fp32 inference | {ratios}× ({commit})' in out
    assert f'| Intel Xeon, AVX-512 + AMX, kernels for this CPU (-march=native) | {ratios}× ({commit})' in out
    ops = json.loads((BENCHMARKS / 'results' / 'cpu_sampling_products_float32_avx512_amx_native.json').read_text())
    # The median of the per-pair ratios where the file records one (every file since 30dbc1c), else of the times.
    down = ' / '.join(
        f'{r["down_ratio"] if "down_ratio" in r else r["down_ms"] / r["reference_down_ms"]:.2f}' for r in ops['results']
    )
    assert f'| Intel Xeon, AVX-512 + AMX: down | {down} ({ops["machine"]["git_commit"][:7]})' in out
    for path in (BENCHMARKS / 'results').glob('cpu_inference_fp32_*_native.json'):
        machine = json.loads(path.read_text())['machine']
        assert f', {machine["cpu_isa"]}: fp32 inference |' in out, f'{path.name} has no row'


def test_op_ratio_is_the_paired_ratio_where_a_file_has_one():
    """The ops table takes each op's median per-pair ratio; files from before it had one give the ratio of medians."""
    sys.path.insert(0, str(BENCHMARKS.parent / 'tools'))
    import doc_tables

    paired = {'down_ms': 2.0, 'reference_down_ms': 4.0, 'down_ratio': 0.45}
    assert doc_tables.op_ratio(paired, 'down') == 0.45
    assert doc_tables.op_ratio({'down_ms': 2.0, 'reference_down_ms': 4.0}, 'down') == 0.5


def test_speed_tables_keep_a_cpu_class_they_do_not_know(tmp_path, monkeypatch):
    """A class outside the known ones (an AVX-only or SSE CPU, a machine name) is listed after them, not dropped."""
    sys.path.insert(0, str(BENCHMARKS.parent / 'tools'))
    import doc_tables

    for cpu in ('sse', 'avx512', 'avx2'):
        (tmp_path / f'cpu_inference_fp32_{cpu}_native.json').write_text('{}')
    (tmp_path / 'cpu_inference_fp32_avx2_x86-64-v3.json').write_text('{}')
    monkeypatch.setattr(doc_tables, 'RESULTS', tmp_path)
    assert doc_tables.measured_cpus() == ['avx512', 'avx2', 'sse']


def test_cpu_isa_script_names_an_unknown_setting():
    """A mistyped SETTINGS word stops run_cpu_isa.sh before anything runs, naming it and the allowed ones, rather
    than measuring nothing for it."""
    env = {**os.environ, 'SETTINGS': 'inference_fp32 compiled_inference'}
    result = subprocess.run(['bash', str(BENCHMARKS / 'run_cpu_isa.sh')], env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert "SETTINGS: unknown setting 'compiled_inference'" in result.stderr
    assert 'compiled_inference_fp32' in result.stderr and not result.stdout


def test_cpu_isa_script_runs_the_settings_the_tables_list():
    """run_cpu_isa.sh's settings are the tables' (tools/doc_tables.py: the models' settings, and the sampling ops):
    a setting added to one but not the other would be measured and never shown, or shown and never measured."""
    sys.path.insert(0, str(BENCHMARKS.parent / 'tools'))
    import doc_tables

    script = (BENCHMARKS / 'run_cpu_isa.sh').read_text()
    known = next(line for line in script.splitlines() if line.startswith('known='))
    assert set(known.split('=', 1)[1].strip('"').split()) == {*doc_tables.SETTINGS, 'sampling'}


def test_cpu_table_lists_the_settings_measured_on_each_cpu(tmp_path, monkeypatch):
    """A setting gets a CPU class's row where one of its builds has a result file (the compiled rows, which the
    default table run leaves out, among them), and a column of the README's summary where any class has one; the
    targets table has no column for the compiled settings."""
    sys.path.insert(0, str(BENCHMARKS.parent / 'tools'))
    import doc_tables

    machine = {'processor': 'AMD EPYC 9R14', 'cpu_isa': 'AVX-512', 'git_commit': 'abcdef0123'}
    for setting, ratio in (('inference_fp32', 1.3), ('compiled_inference_fp32', 1.4)):
        payload = {'machine': machine, 'results': [{'model': 'ssb_resnetd50', 'ratio': ratio}]}
        (tmp_path / f'cpu_{setting}_avx512_native.json').write_text(json.dumps(payload))
    monkeypatch.setattr(doc_tables, 'RESULTS', tmp_path)
    table = doc_tables.cpu_table()
    assert '| AMD EPYC 9R14, AVX-512: fp32 inference | 1.30× (abcdef0) | – |' in table
    assert '| AMD EPYC 9R14, AVX-512: fp32 inference, torch.compile | 1.40× (abcdef0) | – |' in table
    assert 'training' not in table and 'bf16' not in table
    header = doc_tables.targets_table().splitlines()[0]
    assert 'fp32 inference |' in header and 'torch.compile' not in header
    summary = doc_tables.summary_table().splitlines()
    assert summary[0] == '| | fp32 inference | fp32 inference, torch.compile |'
    native = '| AMD EPYC 9R14, AVX-512, kernels for this CPU (-march=native) |'
    assert summary[2] == f'{native} 1.30× (abcdef0) | 1.40× (abcdef0) |'


def test_targets_table_counts_the_cells_at_their_targets(tmp_path):
    """Each cell is compared with its model's target unrounded: a ratio that prints as its target but misses it
    shows three decimals; the sampling ops count the float32 cells at most 0.5 and name the largest (and the largest
    floor)."""
    sys.path.insert(0, str(BENCHMARKS.parent / 'tools'))
    import doc_tables

    rows = [('ssb_resnetd50', 1.2496), ('ssb_resnetd101', 1.52), ('ssb_resnetd152', 1.61), ('ssb_resnetrs152', 1.65)]
    models = tmp_path / 'models.json'
    models.write_text(json.dumps({'results': [{'model': m, 'ratio': r} for m, r in rows]}))
    cell = doc_tables.model_targets_cell(models, SPEED_TARGETS['inference_fp32'])
    assert cell == '2 of 4: D-50 1.250 (1.25), D-152 1.61 (1.65)'
    onnx = tmp_path / 'onnx.json'
    onnx.write_text(json.dumps({'results': [{'model': 'ssb_resnetd50', 'ratio': 1.3}]}))
    assert doc_tables.model_targets_cell(onnx, SPEED_TARGETS['onnx']) == '1 of 1'
    assert doc_tables.model_targets_cell(tmp_path / 'none.json', SPEED_TARGETS['onnx']) == '–'
    ops = tmp_path / 'ops.json'
    keys = list(doc_tables.OPS.values())
    layers = [{f'{k}_ratio': 0.4 for k in keys}, {**{f'{k}_ratio': 0.5 for k in keys}, 'down_ratio': 0.62}]
    ops.write_text(json.dumps({'results': layers}))
    assert doc_tables.ops_targets_cell(ops) == '7 of 8 (largest 0.62)'
    for layer, floor in zip(layers, (0.2, 0.31), strict=True):  # a file that measured the ops' floors says them
        layer.update({f'{k}_floor_ratio': floor for k in keys})
    ops.write_text(json.dumps({'results': layers}))
    assert doc_tables.ops_targets_cell(ops) == '7 of 8 (largest 0.62; floors of the misses: all at most 0.31)'
    layers[1]['up_fwd_bwd_ratio'] = 0.7  # a second miss, whose floor is above the target: out of reach
    layers[1]['up_fwd_bwd_floor_ratio'] = 0.55
    ops.write_text(json.dumps({'results': layers}))
    assert (
        doc_tables.ops_targets_cell(ops)
        == '6 of 8 (largest 0.70; floors of the misses: 1 above 0.5, the others at most 0.31)'
    )
    layers[1]['down_floor_ratio'] = 0.52
    ops.write_text(json.dumps({'results': layers}))
    assert doc_tables.ops_targets_cell(ops) == '6 of 8 (largest 0.70; floors of the misses: 2 above 0.5)'


def test_the_pages_tables_are_the_result_files():
    """The README and the docs hold the tables the result files give (speed, experiments: no typed figure drifts)."""
    script = BENCHMARKS.parent / 'tools' / 'doc_tables.py'
    result = subprocess.run([sys.executable, str(script), '--check'], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_traffic_model_counts_what_the_kernel_reads_and_writes():
    """benchmarks/traffic_model.py on a case counted by hand: identity matrices on a (32, 4, 4) bfloat16 map. Each of
    the 4 programs (one per output row, one column tile, one channel tile) reads one input row of 4 pixels x 32
    channels (256 bytes), scans its matrix_y row (4 taps, then the 1 in its band) and the tile's matrix_x rows
    twice (4 x 4 floats for the bands, 4 x 4 for the weights): 404 bytes; it stores 4 x 32 x 2 = 256 bytes."""
    sys.path.insert(0, str(BENCHMARKS))
    import traffic_model

    eye = torch.eye(4)
    traffic = traffic_model.kernel_traffic(eye, eye, channels=32, itemsize=2, residual=False)
    assert traffic == {'loads': 4 * 404, 'stores': 1024, 'floor': 2048, 'full_map_bytes': 1024}
    with_residual = traffic_model.kernel_traffic(eye, eye, channels=32, itemsize=2, residual=True)
    assert with_residual['loads'] == 4 * (404 + 256) and with_residual['floor'] == 2048 + 1024
    out = run_script('traffic_model.py', '--batch-size', '2')
    assert 'layer2  down' in out and 'up + residual + ReLU' in out
