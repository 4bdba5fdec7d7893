#!/bin/sh
# One-shot set-up for compose.yaml: a federation of two sites over the dataset in /data.
# Idempotent: an existing federation is kept; tokens are written once (one use each).
set -eu
STATE=/var/lib/atoll
if [ ! -f "$STATE/federation.json" ]; then
  coordinator init --state "$STATE" --federation "${ATOLL_FEDERATION:-compose}"
  coordinator partition --state "$STATE" --dataset /data/train.json --image-root /data/images \
    --experts 2 --encoder "${ATOLL_ENCODER:-open_clip:atoll-tiny-clip}" --device cpu
  coordinator recipe --state "$STATE" --recipe "${ATOLL_RECIPE:-/opt/atoll/configs/tiny-cpu.yaml}"
fi
for site in site-a site-b; do
  if [ ! -s "/tokens/$site.token" ]; then
    coordinator invite --state "$STATE" "$site" --ttl 24h > "/tokens/$site.token"
  fi
done
