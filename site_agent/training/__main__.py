"""Entry point: ``python -m site_agent.training --recipe FILE --shard FILE --output DIR ...``.

Parse, build, train, close. Every setting lives in the recipe; the flags only say which files
to use, so that a supervisor can restart the same command after a crash (with ``--resume``).
Exit codes come from :mod:`protocol.exit_codes` (0 done, 3 bad input, 4 not found, 7 wrong
state, 8 digest mismatch, 130 stopped by SIGTERM after a checkpoint, 1 anything unexpected);
progress goes out as JSON lines (see :class:`~site_agent.training.progress_log.ProgressLog`),
human-readable errors to standard error.

Under torchrun every rank runs this entry point. torchrun exits 1 whatever failed, so a rank
that fails also writes torchelastic's error file (``TORCHELASTIC_ERROR_FILE``, the format of
``@record``) with its rank and message; torchrun copies the first failing rank's file into its
own error file with that rank's exit code (``errorCode``), where the supervisor reads it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from protocol.errors import AtollError
from protocol.exit_codes import ExitCode


def build_parser() -> argparse.ArgumentParser:
    """The command line (pinned by a test: new options belong in the recipe)."""
    parser = argparse.ArgumentParser(
        prog="python -m site_agent.training",
        description="Train one expert on its shard (a child process of the site agent).",
    )
    parser.add_argument("--recipe", type=Path, required=True, help="training recipe (YAML)")
    parser.add_argument("--shard", type=Path, required=True, help="shard manifest expert-<k>.json")
    parser.add_argument(
        "--image-root", type=Path, default=None, help="directory the shard's images are under"
    )
    parser.add_argument("--output", type=Path, required=True, help="run directory")
    parser.add_argument(
        "--base-model", type=Path, default=None, help="local base checkpoint directory"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest complete checkpoint"
    )
    parser.add_argument(
        "--progress",
        default="-",
        help="where JSON-line progress goes: '-' for standard output (default) or a file",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one training job; returns the process exit code."""
    args = build_parser().parse_args(argv)
    # Imported after parsing so that --help and usage errors answer without loading torch.
    from protocol.recipe import load_recipe
    from protocol.shard_manifest import load_shard_manifest
    from site_agent.training.progress_log import ProgressLog
    from site_agent.training.trainer import TrainingJob, TrainingStopped, run_training

    progress = ProgressLog.open(args.progress)
    try:
        recipe, recipe_sha256 = load_recipe(args.recipe)
        job = TrainingJob(
            recipe=recipe,
            recipe_sha256=recipe_sha256,
            recipe_dir=args.recipe.resolve().parent,
            shard=load_shard_manifest(args.shard),
            image_root=args.image_root,
            output=args.output,
            base_model=args.base_model,
            resume=args.resume,
        )
        _quiet_libraries()
        run_training(job, progress)
        return int(ExitCode.OK)
    except AtollError as error:
        progress.error(error)
        print(f"site_agent.training: {error}", file=sys.stderr)
        _record_failure(error)
        return int(error.exit_code)
    except TrainingStopped as stopped:
        print(f"site_agent.training: {stopped}", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    except KeyboardInterrupt:
        print("site_agent.training: interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    except Exception as error:
        # A bug or an environment failure: tell the supervisor, keep the traceback for people.
        message = f"{type(error).__name__}: {error}"
        progress.emit("error", error="unexpected", message=message, exit_code=int(ExitCode.ERROR))
        _record_failure(error)
        raise
    finally:
        progress.close()


def _record_failure(error: BaseException) -> None:
    """Writes torchelastic's error file for this rank, when torchrun asked for one.

    The layout of ``torch.distributed.elastic``'s ``@record`` (``message.message``,
    ``extraInfo.py_callstack`` and ``timestamp``), plus ``extraInfo.rank``: ``@record`` itself
    only sees exceptions that escape, while a domain error here becomes an exit code.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    record = {
        "message": {
            "message": f"{type(error).__name__}: {error}",
            "extraInfo": {
                "py_callstack": traceback.format_exc(),
                "timestamp": str(int(time.time())),
                "rank": int(os.environ.get("RANK", "0")),
            },
        }
    }
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(record, handle)


def _quiet_libraries() -> None:
    # Progress is reported as JSON lines; transformers' own bars and info logs are noise here.
    from transformers.utils import logging

    logging.set_verbosity_warning()
    logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
