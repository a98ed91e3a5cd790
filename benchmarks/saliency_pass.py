"""What passing the saliency logits between SSB blocks saves in inference.

For each model (live saliency convs, so the samplers do not sample uniformly), this times a batch's forward
(eager, or with ``--compile`` compiled) under ``torch.inference_mode()`` with the SSB stages as
:class:`~timm_ssb.models.ssb_resnet.SSBStage` (each SSB block computes the next block's 1x1 saliency conv in its
way back up) and as plain ``nn.Sequential`` (every block runs its own saliency conv), switching between the two in
one process, in interleaved rounds; the table gives the median of each and their ratio.

Usage:

    python benchmarks/saliency_pass.py --json benchmarks/results/cpu_saliency_pass.json
"""

import argparse
import statistics
import time
from typing import Dict, List

import timm
import torch
import torch.nn as nn

from timm_ssb.benchmark import machine_info, report, require_positive
from timm_ssb.models.ssb_resnet import SSB_STAGES, SSBStage


def set_stage_class(model: nn.Module, stage_class: type) -> None:
    for name in SSB_STAGES:
        getattr(model, name).__class__ = stage_class


def time_model(name: str, batch_size: int, rounds: int, compile: bool = False) -> Dict[str, object]:
    torch.manual_seed(0)
    model = timm.create_model(name).eval().to(memory_format=torch.channels_last)
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.out_channels == 1:  # the saliency convs
            nn.init.normal_(module.weight, std=0.02)
    x = torch.randn(batch_size, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    times: Dict[str, List[float]] = {'passing': [], 'plain': []}
    classes = {'passing': SSBStage, 'plain': nn.Sequential}
    run = torch.compile(model) if compile else model  # one compiled graph per stage class, both kept
    with torch.inference_mode():
        for kind in times:  # warm-up (and, with compile, compiling)
            set_stage_class(model, classes[kind])
            run(x)
            run(x)
        for i in range(rounds):
            for kind in ('passing', 'plain') if i % 2 == 0 else ('plain', 'passing'):
                set_stage_class(model, classes[kind])
                start = time.perf_counter()
                run(x)
                times[kind].append(time.perf_counter() - start)
    set_stage_class(model, SSBStage)
    passing, plain = (statistics.median(times[k]) * 1e3 for k in ('passing', 'plain'))
    return {'model': name, 'passing_ms': passing, 'plain_ms': plain, 'speedup': plain / passing, 'times_s': times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', default=['ssb_resnetd50', 'ssb_resnetd152', 'ssb_resnetrs152'])
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--rounds', type=int, default=8)
    parser.add_argument('--compile', action='store_true', help='torch.compile the model (inductor, default mode)')
    parser.add_argument('--json', default=None, help='write the rows, settings and machine here')
    args = parser.parse_args()
    require_positive(parser, args, 'batch_size', 'threads', 'rounds')
    torch.set_num_threads(args.threads)
    rows = [time_model(name, args.batch_size, args.rounds, args.compile) for name in args.models]
    machine = machine_info('cpu')
    lines = [
        f'saliency logits passed between SSB blocks, inference on cpu ({machine["processor"]}), batch '
        f'{args.batch_size}, 224x224, fp32, channels_last, {"torch.compile" if args.compile else "eager"}, '
        f'{args.threads} threads, median of {args.rounds} '
        f'interleaved rounds; sampling backend: {machine["sampling_backend"]}',
        f'{"model":<16} {"passing ms":>10} {"plain ms":>9} {"speedup":>8}',
    ]
    lines += [f'{r["model"]:<16} {r["passing_ms"]:>10.1f} {r["plain_ms"]:>9.1f} {r["speedup"]:>7.3f}x' for r in rows]
    report('\n'.join(lines), args.json, {'settings': vars(args), 'machine': machine, 'results': rows})


if __name__ == '__main__':
    main()
