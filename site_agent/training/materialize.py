"""``python -m site_agent.training.materialize --recipe FILE --output DIR``: writes a recipe's
``init-from-config`` base checkpoint with ``save_pretrained``.

The coordinator runs this once per federation (as a child process: it never imports the site
agent) so that every site verifies and starts from the very same files.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from protocol.errors import AtollError
from protocol.recipe import load_recipe


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m site_agent.training.materialize")
    parser.add_argument("--recipe", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        recipe, _ = load_recipe(args.recipe)
        from site_agent.training.model import materialize_tiny_base

        materialize_tiny_base(recipe.model, args.output)
    except AtollError as error:
        print(f"materialize: {error}", file=sys.stderr)
        return int(error.exit_code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
