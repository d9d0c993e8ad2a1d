#!/usr/bin/env bash
# Install, build the embedded tiny checkpoint (once, no download) and answer a request with an image.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m runtime demo "$@"
