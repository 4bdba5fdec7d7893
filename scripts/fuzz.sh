#!/usr/bin/env bash
# Fuzzes every servicer handler and untrusted-file parser for longer than CI does
# (tests/test_fuzz.py): ATOLL_FUZZ_EXAMPLES inputs per target, new random ones each run.
#   scripts/fuzz.sh                          # 5,000 per target
#   ATOLL_FUZZ_EXAMPLES=50000 scripts/fuzz.sh -k heartbeat
set -euo pipefail
cd "$(dirname "$0")/.."
export ATOLL_FUZZ_EXAMPLES="${ATOLL_FUZZ_EXAMPLES:-5000}"
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_fuzz.py --hypothesis-show-statistics "$@"
