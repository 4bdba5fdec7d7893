#!/usr/bin/env bash
# Runs compose.yaml end to end: a coordinator and two sites train the demo's small data set
# (scripts/demo.py --quick sizes) until both experts are accepted (~5 minutes on 2 cores).
#
#   bash deploy/test-compose.sh        # after deploy/test-containers.sh built the base image
#
# Needs podman and podman-compose (installed here into a throw-away venv from PyPI); builds
# both images on BASE (see test-containers.sh for why this sandbox needs runc, lowered ulimits
# and a Debian base built with debootstrap). Not part of the test suite: it trains.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${BASE:-localhost/atoll-debian-base:bookworm}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
VENV_BIN=${VENV_BIN:-.venv/bin}
work=$(mktemp -d /var/tmp/atoll-compose.XXXX)
conf="$work/containers.conf"
printf '[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n[engine]\nruntime = "runc"\n' >"$conf"
export CONTAINERS_CONF=$conf ATOLL_DATA=$work/data ATOLL_RECIPE=/data/demo-recipe.yaml

for image in coordinator site-agent; do
  podman build --network host --build-arg BASE="$BASE" \
    -v "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro" --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    -f "deploy/$image.Containerfile" -t "atoll-$image" .
done
python3 -m venv "$work/venv" && "$work/venv/bin/pip" install -q podman-compose
"$VENV_BIN/python" - "$ATOLL_DATA" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "scripts")
import demo
out = Path(sys.argv[1])
demo.write_dataset(out, demo.QUICK)
demo.write_recipe(out, demo.QUICK)
PY
compose=("$work/venv/bin/podman-compose" -f deploy/compose.yaml)
trap '"${compose[@]}" down -v >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
"${compose[@]}" up -d
for _ in $(seq 120); do
  states=$(podman ps -a --filter name=atoll_site --format '{{.Status}}')
  if ! grep -q '^Up' <<<"$states"; then break; fi
  sleep 5
done
podman exec atoll_coordinator_1 coordinator status --state /var/lib/atoll --json | python3 -c '
import json, sys
experts = json.load(sys.stdin)["experts"]
print([(e["index"], e["site"], e["phase"]) for e in experts])
assert [e["phase"] for e in experts] == ["accepted", "accepted"], experts'
podman exec atoll_coordinator_1 coordinator audit --state /var/lib/atoll | tail -2
echo "compose: ok (two sites trained and both experts were accepted)"
