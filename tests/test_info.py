"""``timm-ssb info``: what it reports, and the first-use build it reports on (tools, cache, rebuilds)."""

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import timm_ssb.info as info
import timm_ssb.layers.native.calibration as calibration
from timm_ssb.cli import main
from timm_ssb.layers.native.cpu import build

INFO = (sys.executable, '-m', 'timm_ssb.info')


def info_env(tmp_path: Path, path: str = None, **env: str) -> dict:
    """This process's environment with the kernel cache in ``tmp_path / 'cache'``, ``PATH`` set to ``path`` if given
    and ``env`` set (an empty value removes the variable)."""
    environ = {**os.environ, 'TIMM_SSB_CACHE': str(tmp_path / 'cache'), **env}
    environ.pop('TRITON_INTERPRET', None)
    if path is not None:
        environ['PATH'] = path
    return {k: v for k, v in environ.items() if v}


def run_info(tmp_path: Path, *args: str, path: str = None, **env: str) -> subprocess.CompletedProcess:
    """``python -m timm_ssb.info`` in a fresh process, in :func:`info_env`."""
    return subprocess.run(
        [*INFO, *args], env=info_env(tmp_path, path, **env), capture_output=True, text=True, timeout=600
    )


def test_info_reports_this_machine_and_the_built_kernels(capsys):
    assert main(['info']) == 0
    out = capsys.readouterr().out
    assert 'vector isa: ' in out and 'torch ' in out and 'timm ' in out
    assert 'built and loaded: yes' in out
    assert f'cache: {build.cache_dir()}' in out
    assert f'built for: {" ".join(build.arch_flags())}' in out  # -march=native here; nothing on Apple silicon
    compile_flags, link_flags = (' '.join(flags) for flags in build.openmp_flags())
    assert f"OpenMP, torch's runtime: {compile_flags} (link: {link_flags})" in out


@pytest.mark.parametrize(
    'setting,kernel,variable,said,tip',
    [
        ('always [madvise] never', 'madvise', None, 'no (THP_MEM_ALLOC_ENABLE unset; ', True),
        ('always [madvise] never', 'madvise', '1', 'yes (THP_MEM_ALLOC_ENABLE=1; ', False),
        ('[always] madvise never', 'always', '0', 'no (THP_MEM_ALLOC_ENABLE=0; ', True),
        ('always madvise [never]', 'never', '1', 'no (', False),
        (None, None, None, 'no (', False),
    ],
)
def test_info_says_whether_torchs_cpu_tensors_get_huge_pages(
    monkeypatch, tmp_path, setting, kernel, variable, said, tip
):
    """PyTorch's allocator puts its CPU tensors on transparent huge pages with THP_MEM_ALLOC_ENABLE=1 where the
    kernel allows it (madvise or always; a machine without the setting, as off Linux, has none)."""
    path = tmp_path / 'enabled'
    if setting is not None:
        path.write_text(setting + '\n')
    if variable is None:
        monkeypatch.delenv('THP_MEM_ALLOC_ENABLE', raising=False)
    else:
        monkeypatch.setenv('THP_MEM_ALLOC_ENABLE', variable)
    monkeypatch.setattr(info, 'THP_SETTING', path)
    report = info.collect()
    assert report['huge_pages'] == {'thp_mem_alloc_enable': variable, 'kernel': kernel}
    prefix = "huge pages for torch's CPU tensors: "
    (line,) = [line for line in info.format_report(report).splitlines() if line.startswith(prefix)]
    assert line.startswith(prefix + said) and f"the kernel's transparent huge pages: {kernel or 'none'})" in line
    assert ('-- tip: THP_MEM_ALLOC_ENABLE=1 in the environment' in line) == tip


@pytest.fixture
def own_calibration(monkeypatch, tmp_path):
    """The calibration kept in ``tmp_path`` (the kernels stay loaded), not in the user's cache; its measurements."""
    monkeypatch.setattr(calibration, 'cache_dir', lambda: tmp_path)
    monkeypatch.setattr(calibration, '_memory', {})
    measured = []
    measure = calibration._measure
    monkeypatch.setattr(calibration, '_measure', lambda *args: measured.append(args) or measure(*args))
    return measured


def test_info_check_tests_each_implementation_and_times_native_against_pytorch(capsys, own_calibration):
    assert main(['info', '--check', '--json']) == 0
    report = json.loads(capsys.readouterr().out)
    assert report['problems'] == []
    rows = {row['implementation']: row for row in report['self_test']}
    assert rows['C++ (CPU)']['ok'] and rows['C++ (CPU)']['max_relative_error'] < 1e-5
    assert 'Triton (interpreter)' in rows and rows['Triton (interpreter)']['ok']  # the suite sets TRITON_INTERPRET
    timings = report['cpu_kernels']['faster_than_pytorch']
    assert set(timings) == {'float32 inference', 'float32 training', 'bfloat16 inference', 'bfloat16 training'}
    assert all(t[name] > 0 for t in timings.values() for name in ('down_native_ms', 'up_reference_ms'))
    assert len(own_calibration) == 4
    assert main(['info', '--check']) == 0 and len(own_calibration) == 4  # kept
    assert main(['info', '--check', '--recalibrate']) == 0 and len(own_calibration) == 8
    assert 'auto uses' in capsys.readouterr().out
    with pytest.raises(SystemExit, match='--recalibrate needs --check'):
        main(['info', '--recalibrate'])


def test_a_forced_backend_that_cannot_run_is_a_nonzero_exit(built):
    result = run_info(built, TIMM_SSB_SAMPLING_BACKEND='triton')  # no GPU, no interpreter
    assert result.returncode == 1, result.stderr
    assert 'problem: TIMM_SSB_SAMPLING_BACKEND=triton, but the Triton kernels cannot run here' in result.stdout
    assert 'can run: no (no CUDA GPU' in result.stdout


def seed_cache(tmp_path: Path) -> Path:
    """The kernels this process built, copied into ``tmp_path / 'cache'`` where ``run_info`` looks for them: the
    cached state of a second run, without building again (a build is 20-60 s of the suite)."""
    build.cpu_library.require()
    built_here = build.cache_dir()
    shutil.copytree(built_here, tmp_path / 'cache' / built_here.name)
    return tmp_path


@pytest.fixture(scope='module')
def built(tmp_path_factory) -> Path:
    """A folder with a kernel cache that the tests of this module share."""
    return seed_cache(tmp_path_factory.mktemp('built'))


@pytest.mark.parametrize('backend', ['reference', 'native'])
def test_a_backend_that_can_run_exits_zero_and_is_named(built, backend):
    result = run_info(built, TIMM_SSB_SAMPLING_BACKEND=backend)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f'sampling backend: {backend} (set by TIMM_SSB_SAMPLING_BACKEND)' in result.stdout
    assert 'built and loaded: yes' in result.stdout and 'problem:' not in result.stdout


@pytest.mark.parametrize('backend,exit_code', [('auto', 0), ('native', 1)])
def test_no_compiler_is_reported_with_its_fix(tmp_path, backend, exit_code):
    result = run_info(tmp_path, CXX=str(tmp_path / 'no-such-c++'), TIMM_SSB_SAMPLING_BACKEND=backend)
    assert result.returncode == exit_code, result.stderr
    assert 'compiler: no -- fix: install a C++20 compiler' in result.stdout
    assert 'built and loaded: no' in result.stdout and 'no C++ compiler' in result.stdout
    assert ('problem: TIMM_SSB_SAMPLING_BACKEND=native' in result.stdout) == (backend == 'native')


@pytest.mark.parametrize('backend,exit_code', [('auto', 0), ('native', 1)])
def test_a_bad_cpu_arch_is_reported_with_its_fix(tmp_path, backend, exit_code):
    result = run_info(tmp_path, TIMM_SSB_CPU_ARCH='native -O0', TIMM_SSB_SAMPLING_BACKEND=backend)
    assert result.returncode == exit_code, result.stderr
    assert "built for: nothing (TIMM_SSB_CPU_ARCH='native -O0' is not a -march value)" in result.stdout
    assert 'built and loaded: no -- fix: unset TIMM_SSB_CPU_ARCH or set it to a -march value' in result.stdout
    assert not (tmp_path / 'cache').exists()


def test_an_unwritable_cache_is_reported_with_its_fix(tmp_path):
    blocker = tmp_path / 'cache'
    blocker.write_text('a file where the cache folder should be')
    result = run_info(tmp_path)
    assert result.returncode == 0, result.stderr
    assert 'built and loaded: no' in result.stdout and 'set TIMM_SSB_CACHE to a writable folder' in result.stdout


def test_a_cache_that_cannot_be_locked_is_reported_with_its_fix(tmp_path):
    """The build's lock file cannot be made (here a folder holds its name; on a read-only cache, the same)."""
    directory = build.cache_dir().name  # this process's build key: the same sources, torch, flags and CPU
    (tmp_path / 'cache' / f'{directory}.lock').mkdir(parents=True)
    result = run_info(tmp_path)
    assert result.returncode == 0, result.stderr
    assert 'built and loaded: no' in result.stdout and 'cannot lock the cache' in result.stdout
    assert 'set TIMM_SSB_CACHE to a writable folder' in result.stdout


def compiler_only_path(tmp_path: Path) -> str:
    """A PATH with the C++ toolchain and nothing else: no system ninja (as on most machines)."""
    tools = tmp_path / 'bin'
    tools.mkdir(parents=True)
    for name in ('c++', 'g++', 'gcc', 'cc', 'as', 'ld', 'ld.bfd', 'ld.gold', 'cpp'):
        found = shutil.which(name)
        if found:
            (tools / name).symlink_to(found)
    return str(tools)


@pytest.mark.slow
def test_first_build_without_system_ninja_uses_the_ninja_package_and_says_so(tmp_path):
    result = run_info(tmp_path, path=compiler_only_path(tmp_path))
    assert result.returncode == 0, result.stderr
    assert 'built and loaded: yes' in result.stdout, result.stdout + result.stderr
    import ninja  # a dependency of this package

    assert f'ninja: {shutil.which("ninja", path=ninja.BIN_DIR)}' in result.stdout
    building = [line for line in result.stderr.splitlines() if line.startswith('timm_ssb: building')]
    assert len(building) == 1 and str(tmp_path / 'cache') in building[0]
    again = run_info(tmp_path, path=compiler_only_path(tmp_path / 'again'))  # cached: no build, nothing said
    assert 'built and loaded: yes' in again.stdout and 'timm_ssb: building' not in again.stderr


@pytest.mark.slow
def test_a_cached_library_that_does_not_load_is_rebuilt_once(tmp_path):
    first = run_info(seed_cache(tmp_path))
    assert 'built and loaded: yes' in first.stdout, first.stdout + first.stderr
    (library,) = (tmp_path / 'cache').glob('*/*.so')
    library.write_bytes(library.read_bytes()[:1000])  # cut short, as by a full disk
    second = run_info(tmp_path)
    assert second.returncode == 0 and 'built and loaded: yes' in second.stdout, second.stdout + second.stderr
    assert 'differs from what its build recorded; rebuilding it' in second.stderr
    assert library.stat().st_size > 1000


def test_a_process_arriving_while_another_builds_waits_for_its_library(tmp_path):
    """Processes starting together on a fresh machine (DDP ranks, the suite's workers): one has linked the library and
    not yet recorded it when another starts. The second waits for the first, then loads its library; it must not take it
    for a damaged one and rebuild."""
    seed_cache(tmp_path)
    (directory,) = (p for p in (tmp_path / 'cache').iterdir() if p.is_dir())
    (library,) = directory.glob('*.so')
    digest = directory / 'library.sha256'
    record, built = digest.read_text(), library.stat().st_mtime_ns
    digest.unlink()
    said = queue.Queue()
    with build.build_lock(directory):  # the builder, between its link and its record
        second = subprocess.Popen(
            INFO, env=info_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        threading.Thread(target=lambda: [said.put(line) for line in second.stderr], daemon=True).start()
        first_word = next(line for line in iter(lambda: said.get(timeout=120), None) if line.startswith('timm_ssb:'))
        assert first_word.startswith('timm_ssb: waiting for another process'), first_word
        digest.write_text(record)
    out = second.stdout.read()  # its stderr is the thread's
    second.wait(timeout=600)
    assert second.returncode == 0 and 'built and loaded: yes' in out, out
    assert library.stat().st_mtime_ns == built and digest.read_text() == record
