#!/usr/bin/env bash
# Creates (or updates) the Flower app's own virtual environment: flwr cannot share Atoll's
# (it needs protobuf<7, rich<15, typer<0.21). Usage:
#   bash integrations/flower/install.sh VENV [--datasets]
# --datasets adds flwr-datasets for atoll_flower.partitioner. Idempotent: a stamp of this
# file and pyproject.toml skips the resolver when nothing changed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${1:?usage: install.sh VENV [--datasets]}"
extras=""
if [ "${2:-}" = "--datasets" ]; then extras="[datasets]"; fi
python_bin="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python_bin" -m venv "$venv"
fi
stamp="$venv/.atoll-flower-setup"
want="$(cat "$here/pyproject.toml" "$here/install.sh" | sha256sum | cut -c1-64) $extras"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet "$here$extras"
  "$venv/bin/flwr" --version
  echo "$want" > "$stamp"
fi
