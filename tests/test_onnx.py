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
    # 192 x 192: stage 2 samples 24 x 24 to 12 x 12 (exported in NCHW order), stages 3 and 4 are exported in NHWC
    # order (12 x 12 -> 6 x 6, 6 x 6 -> 3 x 3)
    model = make_live(timm.create_model('ssb_resnet', ssb_source='resnet26d', ssb_sizes=(12, 6, 3))).eval()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 192, 192).contiguous(memory_format=torch.channels_last)
    path = tmp_path / 'model.onnx'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo, input_names=['x'], output_names=['logits'])
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / 'optimized.onnx')
    session = onnxruntime.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
    # the permutes into and out of NHWC order cancel between blocks: what onnxruntime keeps of them is one permute of
    # a map per NHWC stage, at its end (a stage of resnet26d has one SSB block, so the test sees that they cancel
    # within the block: the saliency, the way down and the residual read one order)
    optimized = onnx.load(str(tmp_path / 'optimized.onnx')).graph.node
    map_permutes = [n for n in optimized if n.op_type == 'Transpose' and len(n.attribute[0].ints) == 4]
    assert len(map_permutes) == 2, [n.name for n in map_permutes]
    assert not any(node.domain.startswith('timm_ssb') for node in onnx.load(str(path)).graph.node)
    with torch.no_grad():
        expected = model(x)
    (out,) = session.run(None, {'x': x.numpy()})
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-4, atol=1e-4 * expected.abs().max().item())
