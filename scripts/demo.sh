#!/usr/bin/env bash
# Install, then start the app from deploy/local.yaml on a local Ray cluster (the embedded tiny
# checkpoint is built on first start, no download), send one chat request with an image over HTTP,
# print the answer and stop. `python -m runtime serve` (without --once) keeps serving.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m runtime serve --once "$@"
