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
# glibc's malloc backs large blocks with transparent huge pages: XLA's CPU steps run 20-30 % faster
# (docs/performance.md; sana_jax.cli.restart_with_huge_pages does the same for `python -m sana_jax.train`).
# A glibc.malloc.hugetlb setting of the caller's wins.
case "${GLIBC_TUNABLES:-}" in
  *glibc.malloc.hugetlb*) ;;
  *) export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1" ;;
esac
export PATH="$venv/bin:$PATH"
export VIRTUAL_ENV="$venv"
cd "$root"
exec "$@"
