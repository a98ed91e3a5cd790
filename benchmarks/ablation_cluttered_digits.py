"""Does adaptive sampling help where *where to look* matters? A real-data ablation on 2 CPU cores.

Task: scikit-learn's real handwritten digits (1,797 8x8 scans), enlarged to 16x16 and placed at a
random position on a 96x96 canvas cluttered with fragments of other digits (the cluttered-MNIST test of
spatial transformers, on data that ships with scikit-learn). Model: a narrow SSB-ResNet-D-26
(channels 16-32-64-128) with the same sampling sizes for every sampler, so GMACs are equal up to the
adaptive sampler's saliency convs. Each sampler is trained from scratch with several seeds; the test
canvases are fixed, the training canvases drawn anew every epoch.

    python benchmarks/ablation_cluttered_digits.py            # ~8 minutes on 2 cores
    python benchmarks/ablation_cluttered_digits.py --epochs 2 --seeds 0 --samplers uniform   # smoke run

Writes ``benchmarks/results/ablation_cluttered_digits.{json,txt,png}``: the table (accuracy mean and
std per sampler), every run, the settings and machine, and what the adaptive layers learned to look at.
"""

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import timm
import torch
import torch.nn.functional as F

import timm_ssb  # noqa: F401  (registers the models)
from timm_ssb.benchmark import machine_info
from timm_ssb.complexity import model_complexity
from timm_ssb.visualize import layer_views, plot_layer_views

REPO_ROOT = Path(__file__).resolve().parents[1]
CANVAS = 96
DIGIT = 16
FRAGMENT = 6
FRAGMENTS = 8
MODEL_KWARGS = dict(channels=(16, 32, 64, 128), stem_width=16, in_chans=1, num_classes=10, ssb_sizes=(6, 3, 2))


def load_digits() -> Tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0  # (N, 8, 8) in [0, 1]
    images = F.interpolate(images.unsqueeze(1), size=(DIGIT, DIGIT), mode='bilinear', align_corners=False)
    return images.squeeze(1).clamp(0, 1), torch.tensor(data.target)


def cluttered_canvases(digits: torch.Tensor, clutter_source: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each digit at a random place on a canvas with ``FRAGMENTS`` random fragments of other digits."""
    n = len(digits)
    canvas = torch.zeros(n, CANVAS, CANVAS)
    for i in range(n):
        for _ in range(FRAGMENTS):
            src = clutter_source[torch.randint(len(clutter_source), (1,), generator=generator)].squeeze(0)
            sy, sx = torch.randint(0, DIGIT - FRAGMENT + 1, (2,), generator=generator).tolist()
            y, x = torch.randint(0, CANVAS - FRAGMENT + 1, (2,), generator=generator).tolist()
            patch = canvas[i, y : y + FRAGMENT, x : x + FRAGMENT]
            torch.maximum(patch, src[sy : sy + FRAGMENT, sx : sx + FRAGMENT], out=patch)
        y, x = torch.randint(0, CANVAS - DIGIT + 1, (2,), generator=generator).tolist()
        region = canvas[i, y : y + DIGIT, x : x + DIGIT]
        torch.maximum(region, digits[i], out=region)
    return canvas.unsqueeze(1)


def split(labels: torch.Tensor, test_fraction: float = 0.25) -> Tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_test = int(len(labels) * test_fraction)
    return order[n_test:], order[:n_test]


def sampler_kwargs(model: str, sampler: str, sigma_g: Optional[float], sizes: Optional[List[int]] = None) -> Dict:
    """``model`` and its kwargs for ``sampler``; ``sigma_g`` (attraction width) applies to ``adaptive`` only."""
    kwargs = dict(MODEL_KWARGS, model=model, ssb_sampler=sampler)
    if sizes:
        kwargs['ssb_sizes'] = tuple(sizes)
    if sampler == 'adaptive' and sigma_g is not None:
        kwargs['ssb_sampler_args'] = {'sigma_g': sigma_g}
    return kwargs


def train_one(
    kwargs: Dict, seed: int, data: Dict[str, torch.Tensor], epochs: int, batch_size: int, lr: float
) -> Tuple[float, torch.nn.Module]:
    torch.manual_seed(seed)
    model = timm.create_model(kwargs.pop('model'), **kwargs)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(len(data['train_y']) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(1000 + seed)
    for _ in range(epochs):
        model.train()
        canvases = cluttered_canvases(data['train_digits'], data['train_digits'], generator)
        order = torch.randperm(len(canvases), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            x = canvases[idx].contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), data['train_y'][idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data['test_x']), 256):
            x = data['test_x'][start : start + 256].contiguous(memory_format=torch.channels_last)
            correct += (model(x).argmax(1) == data['test_y'][start : start + 256]).sum().item()
    return correct / len(data['test_y']), model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--samplers', nargs='+', default=['adaptive', 'uniform', 'bilinear'])
    parser.add_argument('--model', default='ssb_resnetd26', help='SSB architecture, narrowed (default ssb_resnetd26)')
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--epochs', type=int, default=15)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--lr', type=float, default=3e-3)
    parser.add_argument(
        '--sigma-g', type=float, default=None, help="adaptive attraction width (default: the sampler's)"
    )
    parser.add_argument('--sizes', type=int, nargs=3, default=None, help='ssb_sizes (default: 6 3 2)')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--out-dir', default=str(REPO_ROOT / 'benchmarks' / 'results'))
    parser.add_argument('--name', default='ablation_cluttered_digits')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    digits, labels = load_digits()
    train_idx, test_idx = split(labels)
    data = {
        'train_digits': digits[train_idx],
        'train_y': labels[train_idx],
        'test_x': cluttered_canvases(digits[test_idx], digits[train_idx], torch.Generator().manual_seed(7)),
        'test_y': labels[test_idx],
    }
    runs: List[Dict] = []
    best: Dict[str, Tuple[float, torch.nn.Module]] = {}
    for sampler in args.samplers:
        kwargs = sampler_kwargs(args.model, sampler, args.sigma_g, args.sizes)
        gmacs = model_complexity(
            args.model, (1, CANVAS, CANVAS), **{k: v for k, v in kwargs.items() if k != 'model'}
        ).gmacs
        for seed in args.seeds:
            start = time.perf_counter()
            accuracy, model = train_one(dict(kwargs), seed, data, args.epochs, args.batch_size, args.lr)
            runs.append(
                dict(
                    sampler=sampler,
                    model_kwargs={k: v for k, v in kwargs.items() if k != 'model'},
                    seed=seed,
                    accuracy=accuracy,
                    gmacs=gmacs,
                    seconds=round(time.perf_counter() - start, 1),
                )
            )
            print(f'{sampler:<9} seed {seed}: test accuracy {accuracy:.4f} ({runs[-1]["seconds"]} s)', flush=True)
            if sampler not in best or accuracy > best[sampler][0]:
                best[sampler] = (accuracy, model)

    table = []
    for sampler in args.samplers:
        accs = [r['accuracy'] for r in runs if r['sampler'] == sampler]
        table.append(
            dict(
                sampler=sampler,
                mean=statistics.mean(accs),
                std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
                n=len(accs),
                gmacs=next(r['gmacs'] for r in runs if r['sampler'] == sampler),
            )
        )
    lines = [
        f'cluttered digits {CANVAS}x{CANVAS} (sklearn digits, {len(data["train_y"])} train / {len(data["test_y"])} '
        f'test), {args.model} narrow {MODEL_KWARGS}, {args.epochs} epochs, seeds {args.seeds}'
        + (f', adaptive sigma_g {args.sigma_g}' if args.sigma_g is not None else '')
        + (f', ssb_sizes {tuple(args.sizes)}' if args.sizes else ''),
        f'{"sampler":<10} {"accuracy":>18} {"runs":>5} {"GMACs":>8}',
    ]
    lines += [f'{r["sampler"]:<10} {r["mean"]:>9.4f} ± {r["std"]:.4f} {r["n"]:>5} {r["gmacs"]:>8.4f}' for r in table]
    text = '\n'.join(lines)
    print(text)

    out_dir = Path(args.out_dir)
    os.makedirs(out_dir, exist_ok=True)
    (out_dir / f'{args.name}.txt').write_text(text + '\n')
    payload = dict(
        settings=dict(
            vars(args),
            out_dir=os.path.relpath(out_dir, REPO_ROOT),
            canvas=CANVAS,
            digit=DIGIT,
            fragments=FRAGMENTS,
            fragment=FRAGMENT,
        ),
        machine=machine_info('cpu'),
        table=table,
        runs=runs,
    )
    (out_dir / f'{args.name}.json').write_text(json.dumps(payload, indent=2) + '\n')
    if 'adaptive' in best:
        model = best['adaptive'][1]
        x = data['test_x'][:1]
        views = layer_views(model, x, x[0].expand(3, -1, -1), ['2-2', '3-2', '4-2'])
        plot_layer_views(
            x[0].expand(3, -1, -1),
            views,
            str(out_dir / f'{args.name}.png'),
            title=f'adaptive {args.model} (best seed, accuracy {best["adaptive"][0]:.3f}), a test canvas',
        )


if __name__ == '__main__':
    main()
