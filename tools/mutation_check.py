"""Mutation check: does the suite catch plausible bugs in the sampling maths and the block's ends?

Each mutation edits one line of the package source in place, runs the fast tests that should catch it, and
puts the line back (also on failure or interrupt). Not part of the suite (minutes per run):

    python tools/mutation_check.py            # every mutation
    python tools/mutation_check.py sigma_d    # the ones whose name contains 'sigma_d'
    python tools/mutation_check.py --fast     # test_reference.py and test_sampling.py only

Stops at the first failing test (``-x``; the files in the order of ``TESTS``) and prints, per mutation,
the test that caught it, or NOT CAUGHT.
"""

import re
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ROOT / 'src' / 'timm_ssb' / 'layers'
MODEL = ROOT / 'src' / 'timm_ssb' / 'models' / 'ssb_resnet.py'
TESTS = ['tests/test_reference.py', 'tests/test_sampling.py', 'tests/test_models.py', 'tests/test_visualize.py']
"""The files run for each mutation, in this order; ``--fast`` runs the first two only (seconds instead of minutes)."""

MUTATIONS = [
    # (name, file, exact text, replacement)
    (
        'sigma_d = 1/s instead of 1/2s',
        LAYERS / 'samplers.py',
        'else 0.5 / size\n        self.sigma_up',
        'else 1.0 / size\n        self.sigma_up',
    ),
    (
        'pixel centres without +1/2',
        LAYERS / 'sampling_matrices.py',
        'dtype=torch.float32) + 0.5) / length',
        'dtype=torch.float32)) / length',
    ),
    ('drop-path end without y += shortcut', MODEL, '        y += shortcut\n', ''),
    ('unfused end without act3', MODEL, 'return out if fuse_relu else self.act3(out)', 'return out'),
    (
        'up matrix with sigma_down',
        LAYERS / 'sampling_matrices.py',
        '(-0.5 / sigma_up**2), dim=-2)',
        '(-0.5 / sigma_down**2), dim=-2)',
    ),
    (
        'up softmax over samples of the wrong axis',
        LAYERS / 'sampling_matrices.py',
        '(-0.5 / sigma_up**2), dim=-2)',
        '(-0.5 / sigma_up**2), dim=-1)',
    ),
    (
        'zero instead of replicate padding of the marginal',
        LAYERS / 'sampling_matrices.py',
        "mode='replicate'",
        "mode='constant'",
    ),
    (
        'positions without the constant-saliency term',
        LAYERS / 'sampling_matrices.py',
        '((weights - uniform_weights) * extended)',
        '((weights - 0.0 * uniform_weights) * extended)',
    ),
    (
        'marginals of the two axes swapped',
        LAYERS / 'sampling_matrices.py',
        'torch.logsumexp(log_saliency, dim=2), torch.logsumexp(log_saliency, dim=1)',
        'torch.logsumexp(log_saliency, dim=1), torch.logsumexp(log_saliency, dim=2)',
    ),
    (
        'positions not clamped to [0, 1]',
        LAYERS / 'sampling_matrices.py',
        'return (targets + shift).clamp(0.0, 1.0)',
        'return targets + shift',
    ),
    (
        'fused end without its ReLU',
        LAYERS / 'native' / 'batched_products.py',
        '        if relu:\n            out.relu_()',
        '        if False:\n            out.relu_()',
    ),
    (
        'fused end drops the residual gradient',
        LAYERS / 'native' / 'batched_products.py',
        'grad_residual = grad_out if ctx.needs_input_grad[3] else None',
        'grad_residual = None',
    ),
    (
        'fused backward: x gradient of the wrong matrix',
        LAYERS / 'native' / 'batched_products.py',
        'grad_rows = x_product(matrix_x_t, grad_t) if ctx.x_first else y_product(matrix_y_t, grad_t)',
        'grad_rows = x_product(matrix_x_t, grad_t) if ctx.x_first else y_product(matrix_y_t, grad_t) * 1.001',
    ),
    (
        'bilinear weights of the wrong neighbour',
        LAYERS / 'sampling_matrices.py',
        'frac = (src - lo).unsqueeze(-1)',
        'frac = (1.0 - (src - lo)).unsqueeze(-1)',
    ),
    (
        'fast path ignores autocast',
        LAYERS / 'sampling_matrices.py',
        '        x = x.to(torch.get_autocast_dtype(device_type))\n',
        '        pass\n',
    ),
    (
        'SE skipped on the sampled map',
        MODEL,
        '        if self.se is not None:\n            z = self.se(z)',
        '        if False:\n            z = self.se(z)',
    ),
    ('branch norm bn3 skipped', MODEL, '        z = self.bn3(z)\n', ''),
]


def run(name: str, path: Path, old: str, new: str, tests: list) -> str:
    source = path.read_text()
    if source.count(old) != 1:
        return f'{name}: SKIPPED (the text to mutate occurs {source.count(old)} times in {path.name})'
    try:
        path.write_text(source.replace(old, new))
        result = subprocess.run(
            [sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', '-m', 'not slow', *tests],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    finally:
        path.write_text(source)
    failed = re.findall(r'^(?:FAILED|ERROR) (tests/\S+)', result.stdout, flags=re.M)
    if not failed:
        return f'{name}: NOT CAUGHT'
    return f'{name}: caught by {failed[0]}'


def main(argv) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that a killed run still puts the line back
    tests = TESTS[:2] if '--fast' in argv else TESTS
    names = [a for a in argv if a != '--fast']
    chosen = [m for m in MUTATIONS if not names or any(a in m[0] for a in names)]
    missed = 0
    for mutation in chosen:
        line = run(*mutation, tests)
        missed += 'NOT CAUGHT' in line or 'SKIPPED' in line
        print(line, flush=True)
    return 1 if missed else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
