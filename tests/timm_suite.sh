#!/usr/bin/env bash
# Run timm's own tests/test_models.py on the SSB models, from the sdist of the installed timm version.
# Usage: bash tests/timm_suite.sh [extra pytest args]
set -euo pipefail
version=$(python -c 'import timm; print(timm.__version__)')
cache=${TIMM_SUITE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/timm-ssb/timm-sdist}
src="$cache/timm-$version"
if [ ! -f "$src/tests/test_models.py" ]; then
  mkdir -p "$cache"
  python -m pip download --quiet --no-deps --no-binary :all: "timm==$version" -d "$cache"
  tar -xzf "$cache/timm-$version.tar.gz" -C "$cache"
fi
cd "$src"
# ssb_resnetrs350/420 are left out as timm's own CI leaves out resnetrs350/420 (time and memory); our
# tests/test_models.py builds and trains them.
selection="ssb and not pretrained and not ssb_resnetrs350 and not ssb_resnetrs420"
echo "timm $version: tests/test_models.py -k '$selection'"
exec python -m pytest -p timm_ssb tests/test_models.py -k "$selection" -p no:cacheprovider -q "$@"
