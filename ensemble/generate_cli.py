"""``atoll generate``: answer one prompt (with or without an image) with a routed ensemble.

Example::

    atoll generate --ensemble ensemble/ --image cat.png --prompt "What is this?" --top-k 2
    atoll generate --ensemble ensemble/ --prompt "Tell me a joke." --text-only posterior --json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from protocol.ensemble_manifest import TextOnlyStrategy

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``atoll generate``'s options to ``parser``."""
    parser.add_argument("--ensemble", required=True, help="the ensemble directory")
    parser.add_argument("--image", help="the image file (omit for a text-only prompt)")
    parser.add_argument("--prompt", required=True, help="the question")
    parser.add_argument(
        "--top-k", type=int, help="experts mixed (default: the ensemble's router.top_k)"
    )
    parser.add_argument(
        "--text-only",
        choices=[s.value for s in TextOnlyStrategy],
        help="routing without an image (default: the ensemble's router.text_only)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, help="makes --sample reproducible")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA if available)")
    parser.add_argument(
        "--no-verify", action="store_true", help="skip checking every file's sha256 first"
    )
    parser.add_argument("--json", action="store_true", help="print the answer and routing as JSON")


def run(args: argparse.Namespace) -> int:
    """Loads the ensemble, answers, prints; returns the exit code (errors raise AtollError)."""
    # Imported here: torch and transformers take seconds, and `atoll --help` should not.
    from ensemble.runtime import RoutedEnsemble

    ensemble = RoutedEnsemble.from_pretrained(
        Path(args.ensemble), verify=not args.no_verify, device=args.device
    )
    result = ensemble.generate_tokens(
        [Path(args.image) if args.image else None],
        [args.prompt],
        args.max_new_tokens,
        top_k=args.top_k,
        text_only=args.text_only,
        do_sample=args.sample,
        temperature=args.temperature,
        seed=args.seed,
    )
    if args.json:
        posterior = result.posteriors[0]
        print(
            json.dumps(
                {
                    "text": result.texts[0],
                    "tokens": result.token_ids[0],
                    "experts": result.experts[0],
                    "weights": result.weights[0],
                    "final_posterior": None if posterior is None else posterior[-1].tolist(),
                },
                indent=2,
            )
        )
    else:
        print(result.texts[0])
    return 0
