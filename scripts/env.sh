# Sourced by demo.sh and test.sh: create ./.venv once and (re)install clipkit when pyproject.toml changes.
# torch and torchvision are resolved together from the package registry: the CPU-only torch wheel
# found on some machines cannot load the registry's torchvision (`operator torchvision::nms does not exist`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CLIPKIT_VENV:-$ROOT/.venv}"
CLIP_RETRIEVAL="clip-retrieval==2.45.0"  # its ClipClient and built web front end, for the compatibility tests

ensure_venv() {  # ensure_venv EXTRAS
  local extras="$1"
  local stamp="$VENV/.clipkit-installed"
  local want
  want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)-$extras"
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[clipkit] creating virtual environment in $VENV"
    python3 -m venv "$VENV"
  fi
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[clipkit] installing clipkit[$extras] and its dependencies (first time: several minutes, ~6 GB)"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT[$extras]"
    if [ "$extras" = dev ]; then  # the real clip-retrieval clients (tests/test_clipretrieval*.py); its deps are not needed
      "$VENV/bin/python" -m pip install --quiet --no-deps "$CLIP_RETRIEVAL"
    fi
    echo "$want" > "$stamp"
  fi
  export PATH="$VENV/bin:$PATH"
}

# The emoji demo's optional art styles (clipkit/data/datasets/emoji/styles.py): npm image packs, pinned so every
# machine draws the same pictures, into the folder the dataset builder reads; Debian's Noto font when the Noto
# pack could not be had. Never fatal: whatever is missing is named in one line, and the demo goes on without it.
EMOJI_PACKS_DIR="${CLIPKIT_EMOJI_PACKS:-$HOME/.cache/clipkit/emoji-packs}"
EMOJI_PACKS=(emoji-datasource-google@16.0.0 emoji-datasource-facebook@16.0.0 emoji-assets@11.0.0 fluentui-emoji@1.3.0)
NOTO_FONT=/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf

ensure_emoji_art() {
  local missing=() spec name tmp
  mkdir -p "$EMOJI_PACKS_DIR"
  for spec in "${EMOJI_PACKS[@]}"; do
    name="${spec%@*}"
    [ -s "$EMOJI_PACKS_DIR/$name-${spec#*@}.tgz" ] && continue
    if ! command -v npm >/dev/null 2>&1; then
      missing+=("$name (no npm)")
      continue
    fi
    tmp="$(mktemp -d)"  # npm pack writes NAME-VERSION.tgz; moved in whole, so a killed fetch leaves nothing
    if (cd "$tmp" && npm pack --silent "$spec" >/dev/null 2>&1) && mv "$tmp/$name-${spec#*@}.tgz" "$EMOJI_PACKS_DIR/"; then
      echo "[clipkit] fetched emoji pack $spec into $EMOJI_PACKS_DIR"
    else
      missing+=("$name (npm pack failed)")
    fi
    rm -rf "$tmp"
  done
  if [ ! -s "$EMOJI_PACKS_DIR/emoji-datasource-google-16.0.0.tgz" ] && [ ! -f "$NOTO_FONT" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
        && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-noto-color-emoji) >/dev/null 2>&1; then
      echo "[clipkit] installed Debian fonts-noto-color-emoji for the Noto style"
    else
      missing+=("Noto font (needs root + apt-get: apt-get install fonts-noto-color-emoji)")
    fi
  fi
  if [ "${#missing[@]}" -gt 0 ]; then
    local joined
    joined="$(printf '%s; ' "${missing[@]}")"
    echo "[clipkit] emoji art not installed (the demo goes on without it; its figures then differ from the README's): ${joined%; }"
  fi
}
