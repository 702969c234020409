#!/usr/bin/env bash
# Installs Python `eventsourcing` with PostgreSQL support into a private virtualenv (from PyPI)
# and runs eventsourcing_bench.py.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.work/venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "eventsourcing[postgres]==9.5.6" "psycopg[binary]" >&2
fi
exec "$venv/bin/python" "$here/eventsourcing_bench.py"
