"""Cluttered digits: real handwritten digits placed at random on a larger canvas among fragments of others.

scikit-learn's 1,797 8x8 digit scans, enlarged, pasted at a random place on a canvas (the cluttered-MNIST task of
spatial transformers, on data that ships with scikit-learn) with fragments of other digits as clutter. Shared by
the experiments in this folder (``ablation_cluttered_digits.py``, ``warm_start_digits.py``): the data, one training
loop (AdamW, one-cycle schedule, label smoothing; optional logit distillation from a teacher) and the test accuracy.
Every run is deterministic per seed on one machine (same seed, same threads: the same weights).
"""

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

CANVAS = 96
DIGIT = 16
FRAGMENT = 6
FRAGMENTS = 8


@dataclass(frozen=True)
class Canvas:
    """How the canvases are drawn: side, the digit's side, the fragments' side and count."""

    side: int = CANVAS
    digit: int = DIGIT
    fragment: int = FRAGMENT
    fragments: int = FRAGMENTS


DEFAULT_CANVAS = Canvas()
"""The canvas of the committed results: a 16x16 digit and 8 fragments of 6x6 on 96x96."""


def load_digits(side: int = DIGIT) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(images (N, side, side) in [0, 1], labels (N,))``: the 8x8 scans enlarged bilinearly."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0  # (N, 8, 8) in [0, 1]
    images = F.interpolate(images.unsqueeze(1), size=(side, side), mode='bilinear', align_corners=False)
    return images.squeeze(1).clamp(0, 1), torch.tensor(data.target)


def cluttered_canvases(
    digits: torch.Tensor, clutter_source: torch.Tensor, generator: torch.Generator, canvas: Canvas = DEFAULT_CANVAS
) -> torch.Tensor:
    """``(N, 1, side, side)``: each digit at a random place, over ``canvas.fragments`` random fragments of
    ``clutter_source`` digits (max-composited)."""
    n, side, digit = len(digits), canvas.side, digits.shape[-1]
    out = torch.zeros(n, side, side)
    fragment = min(canvas.fragment, digit)
    for i in range(n):
        for _ in range(canvas.fragments):
            src = clutter_source[torch.randint(len(clutter_source), (1,), generator=generator)].squeeze(0)
            sy, sx = torch.randint(0, digit - fragment + 1, (2,), generator=generator).tolist()
            y, x = torch.randint(0, side - fragment + 1, (2,), generator=generator).tolist()
            patch = out[i, y : y + fragment, x : x + fragment]
            torch.maximum(patch, src[sy : sy + fragment, sx : sx + fragment], out=patch)
        y, x = torch.randint(0, side - digit + 1, (2,), generator=generator).tolist()
        region = out[i, y : y + digit, x : x + digit]
        torch.maximum(region, digits[i], out=region)
    return out.unsqueeze(1)


def split(labels: torch.Tensor, test_fraction: float = 0.25) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(train, test)`` indices: one fixed random split."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_test = int(len(labels) * test_fraction)
    return order[n_test:], order[:n_test]


def make_data(canvas: Canvas = DEFAULT_CANVAS) -> Dict[str, torch.Tensor]:
    """The training digits (canvases are drawn anew every epoch) and the fixed test canvases."""
    digits, labels = load_digits(canvas.digit)
    train_idx, test_idx = split(labels)
    return {
        'train_digits': digits[train_idx],
        'train_y': labels[train_idx],
        'test_x': cluttered_canvases(digits[test_idx], digits[train_idx], torch.Generator().manual_seed(7), canvas),
        'test_y': labels[test_idx],
    }


def accuracy(model: torch.nn.Module, data: Dict[str, torch.Tensor]) -> float:
    """Top-1 accuracy on the test canvases."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data['test_x']), 256):
            x = data['test_x'][start : start + 256].contiguous(memory_format=torch.channels_last)
            correct += (model(x).argmax(1) == data['test_y'][start : start + 256]).sum().item()
    return correct / len(data['test_y'])


def train(
    model: torch.nn.Module,
    data: Dict[str, torch.Tensor],
    seed: int,
    epochs: int,
    batch_size: int,
    lr: float,
    canvas: Canvas = DEFAULT_CANVAS,
    teacher: Optional[torch.nn.Module] = None,
    temperature: float = 1.0,
    distill_weight: float = 0.5,
    after_epoch: Optional[Callable[[int, torch.nn.Module], None]] = None,
    saliency_lr_scale: float = 1.0,
) -> torch.nn.Module:
    """Train ``model`` (channels-last) for ``epochs`` on fresh canvases each epoch: AdamW (weight decay 0.05),
    one-cycle to ``lr``, label smoothing 0.1. With a ``teacher``, the loss is ``(1 - distill_weight)`` times the
    task's plus ``distill_weight`` times the KL divergence from the teacher's logits at ``temperature`` (scaled
    by its square), as timm's ``LogitDistillationTask``. ``after_epoch(epoch, model)`` is called after each epoch
    (1-based). ``saliency_lr_scale`` other than 1 gives the saliency convs their own group: that multiple of the
    learning rate, no weight decay."""
    model = model.to(memory_format=torch.channels_last)
    params, max_lr = model.parameters(), lr
    if saliency_lr_scale != 1.0:
        named = list(model.named_parameters())
        saliency = [p for name, p in named if '.saliency.' in name]
        params = [
            {'params': [p for name, p in named if '.saliency.' not in name]},
            {'params': saliency, 'lr': lr * saliency_lr_scale, 'weight_decay': 0.0},
        ]
        max_lr = [lr, lr * saliency_lr_scale]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(len(data['train_y']) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(1000 + seed)
    if teacher is not None:
        teacher = teacher.to(memory_format=torch.channels_last).eval()
    for epoch in range(1, epochs + 1):
        model.train()
        canvases = cluttered_canvases(data['train_digits'], data['train_digits'], generator, canvas)
        order = torch.randperm(len(canvases), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            x = canvases[idx].contiguous(memory_format=torch.channels_last)
            logits = model(x)
            loss = F.cross_entropy(logits, data['train_y'][idx], label_smoothing=0.1)
            if teacher is not None:
                with torch.no_grad():
                    target = F.log_softmax(teacher(x) / temperature, dim=-1)
                distill = F.kl_div(
                    F.log_softmax(logits / temperature, dim=-1), target, reduction='batchmean', log_target=True
                )
                loss = (1 - distill_weight) * loss + distill_weight * distill * temperature**2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if after_epoch is not None:
            after_epoch(epoch, model)
    return model


def write_result(out_dir: str, name: str, text: str, payload: Dict[str, Any]) -> Path:
    """Print ``text`` and write it to ``out_dir/name.txt``, ``payload`` to ``name.json``; returns ``out_dir``."""
    print(text)
    folder = Path(out_dir)
    os.makedirs(folder, exist_ok=True)
    (folder / f'{name}.txt').write_text(text + '\n')
    (folder / f'{name}.json').write_text(json.dumps(payload, indent=2) + '\n')
    return folder
