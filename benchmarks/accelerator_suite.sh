#!/usr/bin/env bash
# The accelerator suite (benchmarks/accelerator_suite.py): training steps, generation and decoding
# of the published sizes on a GPU/TPU host, one table of images/s, MFU and peak memory.
#   bash benchmarks/accelerator_suite.sh [--out DIR] [--batch_per_device N] [--smoke]
# Uses $PYTHON, else the project's .venv when there is one, else python3.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "${TITOK_VENV:-$root/.venv}/bin/python" ]; then python="${TITOK_VENV:-$root/.venv}/bin/python"
  else python=python3; fi
fi
exec "$python" "$root/benchmarks/accelerator_suite.py" "$@"
