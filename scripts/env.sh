# Sourced by demo.sh and test.sh: create ./.venv once and (re)install clipkit when pyproject.toml changes.
# torch and torchvision are resolved together from the package registry: the CPU-only torch wheel
# found on some machines cannot load the registry's torchvision (`operator torchvision::nms does not exist`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CLIPKIT_VENV:-$ROOT/.venv}"

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
    echo "$want" > "$stamp"
  fi
  export PATH="$VENV/bin:$PATH"
}
