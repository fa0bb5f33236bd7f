#!/usr/bin/env bash
# The main job on built-in defaults: set up ./.venv and the emoji art, then run `clipkit demo` (output in ./demo or $1).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
ensure_venv serve
ensure_emoji_art
cd "$ROOT"
clipkit demo --out "${1:-demo}"
