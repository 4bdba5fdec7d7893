"""Regenerates the Python stubs for `federation.proto` (run `python -m protocol.codegen`)."""

from __future__ import annotations

import sys
from pathlib import Path

PROTO = "protocol/federation.proto"
GENERATED = ("federation_pb2.py", "federation_pb2.pyi", "federation_pb2_grpc.py")


def generate(repo_root: Path, out_root: Path) -> list[Path]:
    """Runs protoc (grpcio-tools) on the proto, writing stubs under ``out_root/protocol``."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    (out_root / "protocol").mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{repo_root}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        str(repo_root / PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    return [out_root / "protocol" / name for name in GENERATED]


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    for path in generate(root, root):
        print(f"wrote {path.relative_to(root)}")
    sys.exit(0)
