"""The warm-start recipe in miniature: from a trained ResNet to an SSB model in a fraction of the training.

Task: cluttered digits (``cluttered_digits.py``: sklearn's real digits at random places on a 96x96 canvas with
clutter). For each seed:

1. **baseline**: a narrow ``resnet26d`` (channels 16-32-64-128) trained from scratch for ``--baseline-epochs``;
2. **warm start**: ``ssbify(baseline)`` (the same weights, uniform sampling at first: the saliency convs are zero)
   fine-tuned for ``--finetune-epochs``, on its own;
3. **warm start + distillation**: the same, with the baseline as teacher (logit distillation, as timm's
   ``train.py --kd-model-name``);
4. **from scratch**: the same SSB model trained from random weights for ``--baseline-epochs``.

Every SSB model has the same architecture and GMACs. The test accuracy is recorded after every epoch of every
run (a run's schedule spans its own epochs, so a curve's early points are taken mid-schedule); the fine-tuned
models are also evaluated before their first step (epoch 0: the converted baseline as it is).

    python benchmarks/warm_start_digits.py                  # ~25 minutes on 2 cores (5 seeds)
    python benchmarks/warm_start_digits.py --seeds 0 --baseline-epochs 2 --finetune-epochs 1   # smoke run

Writes ``benchmarks/results/warm_start_digits.{json,txt,png}``: accuracy against epochs for the four arms (mean
and std over seeds), every run, the settings and the machine.
"""

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional

import timm
import torch

from cluttered_digits import DEFAULT_CANVAS, accuracy, make_data, train, write_result
from timm_ssb import ssbify
from timm_ssb.benchmark import machine_info
from timm_ssb.complexity import model_complexity

REPO_ROOT = Path(__file__).resolve().parents[1]
BASELINE = 'resnet26d'
MODEL_KWARGS = dict(channels=(16, 32, 64, 128), stem_width=16, in_chans=1, num_classes=10)
ARMS = ('baseline', 'warm_start', 'warm_start_distilled', 'from_scratch')


def curve_run(
    arm: str,
    model: torch.nn.Module,
    data: Dict[str, torch.Tensor],
    seed: int,
    epochs: int,
    lr: float,
    args: argparse.Namespace,
    teacher: Optional[torch.nn.Module] = None,
    start_accuracy: Optional[float] = None,
) -> Dict:
    """Train ``model`` for ``epochs`` at peak ``lr``, its test accuracy after each (and, given, before the first)."""
    curve = [] if start_accuracy is None else [start_accuracy]
    start = time.perf_counter()
    train(
        model,
        data,
        seed,
        epochs,
        args.batch_size,
        lr,
        DEFAULT_CANVAS,
        teacher=teacher,
        temperature=args.temperature,
        distill_weight=args.distill_weight,
        after_epoch=lambda epoch, m: curve.append(accuracy(m, data)),
    )
    run = dict(arm=arm, seed=seed, epochs=epochs, curve=curve, seconds=round(time.perf_counter() - start, 1))
    first_epoch = 0 if start_accuracy is not None else 1
    print(f'{arm:<22} seed {seed}: ' + ' '.join(f'{a:.3f}' for a in curve) + f' (from epoch {first_epoch})', flush=True)
    return run


def summary(runs: List[Dict], arm: str) -> Dict:
    """Mean and std over seeds of ``arm``'s accuracy at each recorded epoch."""
    curves = [r['curve'] for r in runs if r['arm'] == arm]
    first = 0 if arm.startswith('warm_start') else 1
    points = []
    for i, values in enumerate(zip(*curves, strict=True)):
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        points.append(dict(epoch=first + i, mean=statistics.mean(values), std=std))
    return dict(arm=arm, n=len(curves), points=points)


def first_epoch_within(curve: Dict, target: float) -> Optional[int]:
    """The first epoch at which ``curve``'s mean accuracy reaches ``target``, or ``None``."""
    return next((p['epoch'] for p in curve['points'] if p['mean'] >= target), None)


def plot(curves: List[Dict], baseline: Dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    final = baseline['points'][-1]
    ax.axhspan(final['mean'] - final['std'], final['mean'] + final['std'], color='0.85', label='baseline, final ± std')
    for curve in curves:
        epochs = [p['epoch'] for p in curve['points']]
        means = [p['mean'] for p in curve['points']]
        stds = [p['std'] for p in curve['points']]
        ax.errorbar(epochs, means, yerr=stds, marker='o', markersize=3, capsize=2, label=curve['arm'].replace('_', ' '))
    ax.set_xlabel('epochs of training (the SSB model)')
    ax.set_ylabel('test accuracy')
    ax.set_ylim(max(0.0, min(p['mean'] for c in curves for p in c['points'][1:]) - 0.1), 1.0)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc='lower right')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument('--baseline-epochs', type=int, default=15, help='baseline and from-scratch epochs')
    parser.add_argument('--finetune-epochs', type=int, default=4, help='epochs of the two warm starts')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--lr', type=float, default=3e-3, help='peak learning rate from scratch')
    parser.add_argument('--finetune-lr', type=float, default=1e-3, help='peak learning rate of the warm starts')
    parser.add_argument('--temperature', type=float, default=1.0, help='distillation temperature')
    parser.add_argument('--distill-weight', type=float, default=0.5, help="the distillation loss's weight")
    parser.add_argument('--sizes', type=int, nargs=3, default=[6, 3, 2], help='ssb_sizes of the SSB models')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--out-dir', default=str(REPO_ROOT / 'benchmarks' / 'results'))
    parser.add_argument('--name', default='warm_start_digits')
    args = parser.parse_args()
    for flag in ('baseline_epochs', 'finetune_epochs', 'batch_size', 'threads'):
        if getattr(args, flag) <= 0:
            parser.error(f'--{flag.replace("_", "-")} must be positive')
    if not 0.0 <= args.distill_weight <= 1.0:
        parser.error(f'--distill-weight must be in [0, 1]; got {args.distill_weight}')
    torch.set_num_threads(args.threads)
    data = make_data(DEFAULT_CANVAS)
    sizes = tuple(args.sizes)

    runs: List[Dict] = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        baseline = timm.create_model(BASELINE, **MODEL_KWARGS)
        runs.append(curve_run('baseline', baseline, data, seed, args.baseline_epochs, args.lr, args))
        converted_accuracy = accuracy(ssbify(baseline, sizes=sizes), data)
        for arm, teacher in (('warm_start', None), ('warm_start_distilled', baseline)):
            student = ssbify(baseline, sizes=sizes)
            runs.append(
                curve_run(
                    arm, student, data, seed, args.finetune_epochs, args.finetune_lr, args, teacher, converted_accuracy
                )
            )
        torch.manual_seed(seed)
        scratch = ssbify(timm.create_model(BASELINE, **MODEL_KWARGS), sizes=sizes)
        runs.append(curve_run('from_scratch', scratch, data, seed, args.baseline_epochs, args.lr, args))

    curves = {arm: summary(runs, arm) for arm in ARMS}
    final_baseline = curves['baseline']['points'][-1]
    target = final_baseline['mean'] - final_baseline['std']
    gmacs = {
        name: model_complexity(model, (1, 96, 96), **kwargs).gmacs
        for name, model, kwargs in (
            ('baseline', BASELINE, MODEL_KWARGS),
            ('ssb', 'ssb_resnetd26', dict(MODEL_KWARGS, ssb_sizes=sizes)),
        )
    }
    lines = [
        f'warm start in miniature: cluttered digits 96x96, narrow {BASELINE} {MODEL_KWARGS} -> ssbify, ssb_sizes '
        f'{sizes}; baseline and from scratch {args.baseline_epochs} epochs (lr {args.lr}), warm starts '
        f'{args.finetune_epochs} epochs (lr {args.finetune_lr}; distillation T={args.temperature}, weight '
        f'{args.distill_weight}); seeds {args.seeds}; GMACs baseline {gmacs["baseline"]:.4f}, SSB {gmacs["ssb"]:.4f}',
        f'{"arm":<22} {"epoch":>5} {"accuracy":>18}',
    ]
    for arm in ARMS:
        lines += [f'{arm:<22} {p["epoch"]:>5} {p["mean"]:>9.4f} ± {p["std"]:.4f}' for p in curves[arm]['points']]
    reached = {arm: first_epoch_within(curves[arm], target) for arm in ARMS[1:]}
    lines.append(
        f"first epoch at which the mean reaches the baseline's final mean - std ({target:.4f}): "
        + ', '.join(f'{arm} {"not reached" if e is None else e}' for arm, e in reached.items())
    )
    payload = dict(
        settings=dict(vars(args), out_dir=os.path.relpath(args.out_dir, REPO_ROOT), baseline=BASELINE),
        machine=machine_info('cpu'),
        gmacs=gmacs,
        target=target,
        first_epoch_reaching_target=reached,
        curves=list(curves.values()),
        runs=runs,
    )
    out_dir = write_result(args.out_dir, args.name, '\n'.join(lines), payload)
    plot(
        [curves[arm] for arm in ARMS[1:]],
        curves['baseline'],
        out_dir / f'{args.name}.png',
        f'narrow {BASELINE} -> SSB (sizes {sizes}) on cluttered digits, mean ± std of {len(args.seeds)} seeds',
    )


if __name__ == '__main__':
    main()
