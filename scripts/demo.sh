#!/usr/bin/env bash
# The main job on one machine: sets up .venv, then runs a loopback federation —
# coordinator init, invite, serve; one `site-agent join`; `coordinator status`.
# Every step below is a command a person could type (see README "A real federation").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

out="${ATOLL_DEMO_DIR:-demo-out}"
rm -rf "$out"
mkdir -p "$out"
port="${ATOLL_DEMO_PORT:-7443}"

echo "== coordinator init"
coordinator init --state "$out/coordinator" --federation demo
echo "== coordinator invite site-a"
token=$(coordinator invite --state "$out/coordinator" site-a --ttl 1h)
echo "   token: ${token:0:40}..."

echo "== coordinator serve on 127.0.0.1:$port (enrolment on $((port + 1)))"
coordinator serve --state "$out/coordinator" --listen "127.0.0.1:$port" \
  --heartbeat-seconds 2 >"$out/coordinator.log" 2>&1 &
server=$!
site=""
cleanup() {
  [ -n "$site" ] && kill "$site" 2>/dev/null || true
  kill "$server" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

echo "== site-agent join (site-a)"
site-agent join --coordinator "127.0.0.1:$port" --token "$token" \
  --workdir "$out/site-a" >"$out/site-a.log" 2>&1 &
site=$!

for _ in $(seq 1 60); do
  if coordinator status --state "$out/coordinator" --json | grep -q '"last_heartbeat": [0-9]'; then
    break
  fi
  sleep 1
done

echo "== coordinator status"
coordinator status --state "$out/coordinator"
coordinator status --state "$out/coordinator" --json >"$out/status.json"
echo "== site-agent status"
site-agent status --workdir "$out/site-a"
grep -q '"last_heartbeat": [0-9]' "$out/status.json" || {
  echo "demo failed: site-a never heartbeated (see $out/*.log)" >&2
  exit 1
}
echo "demo ok: site-a enrolled over pinned TLS and heartbeats over mutual TLS;"
echo "it waits for a partition plan (logs and state in $out/)"
