"""lmms-eval in a venv of its own, layered on Atoll's (built once per machine, then reused).

lmms-eval 0.7.3 pins ``wandb==0.25.0``, which requires ``protobuf<7``; Atoll's gRPC stubs need
protobuf 7.35+, so the two cannot share one environment. The venv made here holds lmms-eval,
its own dependencies (protobuf 6 among them) and ``filelock<4`` (lmms-eval imports
``filelock._api``, which filelock 4 no longer has); a ``.pth`` line puts Atoll's venv after its
own site-packages, so torch, transformers and the rest are Atoll's, and protobuf is its own
(the ensemble runtime never imports protobuf). Atoll itself is installed without
dependencies for its ``lmms_eval.models`` entry point; the code comes from ``PYTHONPATH``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

LMMS_EVAL = "lmms-eval==0.7.3"
EXTRA = ["filelock<4"]


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "atoll"


def lmms_eval_venv(repo: Path) -> Path:
    """The venv's folder, built on first use (atomically: a half-built one is never reused).

    Raises:
        RuntimeError: pip failed (its output, e.g. no route to the package index).
    """
    atoll_site = sysconfig.get_paths()["purelib"]
    key = hashlib.sha256(f"{sys.prefix}|{LMMS_EVAL}|{EXTRA}".encode()).hexdigest()[:12]
    target = cache_root() / f"lmms-eval-{key}"
    if (target / "ready").is_file():
        return target
    building = target.with_name(target.name + f".building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    base = getattr(sys, "_base_executable", sys.executable)
    _run([base, "-m", "venv", str(building)])
    python = building / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    Path(site, "zz_atoll_venv.pth").write_text(atoll_site + "\n")
    _run([str(python), "-m", "pip", "install", "--quiet", LMMS_EVAL, *EXTRA])
    _run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(repo)])
    (building / "ready").write_text(LMMS_EVAL + "\n")
    shutil.rmtree(target, ignore_errors=True)
    building.rename(target)
    return target


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
