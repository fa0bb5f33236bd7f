#!/usr/bin/env bash
# Set up ./.venv with the dev extras and run the test suite (slow tests excluded; pass -m slow to run them).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
ensure_venv dev
cd "$ROOT"
python -m pytest -q "$@"
