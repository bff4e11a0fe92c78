#!/usr/bin/env bash
# Train on one GPU host with all its GPUs: one process sees every local GPU, the mesh is data=-1.
#
#   bash launch/gpu_host.sh --config configs/titok.py:sl256_vq --workdir /data/runs/sl256 [--config.KEY=VALUE ...]
#
# Creates/reuses $TITOK_VENV (default .venv-gpu next to setup.py) with `.[test]` plus `jax[cuda12]`:
# the CUDA 12 wheels bring their own CUDA/cuDNN/NCCL from pip, so only an NVIDIA driver >= 525 is
# needed on the host (use `jax[cuda12_local]` instead to use a system CUDA install).
# Pick GPUs with CUDA_VISIBLE_DEVICES. No jax.distributed here: one process, no coordinator.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${TITOK_VENV:-$root/.venv-gpu}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
stamp="$venv/.titok_jax_gpu_installed"
want="$(sha256sum setup.py | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -e ".[test]" "jax[cuda12]"
  echo "$want" > "$stamp"
fi
"$venv/bin/python" -c 'import jax; print(f"[titok_jax] {jax.device_count()} x {jax.devices()[0].device_kind}", flush=True)' >&2
unset TITOK_MULTIHOST JAX_COORDINATOR_ADDRESS  # single process: never wait for a coordinator
exec "$venv/bin/titok-jax" train "$@"
