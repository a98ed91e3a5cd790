"""The ablation's data: real digits on cluttered canvases (benchmarks/ablation_cluttered_digits.py)."""

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'ablation_cluttered_digits.py'
spec = importlib.util.spec_from_file_location('ablation_cluttered_digits', SCRIPT)
ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation)


def test_digits_and_split():
    digits, labels = ablation.load_digits()
    assert digits.shape == (1797, ablation.DIGIT, ablation.DIGIT) and set(labels.tolist()) == set(range(10))
    assert digits.min() >= 0 and digits.max() <= 1
    train, test = ablation.split(labels)
    assert len(set(train.tolist()) & set(test.tolist())) == 0 and len(train) + len(test) == 1797


def test_canvases_hold_the_digit_somewhere_with_clutter():
    digits, _ = ablation.load_digits()
    canvases = ablation.cluttered_canvases(digits[:4], digits[100:200], torch.Generator().manual_seed(0))
    assert canvases.shape == (4, 1, ablation.CANVAS, ablation.CANVAS)
    for canvas, digit in zip(canvases[:, 0], digits[:4], strict=True):
        windows = canvas.unfold(0, ablation.DIGIT, 1).unfold(1, ablation.DIGIT, 1)  # every 16x16 window
        assert ((windows >= digit - 1e-6).flatten(2).all(-1)).any()  # the digit is pasted (max-composited)
        assert canvas.sum() > digit.sum()  # and there is clutter besides it
    again = ablation.cluttered_canvases(digits[:4], digits[100:200], torch.Generator().manual_seed(0))
    assert torch.equal(canvases, again)
