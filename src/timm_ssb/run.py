"""Run one of timm's scripts with the SSB models registered.

``python -m timm_ssb.run path/to/validate.py --model ssb_resnetd50 ...`` imports :mod:`timm_ssb` (which
registers the models) and runs the script as ``__main__`` with the remaining arguments, as ``python
path/to/validate.py ...`` would. For the scripts without ``--device-modules`` (``validate.py``,
``inference.py``, ``benchmark.py``); also ``torchrun ... -m timm_ssb.run path/to/script.py ...``.
"""

import runpy
import sys
from pathlib import Path
from typing import Optional, Sequence

import timm_ssb  # noqa: F401  (registers the models)

__all__ = ['main']

USAGE = 'usage: python -m timm_ssb.run SCRIPT.py [script arguments ...]'


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help'):
        raise SystemExit(USAGE)
    script = Path(argv[0])
    if not script.is_file():
        raise SystemExit(f'timm_ssb.run: script {str(script)!r} not found\n{USAGE}')
    sys.argv = [str(script), *argv[1:]]
    sys.path.insert(0, str(script.resolve().parent))
    runpy.run_path(str(script), run_name='__main__')


if __name__ == '__main__':
    main()
