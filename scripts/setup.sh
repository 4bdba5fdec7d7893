#!/usr/bin/env bash
# Creates .venv at the repository root with everything Atoll needs (idempotent).
# torch + torchvision come as a matched pair from constraints.txt (DESIGN §9); on a machine
# with an NVIDIA driver the `cuda` extra (DeepSpeed) is added so its GPUs are usable.
set -euo pipefail
cd "$(dirname "$0")/.."

python_bin="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python_bin" -m venv .venv
fi

extras="dev"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  extras="dev,cuda"
fi

# Skip the (slow) resolver when nothing that decides the environment has changed.
stamp=".venv/.atoll-setup"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-64) $extras"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[$extras]"
  .venv/bin/python - <<'PY'
import open_clip, torch, torchvision, transformers  # noqa: F401  (fails loudly on a broken pair)
from torchvision.ops import nms  # noqa: F401  (the import that breaks on a mismatched pair)
print(f"atoll setup: torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"cuda available: {torch.cuda.is_available()}")
PY
  echo "$want" > "$stamp"
fi
