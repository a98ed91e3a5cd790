"""Where a step's time goes: kernels, launches, and whether the GPU or the host sets the pace.

For each model (an SSB model and its baseline, or any timm model), this runs inference or a training step (bf16
autocast, channels-last, batch 256 by default), then profiles a few steps and reports, per step:

* the wall time (synchronised) and the device's busy time (the sum of its kernels' and copies' times): a wall time
  well above the busy time means the host, launching one kernel after another, sets the pace, not the device;
* the number of kernels launched;
* the kernels that take the most device time;
* with ``--shapes``, the operators (and their input shapes) whose kernels take the most device time: which op a
  kernel serves, e.g. in a compiled graph.

On the CPU (for testing the script) the profiler records CPU operators instead of kernels.

Usage (a CUDA GPU):

    python benchmarks/gpu_profile.py --models ssb_resnetd50 resnet50d [--train] [--compile] \\
        --json benchmarks/results/gpu_profile.json
"""

import argparse
import time
from typing import Dict, List

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import timm_ssb  # noqa: F401  (registers the models)
from timm_ssb.benchmark import machine_info, report, require_positive


def profile_model(name: str, args: argparse.Namespace) -> Dict[str, object]:
    device = torch.device(args.device)
    model = timm.create_model(name).to(device).to(memory_format=torch.channels_last).train(args.train)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01) if args.train else None
    forward = torch.compile(model) if args.compile else model
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    amp = torch.autocast(device.type, getattr(torch, args.amp))

    def step() -> None:
        with amp, torch.set_grad_enabled(args.train):
            out = forward(x)
        if optimizer is not None:
            out.float().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def synchronize() -> None:
        if device.type == 'cuda':
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3 / args.steps

    activity = ProfilerActivity.CUDA if device.type == 'cuda' else ProfilerActivity.CPU
    with profile(activities=[activity], record_shapes=args.shapes) as prof:
        for _ in range(args.steps):
            step()
        synchronize()
    if device.type == 'cuda':
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = [e.self_device_time_total for e in events]
    else:
        events = [e for e in prof.key_averages() if e.key.startswith('aten::')]
        busy = [e.self_cpu_time_total for e in events]
    order = sorted(range(len(events)), key=lambda i: busy[i], reverse=True)
    total_us = sum(busy)
    operators = []
    if args.shapes:  # the operators by the time of the kernels they launched (on the CPU: their own time)
        by_shape = [
            e for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith(('aten::', 'timm_ssb::'))
        ]

        def spent(e) -> float:
            return e.device_time_total if device.type == 'cuda' else e.cpu_time_total

        by_shape.sort(key=spent, reverse=True)
        operators = [
            {
                'name': e.key,
                'shapes': str(e.input_shapes),
                'ms': spent(e) / 1e3 / args.steps,
                'calls': e.count / args.steps,
            }
            for e in by_shape[: args.top]
        ]
    return {
        'model': name,
        'wall_ms': wall_ms,
        'busy_ms': total_us / 1e3 / args.steps,
        'launches': sum(e.count for e in events) / args.steps,
        'top': [
            {
                'name': events[i].key,
                'ms': busy[i] / 1e3 / args.steps,
                'share': busy[i] / total_us if total_us else 0.0,
                'calls': events[i].count / args.steps,
            }
            for i in order[: args.top]
        ],
        'operators': operators,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['ssb_resnetd50', 'resnet50d'])
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--batch-size', type=int, default=256)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--amp', choices=['bfloat16', 'float16'], default='bfloat16')
    parser.add_argument('--train', action='store_true', help='profile a training step (forward, backward, SGD)')
    parser.add_argument('--compile', action='store_true', help='torch.compile the model first')
    parser.add_argument('--warmup', type=int, default=4)
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--top', type=int, default=15, help='kernels listed per model')
    parser.add_argument(
        '--shapes', action='store_true', help='also list the top operators by input shapes (which op a kernel serves)'
    )
    parser.add_argument('--json', default=None, help='write the rows, settings and machine here')
    args = parser.parse_args()
    require_positive(parser, args, 'batch_size', 'img_size', 'steps', 'top')
    if args.warmup < 0:
        parser.error('--warmup must be zero or more')
    if args.device not in ('cpu', 'cuda') and not args.device.startswith('cuda:'):
        parser.error(f'--device must be cpu or cuda[:N]; got {args.device!r}')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        parser.error('--device cuda needs a CUDA GPU (none here); --device cpu profiles CPU operators')

    rows: List[Dict[str, object]] = []
    mode = f'{"training step" if args.train else "inference"}, {"compiled" if args.compile else "eager"}'
    lines = [f'{mode}, batch {args.batch_size}, {args.img_size}x{args.img_size}, channels_last, {args.amp} autocast']
    for name in args.models:
        row = profile_model(name, args)
        rows.append(row)
        lines.append(
            f'\n{name}: {row["wall_ms"]:.2f} ms per step wall, {row["busy_ms"]:.2f} ms device busy, '
            f'{row["launches"]:.0f} launches per step'
        )
        for kernel in row['top']:
            lines.append(
                f'  {kernel["ms"]:8.3f} ms {kernel["share"]:6.1%} {kernel["calls"]:6.0f}x  {kernel["name"][:90]}'
            )
        if row['operators']:
            lines.append('  operators by the time of their kernels (input shapes):')
        for op in row['operators']:
            lines.append(f'  {op["ms"]:8.3f} ms {op["calls"]:6.0f}x  {op["name"]} {op["shapes"][:120]}')
    report('\n'.join(lines), args.json, {'settings': vars(args), 'machine': machine_info(args.device), 'results': rows})


if __name__ == '__main__':
    main()
