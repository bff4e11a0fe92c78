#!/usr/bin/env bash
# One-command set-up and run on a single machine (laptop, CI, one GPU host).
#
#   bash launch/local.sh test [PYTEST_ARGS...]   create/reuse .venv, install .[test], run the test suite
#                                                (two pytest-xdist workers; TITOK_TEST_WORKERS=0: one process)
#   bash launch/local.sh main                    create/reuse .venv, install, train `tiny` TiTok on `sample`
#   bash launch/local.sh run CMD ARGS...         create/reuse .venv, install, run `titok-jax CMD ARGS...`
#
# The virtual environment lives in $TITOK_VENV (default: .venv next to setup.py). Installation is
# skipped when setup.py has not changed since the last successful install.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${TITOK_VENV:-$root/.venv}"
python="${PYTHON:-python3}"

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "titok_jax needs Python >= 3.11 (found: $("$python" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "[titok_jax] creating virtual environment in $venv" >&2
  "$python" -m venv "$venv"
fi

stamp="$venv/.titok_jax_installed"
want="$(cat setup.py | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[titok_jax] installing titok_jax and its dependencies into $venv (first run takes a few minutes)" >&2
  "$venv/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  "$venv/bin/python" -m pip install --quiet -e ".[test]"
  echo "$want" > "$stamp"
fi

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  test)
    # Two pytest-xdist workers by default (TITOK_TEST_WORKERS=0: one process): most tests are
    # single-threaded XLA compiles, so a 2-core CI machine runs two at once. --dist loadscope keeps
    # each module (and its module-scoped fixtures) on one worker. An explicit -n / -p no:xdist wins.
    workers="${TITOK_TEST_WORKERS:-$(( $(nproc 2>/dev/null || echo 1) >= 2 ? 2 : 0 ))}"
    xdist=()
    if [ "$workers" -gt 0 ] && ! printf '%s\n' "$@" | grep -qE '^(-n|--numprocesses|no:xdist|-pno:xdist)'; then
      xdist=(-n "$workers" --dist loadscope)
    fi
    set +e
    "$venv/bin/python" -m pytest "${xdist[@]}" "$@"
    status=$?
    set -e
    if [ "$status" -eq 5 ]; then
      echo "[titok_jax] pytest collected no tests: failing on purpose" >&2
      exit 1
    fi
    exit "$status"
    ;;
  main)
    workdir="${TITOK_WORKDIR:-$root/workdirs/tiny_sample}"
    exec "$venv/bin/titok-jax" train --config "$root/configs/titok.py:tiny" --workdir "$workdir" "$@"
    ;;
  run)
    exec "$venv/bin/titok-jax" "$@"
    ;;
  *)
    echo "usage: bash launch/local.sh {test [pytest args] | main [--config.KEY=VALUE ...] | run COMMAND [ARGS]}" >&2
    exit 2
    ;;
esac
