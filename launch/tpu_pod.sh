#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM pod slice (one process per host, all joined by
# jax.distributed; every worker gets the same command and the same gs:// workdir).
#
#   bash launch/tpu_pod.sh TPU_NAME ZONE -- --config configs/titok.py:sl256_vq --workdir gs://BUCKET/runs/sl256
#
# Copies this checkout (tracked + untracked, not .venv*/workdirs/.git) to ~/titok_jax on all workers
# with `gcloud compute tpus tpu-vm scp --worker=all` (so uncommitted changes run too; no git access
# or credentials needed on the workers), then runs launch/tpu_worker.sh on all workers over ssh.
# Extra environment for the workers (e.g. TFDS_DATA_DIR=gs://...) goes in TITOK_ENV="K=V K2=V2".
# Restarting the same command resumes from the workdir's latest checkpoint.
set -euo pipefail
if [ $# -lt 3 ] || [ "$3" != "--" ]; then
  echo "usage: bash launch/tpu_pod.sh TPU_NAME ZONE -- --config FILE:VARIANT --workdir gs://... [--config.KEY=VALUE ...]" >&2
  exit 2
fi
tpu="$1"; zone="$2"; shift 3
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

tarball="$(mktemp -d)/titok_jax.tgz"
tar -C "$root" --exclude='.venv*' --exclude=workdirs --exclude=.git --exclude=__pycache__ -czf "$tarball" .
gcloud compute tpus tpu-vm scp "$tarball" "$tpu:~/titok_jax.tgz" --zone "$zone" --worker=all
args="$(printf '%q ' "$@")"
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "rm -rf ~/titok_jax && mkdir -p ~/titok_jax && tar -xzf ~/titok_jax.tgz -C ~/titok_jax && cd ~/titok_jax && env ${TITOK_ENV:-} bash launch/tpu_worker.sh $args"
