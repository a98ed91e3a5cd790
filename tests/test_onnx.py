"""ONNX export of an SSB model with both ``torch.onnx.export`` exporters, run in onnxruntime.

Exporting takes the PyTorch sampling path whatever the backend (the native kernel is a custom op ONNX does not
know), so the exported graph holds standard ops only; the model is exported while the native kernel is in use
for eager runs, and onnxruntime's outputs are compared with eager PyTorch's.
"""

import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
import timm
import torch

from ssb_reference import make_live
from timm_ssb.layers.native import get_sampling_backend, set_sampling_backend


@pytest.fixture
def native_backend():
    saved = get_sampling_backend()
    set_sampling_backend('native')
    yield
    set_sampling_backend(saved)


@pytest.mark.slow
@pytest.mark.parametrize('dynamo', [False, True])
def test_onnx_export_matches_torch_in_onnxruntime(dynamo, tmp_path, native_backend):
    # 160 x 160: stage 2 samples 20 x 20 to 10 x 10 (exported as separable products), stages 3 and 4 take the
    # Kronecker form (10 x 10 -> 3 x 3, 5 x 5 -> 2 x 2)
    model = make_live(timm.create_model('ssb_resnet', ssb_source='resnet26d', ssb_sizes=(10, 3, 2))).eval()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 160, 160).contiguous(memory_format=torch.channels_last)
    path = tmp_path / 'model.onnx'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo, input_names=['x'], output_names=['logits'])
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    assert not any(node.domain.startswith('timm_ssb') for node in onnx.load(str(path)).graph.node)
    with torch.no_grad():
        expected = model(x)
    (out,) = session.run(None, {'x': x.numpy()})
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-4, atol=1e-4 * expected.abs().max().item())
