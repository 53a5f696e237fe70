#!/usr/bin/env bash
# Runs a command inside the project's virtual environment at .venv/, creating it and
# installing the project (with its test extras) on first use or when pyproject.toml changes.
# Usage: tools/venv_run.sh python -m sana_jax.train --config=configs/grow.py
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.sana_jax_installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing sana-jax and its test extras into $venv" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/python" -m pip install -q -e "$root[test]" >&2
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
export VIRTUAL_ENV="$venv"
cd "$root"
# With the allocator settings of sana_jax.cli.allocator_environment: tcmalloc where installed, else glibc's malloc
# on huge pages (XLA's CPU steps run up to 30 % faster; docs/performance.md).
exec "$venv/bin/python" -m sana_jax.cli "$@"
