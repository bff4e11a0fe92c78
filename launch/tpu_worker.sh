#!/usr/bin/env bash
# Per-host half of launch/tpu_pod.sh (runs on every TPU VM worker): venv with jax[tpu], then
# `titok-jax train "$@"` with TITOK_MULTIHOST=1, so jax.distributed.initialize() finds the
# coordinator, process count and process id from the TPU metadata by itself.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${TITOK_VENV:-$HOME/.venv-titok-tpu}"   # outside the copied tree: survives re-copies
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
stamp="$venv/.titok_jax_tpu_installed"
want="$(sha256sum setup.py | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -e ".[test]" "jax[tpu]"
  echo "$want" > "$stamp"
fi
export TITOK_MULTIHOST=1
exec "$venv/bin/titok-jax" train "$@"
