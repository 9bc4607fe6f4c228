#!/usr/bin/env bash
# Run the TrueNAS client compatibility suite (pytruenas, aiotruenas-client)
# against a keyhaven binary.
#
#   tests/compat/run.sh [pytest args...]
#
# KEYHAVEN_BIN  daemon binary (default target/debug/keyhaven; relative paths are
#               taken from the repository root). Build it with `cargo build -p keyhaven`.
# PYTHON        interpreter used to create the venv (default python3).
#
# The venv lives in target/compat-venv and is rebuilt when requirements.txt
# (or the interpreter) changes. Exit status is pytest's: non-zero when a test fails.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$root/target/compat-venv"
req="$here/requirements.txt"
python="${PYTHON:-python3}"

if ! command -v "$python" >/dev/null 2>&1; then
    echo "run.sh: $python not found" >&2
    exit 2
fi

stamp_want="$( { sha256sum "$req" | cut -d' ' -f1; "$python" -c 'import sys; print(sys.version)'; } )"
stamp_file="$venv/.requirements.stamp"
if [[ ! -x "$venv/bin/python" ]] || [[ "$(cat "$stamp_file" 2>/dev/null || true)" != "$stamp_want" ]]; then
    echo "run.sh: creating $venv" >&2
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
    printf '%s\n' "$stamp_want" >"$stamp_file"
fi

bin="${KEYHAVEN_BIN:-target/debug/keyhaven}"
[[ "$bin" = /* ]] || bin="$root/$bin"
if [[ ! -x "$bin" ]]; then
    echo "run.sh: keyhaven binary not found at $bin (build it with \`cargo build -p keyhaven\` or set KEYHAVEN_BIN)" >&2
    exit 2
fi
export KEYHAVEN_BIN="$bin"

cd "$root"
export PYTHONDONTWRITEBYTECODE=1
exec "$venv/bin/python" -m pytest -c "$here/pytest.ini" --rootdir "$here" "$here" "$@"
