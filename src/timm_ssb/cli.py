"""The ``timm-ssb`` command line."""

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import timm
import torch

from .complexity import model_complexity
from .info import add_arguments as add_info_arguments
from .info import run as run_info
from .models import BASELINES, DEFAULT_SSB_SIZES, baseline_of
from .paper import paper_figure

__all__ = ['main']


BENCH_MODELS = ('ssb_resnetd50', 'ssb_resnetd101', 'ssb_resnetd152', 'ssb_resnetrs152')
"""What ``timm-ssb bench`` measures by default: the paper's models (the speed targets' columns)."""


def _fmt(value: Optional[float], digits: int) -> str:
    return '-' if value is None else f'{value:.{digits}f}'


def ssb_models_matching(patterns: Sequence[str]) -> List[str]:
    """The registered SSB models that ``timm.list_models`` gives for any of ``patterns`` (names or wildcards), in
    timm's order; all of them for no pattern. Raises ``ValueError`` naming a pattern that matches none."""
    names = timm.list_models('ssb_*')
    matched = {pattern: set(timm.list_models(pattern)).intersection(names) for pattern in patterns}
    unmatched = [pattern for pattern, found in matched.items() if not found]
    if unmatched:
        raise ValueError(
            f'{", ".join(map(repr, unmatched))} matches no SSB model; the SSB models are {", ".join(names)} '
            "(wildcards such as 'ssb_resnetd*' allowed)"
        )
    chosen = set().union(*matched.values())
    return [name for name in names if not patterns or name in chosen]


def models_table(input_size: Optional[int] = None, patterns: Sequence[str] = ()) -> List[dict]:
    """One row per registered SSB model (those matching ``patterns``, :func:`ssb_models_matching`): our counts, the
    paper's, and the timm baseline's."""
    rows = []
    for name in ssb_models_matching(patterns):
        cfg_size = timm.get_pretrained_cfg_value(name, 'input_size')
        size = (3, input_size, input_size) if input_size else tuple(cfg_size)
        ours = model_complexity(name, size)
        baseline = baseline_of(name)
        base = model_complexity(baseline, size) if baseline else None
        paper = paper_figure(name, 'adaptive', DEFAULT_SSB_SIZES) if size[1:] == (224, 224) else None
        base_paper = paper_figure(baseline) if baseline and size[1:] == (224, 224) else None
        rows.append(
            dict(
                model=name,
                input_size=list(size),
                params_m=ours.params_m,
                gmacs=ours.gmacs,
                paper_params_m=paper.params_m if paper else None,
                paper_gmacs=paper.gmacs if paper else None,
                baseline=baseline,
                baseline_params_m=base.params_m if base else None,
                baseline_gmacs=base.gmacs if base else None,
                baseline_paper_params_m=base_paper.params_m if base_paper else None,
                baseline_paper_gmacs=base_paper.gmacs if base_paper else None,
                gmacs_ratio=base.gmacs / ours.gmacs if base else None,
            )
        )
    return rows


def _print_models(rows: Sequence[dict]) -> None:
    header = (
        f'{"model":<17} {"input":>7} {"params M":>9} {"paper":>6} {"GMACs":>7} {"paper":>6}   '
        f'{"baseline":<12} {"params M":>9} {"paper":>6} {"GMACs":>7} {"paper":>6} {"GMACs ratio":>12}'
    )
    print(header)
    print('-' * len(header))
    for r in rows:
        print(
            f'{r["model"]:<17} {r["input_size"][1]:>3}x{r["input_size"][2]:<3} {r["params_m"]:>9.2f} '
            f'{_fmt(r["paper_params_m"], 1):>6} {r["gmacs"]:>7.3f} {_fmt(r["paper_gmacs"], 2):>6}   '
            f'{r["baseline"] or "-":<12} {_fmt(r["baseline_params_m"], 2):>9} '
            f'{_fmt(r["baseline_paper_params_m"], 1):>6} '
            f'{_fmt(r["baseline_gmacs"], 3):>7} {_fmt(r["baseline_paper_gmacs"], 2):>6} '
            f'{_fmt(r["gmacs_ratio"], 2) + "x":>12}'
        )
    print(
        '\nSSB models at their defaults (ssb_sampler="adaptive", ssb_sizes=(16, 8, 4)). GMACs counted with '
        'torch.utils.flop_counter (FLOPs / 2); "paper": the SSBNet supplementary, reported at 224x224 only.'
    )


def _cmd_models(args: argparse.Namespace) -> int:
    try:
        rows = models_table(args.img_size, args.models)
    except ValueError as e:
        raise SystemExit(f'timm-ssb models: MODEL {e}') from None
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
    else:
        _print_models(rows)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .benchmark import BenchSettings, run_benchmark

    unknown = [m for m in args.models if m not in BASELINES]
    if unknown:
        raise SystemExit(f'timm-ssb bench: --models must be among {", ".join(BASELINES)}; got {", ".join(unknown)}')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise SystemExit('timm-ssb bench: --device cuda asked for, but torch sees no CUDA device')
    settings = BenchSettings(
        device=args.device,
        batch_size=args.batch_size,
        img_size=args.img_size,
        train=args.train,
        compile=args.compile,
        channels_last=not args.nchw,
        amp_dtype=args.amp,
        threads=args.threads,
        rounds=args.rounds,
        iters=args.iters,
        warmup=args.warmup,
        stages=args.stages,
    )
    run_benchmark(args.models, settings, json_path=args.json)
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    from .publish import PublishError, publish

    try:
        model_args = json.loads(args.model_args) if args.model_args else None
        if model_args is not None and not isinstance(model_args, dict):
            raise PublishError(f'--model-args must be a JSON object; got {args.model_args!r}')
        publish(args.checkpoint, args.model, args.repo_id, args.out, args.dry_run, model_args)
    except json.JSONDecodeError as e:
        raise SystemExit(f'timm-ssb publish: --model-args is not valid JSON ({e})') from e
    except PublishError as e:
        raise SystemExit(f'timm-ssb publish: {e}') from e
    return 0


def _cmd_visualize(args: argparse.Namespace) -> int:
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from .publish import PublishError, check_fit, read_checkpoint
    from .visualize import layer_views, parse_layers, plot_layer_views

    try:
        ssb_models = timm.list_models('ssb_*')
        if args.model not in ssb_models:
            raise ValueError(f'--model must be one of {", ".join(ssb_models)}; got {args.model!r}')
        out = Path(args.out)
        if not out.parent.is_dir():
            raise ValueError(f'--out {args.out!r}: the folder {str(out.parent)!r} does not exist')
        if out.is_dir():
            raise ValueError(f'--out {args.out!r} is a folder; give the PNG file to write')
        layers = parse_layers(args.layers)
        model_args = json.loads(args.model_args) if args.model_args else {}
        if not isinstance(model_args, dict):
            raise ValueError(f'--model-args must be a JSON object; got {args.model_args!r}')
        model = timm.create_model(args.model, **model_args)
        if args.checkpoint:
            state_dict, source, _ = read_checkpoint(args.checkpoint)
            check_fit(model, state_dict, f'{args.model} with {model_args or "default arguments"}')
            model.load_state_dict(state_dict)
            print(f'using weights from {source!r} of {args.checkpoint}')
        config = resolve_data_config(
            {'input_size': (3, args.img_size, args.img_size)} if args.img_size else {}, model=model
        )
        image = Image.open(args.image).convert('RGB')
        x = create_transform(**config)(image).unsqueeze(0)
        display = create_transform(**{**config, 'mean': (0.0, 0.0, 0.0), 'std': (1.0, 1.0, 1.0)})(image)
        views = layer_views(model, x, display, layers)
    except (ValueError, PublishError, OSError) as e:
        raise SystemExit(f'timm-ssb visualize: {e}') from e
    plot_layer_views(display, views, args.out, title=f'{args.model} on {args.image}')
    print(f'wrote {args.out}')
    return 0


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f'must be a positive int, got {value}')
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='timm-ssb', description='SSBNet models for timm.')
    commands = parser.add_subparsers(dest='command', required=True)

    models = commands.add_parser(
        'models', help="list the registered SSB models with their parameters and GMACs, the paper's and the baselines'"
    )
    models.add_argument(
        'models',
        nargs='*',
        metavar='MODEL',
        help="SSB models to list, by name or wildcard pattern such as 'ssb_resnetd*' (default: every one; each "
        'model takes seconds to count)',
    )
    models.add_argument(
        '--img-size', type=_positive_int, default=None, help="square input side (default: each model's cfg)"
    )
    models.add_argument('--json', action='store_true', help='print JSON instead of a table')
    models.set_defaults(func=_cmd_models)

    bench = commands.add_parser(
        'bench', help='throughput (and memory) of SSB models against their timm baselines, in one process'
    )
    bench.add_argument(
        '--models',
        nargs='+',
        default=list(BENCH_MODELS),
        metavar='NAME',
        help=f'SSB models with a registered baseline (default: {" ".join(BENCH_MODELS)})',
    )
    bench.add_argument('--device', default='cpu', help='cpu or cuda[:N] (default: cpu)')
    bench.add_argument('--batch-size', type=_positive_int, default=16)
    bench.add_argument('--img-size', type=_positive_int, default=224)
    bench.add_argument('--train', action='store_true', help='time a training step (forward, backward, SGD step)')
    bench.add_argument('--compile', action='store_true', help='torch.compile both models')
    bench.add_argument('--nchw', action='store_true', help='NCHW instead of channels_last')
    bench.add_argument('--amp', choices=['bfloat16', 'float16'], default=None, help='autocast dtype (default: fp32)')
    bench.add_argument('--threads', type=_positive_int, default=None, help='torch.set_num_threads')
    bench.add_argument('--rounds', type=_positive_int, default=7, help='interleaved rounds (median is reported)')
    bench.add_argument('--iters', type=_positive_int, default=2, help='steps per model per round')
    bench.add_argument('--warmup', type=_positive_int, default=2, help='untimed steps per model first')
    bench.add_argument(
        '--stages',
        action='store_true',
        help='also time stem, layer1-4 and head (inference; with --compile, each part compiled on its own)',
    )
    bench.add_argument('--json', default=None, metavar='PATH', help='also write the results and settings here')
    bench.set_defaults(func=_cmd_bench)

    pub = commands.add_parser(
        'publish', help='turn a timm training checkpoint into a Hub folder (safetensors, config, card) and upload it'
    )
    pub.add_argument('checkpoint', help='timm checkpoint (EMA weights preferred), a state dict or .safetensors')
    pub.add_argument('--model', required=True, help='SSB architecture, e.g. ssb_resnetd50')
    pub.add_argument('--repo-id', required=True, help='Hub repository ORG/NAME')
    pub.add_argument('--out', default=None, help='folder to write (default: a new temporary folder)')
    pub.add_argument('--dry-run', action='store_true', help='write the folder, upload nothing')
    pub.add_argument(
        '--model-args', default=None, help='JSON of model kwargs used in training, e.g. {"ssb_sizes": [12, 6, 3]}'
    )
    pub.set_defaults(func=_cmd_publish)

    info = commands.add_parser(
        'info', help='which sampling implementation runs here and why (C++ and Triton kernels), with fixes'
    )
    add_info_arguments(info)
    info.set_defaults(func=run_info)

    viz = commands.add_parser('visualize', help='where each SSB layer samples an image (needs matplotlib)')
    viz.add_argument('image', help='an image file')
    viz.add_argument('--model', required=True, help='SSB model, e.g. ssb_resnetrs152')
    viz.add_argument('--checkpoint', default=None, help='weights: a timm checkpoint, state dict or .safetensors')
    viz.add_argument('--model-args', default=None, help='JSON of model kwargs, e.g. {"ssb_sizes": [12, 6, 3]}')
    viz.add_argument(
        '--layers', default='2-2,3-2,4-2', help='SSB layers as STAGE-BLOCK, blocks from 1 (default 2-2,3-2,4-2)'
    )
    viz.add_argument('--img-size', type=_positive_int, default=None, help='input side (default: the model cfg)')
    viz.add_argument('--out', required=True, help='PNG file to write')
    viz.set_defaults(func=_cmd_visualize)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == '__main__':
    sys.exit(main())
