import os

import pytest
import torch

os.environ.pop('TIMM_SSB_HUB_ORG', None)  # read at import: the suite tests the defaults (placeholder .in1k tags)

if not torch.cuda.is_available():
    # The Triton kernel's tests run it on CPU tensors in Triton's interpreter; Triton reads this when the kernel is
    # defined (its module's import, at first use), and it changes nothing for the other tests.
    os.environ.setdefault('TRITON_INTERPRET', '1')

import timm_ssb  # noqa: E402, F401  (registers the models)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (pytest-xdist): a worker process per CPU this process may run on, at most 4. Beyond that the
    suite's longest tests (about a minute each) bound its time, and every worker holds its own torch and models."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    return min(cpus, 4)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def no_tf32():
    """fp32 matrix products on CUDA without TF32 (to compare at 1e-5), the setting restored afterwards.

    Set and restored by hand: pytest's monkeypatch undoes by ``delattr``, which torch's cuBLAS module refuses.
    """
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    matmul.allow_tf32 = False
    yield
    matmul.allow_tf32 = saved


@pytest.fixture(autouse=True)
def _native_kernels_wherever_they_serve(monkeypatch):
    """Under the backend ``'auto'`` the suite runs the native CPU kernels wherever they serve, so that what a test
    compares does not depend on which path this machine measured faster (the tests of that choice set it
    themselves; ``calibrate`` itself is not patched)."""
    from timm_ssb.layers.native import dispatch

    monkeypatch.setattr(dispatch, 'native_resample_is_faster', lambda dtype, training, up: True)
