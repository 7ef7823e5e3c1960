#!/usr/bin/env bash
# Runs rebalance_jax on every worker of a Cloud TPU pod slice (every worker runs the same command;
# JAX finds the coordinator itself, --distributed=on).
#
#   launch/tpu_pod.sh TPU_NAME ZONE BUCKET RUN_NAME --config=configs/flickr.py [--config.x=y ...]
#
# 1. packs the committed code (git archive HEAD) and copies it to all workers;
# 2. installs it with the TPU build of JAX, and mounts gs://BUCKET at /gcs/BUCKET with gcsfuse;
# 3. runs `python -m rebalance_jax.train --workdir=/gcs/BUCKET/RUN_NAME ...` on all workers.
# Data paths (--config.data.*) must exist on every worker (e.g. under the same mount). Re-running
# the same command after a preemption resumes from the workdir's latest checkpoint.
set -euo pipefail
if [ $# -lt 5 ]; then
  sed -n '2,13p' "$0"; exit 2
fi
TPU_NAME=$1; ZONE=$2; BUCKET=$3; RUN_NAME=$4; shift 4
ARGS=$(printf ' %q' "$@")
ARCHIVE=$(mktemp --suffix=.tar.gz)
git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$ARCHIVE" HEAD
gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME":rebalance_jax.tar.gz --zone="$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  set -euo pipefail
  rm -rf ~/rebalance_jax && mkdir -p ~/rebalance_jax && tar xzf ~/rebalance_jax.tar.gz -C ~/rebalance_jax
  cd ~/rebalance_jax && pip install -q -e . 'jax[tpu]'
  sudo mkdir -p /gcs/$BUCKET && (mountpoint -q /gcs/$BUCKET || sudo gcsfuse --implicit-dirs -o allow_other $BUCKET /gcs/$BUCKET)
  python -m rebalance_jax.train --distributed=on --workdir=/gcs/$BUCKET/$RUN_NAME $ARGS"
