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
import os
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import timm
import torch

import timm_ssb  # noqa: F401  (registers the models)
from cluttered_digits import (
    CANVAS,
    DEFAULT_CANVAS,
    DIGIT,
    FRAGMENT,
    FRAGMENTS,
    Canvas,
    accuracy,
    make_data,
    train,
    write_result,
)
from timm_ssb.benchmark import machine_info, require_positive
from timm_ssb.complexity import model_complexity
from timm_ssb.visualize import layer_views, plot_layer_views

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_KWARGS = dict(channels=(16, 32, 64, 128), stem_width=16, in_chans=1, num_classes=10, ssb_sizes=(6, 3, 2))


def sampler_kwargs(model: str, sampler: str, sigma_g: Optional[float], sizes: Optional[List[int]] = None) -> Dict:
    """``model`` and its kwargs for ``sampler``; ``sigma_g`` (attraction width) applies to ``adaptive`` only."""
    kwargs = dict(MODEL_KWARGS, model=model, ssb_sampler=sampler)
    if sizes:
        kwargs['ssb_sizes'] = tuple(sizes)
    if sampler == 'adaptive' and sigma_g is not None:
        kwargs['ssb_sampler_args'] = {'sigma_g': sigma_g}
    return kwargs


def train_one(
    kwargs: Dict,
    seed: int,
    data: Dict[str, torch.Tensor],
    epochs: int,
    batch_size: int,
    lr: float,
    canvas: Canvas = DEFAULT_CANVAS,
    saliency_lr_scale: float = 1.0,
) -> Tuple[float, torch.nn.Module]:
    """A model of ``kwargs`` (with ``'model'``, its name) trained from scratch with ``seed``: its test accuracy."""
    torch.manual_seed(seed)
    model = timm.create_model(kwargs.pop('model'), **kwargs)
    model = train(model, data, seed, epochs, batch_size, lr, canvas, saliency_lr_scale=saliency_lr_scale)
    return accuracy(model, data), model


def paired_against(runs: List[Dict], sampler: str, reference: str) -> Optional[Dict]:
    """``sampler`` minus ``reference`` seed by seed: mean and std of the differences, and a paired t-test's
    two-sided p-value (``None`` with fewer than two shared seeds)."""
    from scipy.stats import ttest_rel

    by_seed = {name: {r['seed']: r['accuracy'] for r in runs if r['sampler'] == name} for name in (sampler, reference)}
    seeds = sorted(set(by_seed[sampler]) & set(by_seed[reference]))
    if len(seeds) < 2:
        return None
    a = [by_seed[sampler][s] for s in seeds]
    b = [by_seed[reference][s] for s in seeds]
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    p_value = float(ttest_rel(a, b).pvalue) if any(diffs) else 1.0
    return dict(
        sampler=sampler,
        reference=reference,
        seeds=seeds,
        mean_difference=statistics.mean(diffs),
        std_difference=statistics.stdev(diffs),
        wins=sum(d > 0 for d in diffs),
        losses=sum(d < 0 for d in diffs),
        p_value=p_value,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--samplers', nargs='+', default=['adaptive', 'uniform', 'bilinear'])
    parser.add_argument('--model', default='ssb_resnetd26', help='SSB architecture, narrowed (default ssb_resnetd26)')
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument('--epochs', type=int, default=15)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--lr', type=float, default=3e-3)
    parser.add_argument(
        '--sigma-g', type=float, default=None, help="adaptive attraction width (default: the sampler's)"
    )
    parser.add_argument('--sizes', type=int, nargs=3, default=None, help='ssb_sizes (default: 6 3 2)')
    parser.add_argument('--digit', type=int, default=DIGIT, help="the digit's side on the canvas (default 16)")
    parser.add_argument('--fragments', type=int, default=FRAGMENTS, help='clutter fragments per canvas (default 8)')
    parser.add_argument(
        '--saliency-lr-scale', type=float, default=1.0, help="the saliency convs' learning rate over the rest's"
    )
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--out-dir', default=str(REPO_ROOT / 'benchmarks' / 'results'))
    parser.add_argument('--name', default='ablation_cluttered_digits')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    require_positive(parser, args, 'epochs', 'batch_size', 'digit', 'threads')
    if args.saliency_lr_scale <= 0:
        parser.error(f'--saliency-lr-scale must be positive; got {args.saliency_lr_scale}')
    if not 0 < args.digit <= CANVAS or args.fragments < 0:
        parser.error(f'--digit must be in 1..{CANVAS} and --fragments at least 0')
    canvas = Canvas(digit=args.digit, fragments=args.fragments)
    data = make_data(canvas)
    runs: List[Dict] = []
    best: Dict[str, Tuple[float, torch.nn.Module]] = {}
    for sampler in args.samplers:
        kwargs = sampler_kwargs(args.model, sampler, args.sigma_g, args.sizes)
        gmacs = model_complexity(
            args.model, (1, CANVAS, CANVAS), **{k: v for k, v in kwargs.items() if k != 'model'}
        ).gmacs
        for seed in args.seeds:
            start = time.perf_counter()
            accuracy, model = train_one(
                dict(kwargs), seed, data, args.epochs, args.batch_size, args.lr, canvas, args.saliency_lr_scale
            )
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
    paired = [
        comparison
        for sampler in args.samplers
        if sampler != 'uniform' and 'uniform' in args.samplers
        for comparison in [paired_against(runs, sampler, 'uniform')]
        if comparison is not None
    ]
    lines = [
        f'cluttered digits {CANVAS}x{CANVAS}, digit {args.digit}x{args.digit}, {args.fragments} fragments (sklearn '
        f'digits, {len(data["train_y"])} train / {len(data["test_y"])} test), {args.model} narrow {MODEL_KWARGS}, '
        f'{args.epochs} epochs, seeds {args.seeds}'
        + (f', adaptive sigma_g {args.sigma_g}' if args.sigma_g is not None else '')
        + (f', ssb_sizes {tuple(args.sizes)}' if args.sizes else '')
        + (f', saliency lr x{args.saliency_lr_scale:g}' if args.saliency_lr_scale != 1.0 else ''),
        f'{"sampler":<10} {"accuracy":>18} {"runs":>5} {"GMACs":>8}',
    ]
    lines += [f'{r["sampler"]:<10} {r["mean"]:>9.4f} ± {r["std"]:.4f} {r["n"]:>5} {r["gmacs"]:>8.4f}' for r in table]
    lines += [
        f'{c["sampler"]} - uniform, paired by seed: {c["mean_difference"]:+.4f} ± {c["std_difference"]:.4f} '
        f'({c["wins"]} better, {c["losses"]} worse of {len(c["seeds"])}; paired t-test p = {c["p_value"]:.3f})'
        for c in paired
    ]
    payload = dict(
        settings=dict(
            vars(args),
            out_dir=os.path.relpath(args.out_dir, REPO_ROOT),
            canvas=CANVAS,
            fragment=FRAGMENT,
        ),
        machine=machine_info('cpu'),
        table=table,
        paired=paired,
        runs=runs,
    )
    out_dir = write_result(args.out_dir, args.name, '\n'.join(lines), payload)
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
