#!/usr/bin/env bash
# Create .venv from the project's own files (idempotent). With --test, also the test tools and the
# reference-only torchvision (kept out of the runtime's environment; see tests/reference.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if [ "${1:-}" = "--test" ]; then
    .venv/bin/pip install -q -e '.[test]'
    [ -d .venv-ref/torchvision ] || .venv/bin/pip install -q --no-deps --target .venv-ref torchvision==0.28.0
else
    .venv/bin/pip install -q -e .
fi
