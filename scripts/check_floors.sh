#!/usr/bin/env bash
# The declared dependency floors, proven: a fresh virtual environment on the oldest Python
# that pyproject.toml allows (3.10), the oldest allowed version of every dependency pinned by
# pip constraints, then the whole suite. Called by .ci/run after the main suite; by hand:
#
#     scripts/check_floors.sh [pytest arguments]
#
# Python 3.10 is CHARRNN_FLOOR_PYTHON where set, else python3.10 on PATH, else pyenv's newest
# 3.10.x. Without one it fails in CI (CI=true: the floor would go unproven) and skips otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

# keep in step with pyproject.toml: requires-python and [project] dependencies. numpy 1.24.4
# is the last 1.24 patch (wheels for 3.10); click is 8.2: with 8.1 the suite cannot run (its
# CliRunner mixes stderr into stdout) and 8.1.0 calls an unreadable file "not executable";
# threadpoolctl is 3.5: older ones miss the scipy-openblas of numpy >= 2's wheels (charrnn
# would run serially there)
FLOOR_PYTHON=3.10
CONSTRAINTS="numpy==1.24.4
click==8.2.0
tqdm==4.64.0
pyyaml==6.0
safetensors==0.4.0
threadpoolctl==3.5.0"

find_python() {
  local candidate
  for candidate in "${CHARRNN_FLOOR_PYTHON:-}" "$(command -v "python$FLOOR_PYTHON" || true)" \
      $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}/versions/$FLOOR_PYTHON".*/bin/python3 2>/dev/null \
        | sort -V -r); do
    if [ -n "$candidate" ] && [ -x "$candidate" ] && "$candidate" -c \
        "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$FLOOR_PYTHON'.split('.'))))" \
        2>/dev/null  # a pyenv shim of a version not selected fails here, and is passed over
    then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

if ! PYTHON=$(find_python); then
  msg="no Python $FLOOR_PYTHON found (set CHARRNN_FLOOR_PYTHON, or install python$FLOOR_PYTHON)"
  if [ "${CI:-}" = "true" ]; then
    echo "check_floors: FAILED: $msg; the dependency floors are unproven" >&2
    exit 1
  fi
  echo "check_floors: skipped: $msg" >&2
  exit 0
fi

venv="$PWD/.venv-floor"
rm -rf "$venv"
"$PYTHON" -m venv "$venv"
constraints="$venv/constraints.txt"
printf '%s\n' "$CONSTRAINTS" > "$constraints"
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$venv/bin/python" -m pip install -q -c "$constraints" -e ".[test]"
"$venv/bin/python" - "$constraints" <<'PY'
import sys
from importlib.metadata import version

pins = dict(line.strip().split("==") for line in open(sys.argv[1]) if line.strip())
got = {name: version(name) for name in pins}
print(f"check_floors: Python {sys.version.split()[0]},",
      ", ".join(f"{name} {v}" for name, v in got.items()))
wrong = {name: v for name, v in got.items() if v != pins[name]}
if wrong:
    sys.exit(f"check_floors: not the floor versions: {wrong}")
PY
export CHARRNN_CACHE_DIR="$venv/cache"
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
