"""``atoll serve``: serve an ensemble over OpenAI's chat-completions API (see
:mod:`ensemble.serve`).

Example::

    atoll serve --ensemble ensemble/ --listen 127.0.0.1:8000
    atoll serve --ensemble ensemble/ --listen 0.0.0.0:8000 --backend openai \\
        --expert-endpoint 0=http://gpu-a:8001/v1 --expert-endpoint 1=http://gpu-b:8001/v1
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from protocol.errors import InvalidArgument

__all__ = ["add_arguments", "run"]

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``atoll serve``'s options to ``parser``."""
    parser.add_argument("--ensemble", required=True, help="the ensemble directory")
    parser.add_argument("--listen", default="127.0.0.1:8000", help="HOST:PORT to serve on")
    parser.add_argument(
        "--served-model-name", default="atoll", help="the model name clients ask for"
    )
    parser.add_argument(
        "--image-root", help="file:// images must be under this folder (default: refused)"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=256, help="most tokens per answer (also the default)"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument(
        "--backend",
        choices=["local", "openai"],
        default="local",
        help="local: the ensemble in this process; openai: forward to each expert's server",
    )
    parser.add_argument(
        "--expert-endpoint",
        action="append",
        default=[],
        metavar="K=URL",
        help="expert K's OpenAI base URL (e.g. http://gpu-a:8001/v1); --backend openai",
    )
    parser.add_argument(
        "--expert-model",
        action="append",
        default=[],
        metavar="K=NAME",
        help="the model name selecting expert K on its server (default: expert-K)",
    )
    parser.add_argument(
        "--max-queue", type=int, default=64, help="requests in flight before answering 429"
    )
    parser.add_argument(
        "--max-batch", type=int, default=32, help="most requests decoding at once (one batch)"
    )
    parser.add_argument(
        "--batch-size", type=int, help="rows per model call (default: the whole batch)"
    )
    parser.add_argument(
        "--batch-window-ms",
        type=float,
        default=10.0,
        help="an idle server gathers its first batch until this long passes without a new "
        "request (8 windows at most); later ones join the running batch at the next step",
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA if available)")
    parser.add_argument(
        "--no-verify", action="store_true", help="skip checking every file's sha256 first"
    )


def _address(listen: str) -> tuple[str, int]:
    host, colon, port = listen.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"--listen {listen!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def run(args: argparse.Namespace) -> int:
    """Loads the ensemble (or its router), serves until interrupted; returns the exit code."""
    import uvicorn

    from ensemble.serve.app import Backend, create_app

    host, port = _address(args.listen)
    for flag in ("max_tokens", "max_queue", "max_batch"):
        if getattr(args, flag) < 1:
            raise InvalidArgument(f"--{flag.replace('_', '-')}: expected >= 1")
    image_root = Path(args.image_root) if args.image_root else None
    if image_root is not None and not image_root.is_dir():
        raise InvalidArgument(f"--image-root {image_root}: not a directory")
    backend: Backend
    if args.backend == "openai":
        from ensemble.serve.forward import ForwardBackend, parse_endpoints

        endpoints = parse_endpoints(args.expert_endpoint, args.expert_model)
        backend = ForwardBackend(
            Path(args.ensemble),
            endpoints,
            args.served_model_name,
            image_root=image_root,
            timeout_s=args.timeout,
            verify=not args.no_verify,
            device=args.device,
        )
    else:
        if args.expert_endpoint or args.expert_model:
            raise InvalidArgument("--expert-endpoint/--expert-model: only with --backend openai")
        from ensemble.runtime import RoutedEnsemble
        from ensemble.serve.engine import Engine
        from ensemble.serve.local import LocalBackend

        ensemble = RoutedEnsemble.from_pretrained(
            Path(args.ensemble), verify=not args.no_verify, device=args.device
        )
        engine = Engine(
            ensemble,
            max_queue=args.max_queue,
            max_batch=args.max_batch,
            batch_size=args.batch_size,
            window_s=args.batch_window_ms / 1000,
        )
        engine.start()
        backend = LocalBackend(
            engine,
            args.served_model_name,
            image_root=image_root,
            max_tokens=args.max_tokens,
            timeout_s=args.timeout,
        )
    app = create_app(backend, args.served_model_name)
    log.info("[serve] %s on http://%s:%d/v1", args.served_model_name, host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning", ws="none")
    return 0
