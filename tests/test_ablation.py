"""The experiments on cluttered digits (benchmarks/cluttered_digits.py and the scripts that use it): the data,
determinism per seed, and that the committed results match the scripts."""

import importlib.util
import json
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / 'benchmarks'
sys.path.insert(0, str(BENCHMARKS))  # the scripts import cluttered_digits, as they do when run from there
import cluttered_digits  # noqa: E402

SCRIPT = BENCHMARKS / 'ablation_cluttered_digits.py'
spec = importlib.util.spec_from_file_location('ablation_cluttered_digits', SCRIPT)
ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation)


def test_digits_and_split():
    digits, labels = cluttered_digits.load_digits()
    assert digits.shape == (1797, cluttered_digits.DIGIT, cluttered_digits.DIGIT) and set(labels.tolist()) == set(
        range(10)
    )
    assert digits.min() >= 0 and digits.max() <= 1
    train, test = cluttered_digits.split(labels)
    assert len(set(train.tolist()) & set(test.tolist())) == 0 and len(train) + len(test) == 1797


def test_canvases_hold_the_digit_somewhere_with_clutter():
    digits, _ = cluttered_digits.load_digits()
    canvases = cluttered_digits.cluttered_canvases(digits[:4], digits[100:200], torch.Generator().manual_seed(0))
    assert canvases.shape == (4, 1, cluttered_digits.CANVAS, cluttered_digits.CANVAS)
    for canvas, digit in zip(canvases[:, 0], digits[:4], strict=True):
        windows = canvas.unfold(0, cluttered_digits.DIGIT, 1).unfold(1, cluttered_digits.DIGIT, 1)  # every 16x16 window
        assert ((windows >= digit - 1e-6).flatten(2).all(-1)).any()  # the digit is pasted (max-composited)
        assert canvas.sum() > digit.sum()  # and there is clutter besides it
    again = cluttered_digits.cluttered_canvases(digits[:4], digits[100:200], torch.Generator().manual_seed(0))
    assert torch.equal(canvases, again)


def test_a_run_is_deterministic_per_seed():
    """Same seed, same threads: the same weights and accuracy (what the committed results rely on)."""
    digits, labels = cluttered_digits.load_digits()
    data = {
        'train_digits': digits[:96],
        'train_y': labels[:96],
        'test_x': cluttered_digits.cluttered_canvases(digits[96:160], digits[:96], torch.Generator().manual_seed(7)),
        'test_y': labels[96:160],
    }
    kwargs = ablation.sampler_kwargs('ssb_resnetd26', 'adaptive', 0.05)
    runs = [ablation.train_one(dict(kwargs), 3, data, epochs=1, batch_size=32, lr=3e-3) for _ in range(2)]
    (acc_a, model_a), (acc_b, model_b) = runs
    assert acc_a == acc_b
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    saliency = [v for k, v in model_a.state_dict().items() if k.endswith('saliency.weight')]
    assert saliency and all(torch.count_nonzero(v) > 0 for v in saliency)  # the adaptive layers did train


def test_result_files_match_the_script():
    """Every committed ablation result was written by this script's current form: its settings are the
    script's arguments, and each run records the model arguments it was trained with."""
    parser_defaults = {'samplers', 'model', 'seeds', 'epochs', 'batch_size', 'lr', 'sigma_g', 'sizes', 'threads'}
    parser_defaults |= {'digit', 'fragments'}
    for path in sorted((SCRIPT.parent / 'results').glob('ablation_cluttered_digits*.json')):
        result = json.loads(path.read_text())
        assert parser_defaults <= set(result['settings']), path.name
        assert result['machine']['command'].startswith('python benchmarks/ablation_cluttered_digits.py'), path.name
        assert result['machine']['git_commit'] and result['machine']['git_dirty'] is False, path.name
        for run in result['runs']:
            assert run['model_kwargs']['ssb_sampler'] == run['sampler'], path.name
