#!/usr/bin/env bash
# The main job on one machine: sets up .venv, then runs scripts/demo.py — a K=2 federation and
# its compute-matched dense baseline on loopback (data, partition, training at two sites,
# signing, upload, assembly, download, verification, evaluation, report) in minutes on CPU.
# Every step it runs is a command a person could type; it prints each one as `$ ...`.
# ATOLL_DEMO_DIR (default demo-out) and ATOLL_DEMO_PORT (default 7443; the dense baseline's
# coordinator takes PORT+10) change where it writes and listens; extra arguments pass through
# (`bash scripts/demo.sh --quick` runs the small flow of the end-to-end test).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python scripts/demo.py "$@"
