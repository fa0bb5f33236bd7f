#!/usr/bin/env bash
# The main job on built-in defaults: set up ./.venv, then run `clipkit demo` (output in ./demo or $1).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
ensure_venv serve
cd "$ROOT"
clipkit demo --out "${1:-demo}"
