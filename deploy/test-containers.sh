#!/usr/bin/env bash
# Builds the coordinator image and runs it: init + invite in throw-away containers, `serve` in
# a long-running one, then from the host `coordinator health`, a site enrolling with
# `site-agent join`, a metrics scrape, `status` inside the container and a graceful stop.
#
#   bash deploy/test-containers.sh            # needs podman, runc and debootstrap (root)
#
# Written for a sandbox where registries of container images are unreachable and crun cannot
# run: the base image is built from Debian's packages with debootstrap (pass BASE=IMAGE to use
# another, e.g. docker.io/library/python:3.11-slim where it can be pulled), runc replaces crun
# (cgroups v1/v2 hybrid), and ulimits are lowered to what the sandbox lets a container set.
# A TLS-intercepting proxy's CA (CA_BUNDLE) is mounted into the build so pip can reach PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${BASE:-localhost/atoll-debian-base:bookworm}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
PORT=${PORT:-17443}
PODMAN=(podman --runtime "${RUNTIME:-runc}")
LIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
VENV_BIN=${VENV_BIN:-.venv/bin}
say() { printf '\n== %s\n' "$*"; }

if ! "${PODMAN[@]}" image exists "$BASE"; then
  [[ $BASE == localhost/atoll-debian-base:* ]] || { echo "cannot find base image $BASE"; exit 1; }
  say "building $BASE from Debian's packages (debootstrap)"
  rootfs=$(mktemp -d /var/tmp/atoll-rootfs.XXXX)
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm \
    "$rootfs" http://deb.debian.org/debian >/dev/null
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb
  tar -C "$rootfs" -c . | "${PODMAN[@]}" import --change 'CMD ["/bin/bash"]' - "$BASE"
  rm -rf "$rootfs"
fi

say "podman build -f deploy/coordinator.Containerfile"
"${PODMAN[@]}" build --network host "${LIMITS[@]}" --build-arg BASE="$BASE" \
  -v "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro" --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
  -f deploy/coordinator.Containerfile -t atoll-coordinator .

volume=atoll-test-state-$$
name=atoll-test-coordinator-$$
site=$(mktemp -d)
cleanup() {
  "${PODMAN[@]}" rm -f "$name" >/dev/null 2>&1 || true
  "${PODMAN[@]}" volume rm -f "$volume" >/dev/null 2>&1 || true
  rm -rf "$site"
}
trap cleanup EXIT
run() { "${PODMAN[@]}" run --rm "${LIMITS[@]}" --network none -v "$volume:/var/lib/atoll" atoll-coordinator "$@"; }

say "coordinator init / invite (containers)"
run init --state /var/lib/atoll --federation containers
token=$(run invite --state /var/lib/atoll alpha)
say "coordinator serve (container, host network, port $PORT)"
"${PODMAN[@]}" run -d --name "$name" "${LIMITS[@]}" --network host -v "$volume:/var/lib/atoll" \
  atoll-coordinator serve --state /var/lib/atoll --listen "127.0.0.1:$PORT" \
  --metrics-listen "127.0.0.1:$((PORT + 2))" >/dev/null
for _ in $(seq 60); do
  if "${PODMAN[@]}" exec "$name" coordinator health --state /var/lib/atoll \
      --address "127.0.0.1:$((PORT + 1))" --timeout 2 >/dev/null 2>&1; then break; fi
  sleep 1
done
say "health (inside) and a site enrolling (host)"
"${PODMAN[@]}" exec "$name" coordinator health --state /var/lib/atoll --address "127.0.0.1:$((PORT + 1))"
"$VENV_BIN/site-agent" join --coordinator "127.0.0.1:$PORT" --token "$token" --workdir "$site" --until waiting
metrics=$(python3 -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:$((PORT + 2))/metrics').read().decode())")
grep -F 'atoll_rpc_requests_total{code="OK",method="Enroll"} 1.0' <<<"$metrics"
grep -F 'atoll_sites{phase="enrolled"} 1.0' <<<"$metrics"
"${PODMAN[@]}" exec "$name" coordinator status --state /var/lib/atoll --json \
  | python3 -c 'import json,sys; d=json.load(sys.stdin); assert [s["site"] for s in d["sites"]] == ["alpha"]; print("status: alpha enrolled")'
say "graceful stop"
"${PODMAN[@]}" stop -t 20 "$name" >/dev/null
code=$("${PODMAN[@]}" inspect "$name" --format '{{.State.ExitCode}}')
[[ $code == 0 ]] || { "${PODMAN[@]}" logs "$name" | tail -20; echo "exit code $code"; exit 1; }
echo "containers: ok (coordinator image built, served, enrolled a site, stopped cleanly)"
