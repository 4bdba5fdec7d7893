"""``atoll serve``'s flags are pinned, and bad ones are named before anything loads."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from ensemble import serve_cli
from ensemble.serve.forward import parse_endpoints
from protocol.errors import InvalidArgument


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="atoll serve")
    serve_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_flags_are_pinned() -> None:
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    flags = {o for action in parser._actions for o in action.option_strings}
    assert flags == {
        "-h", "--help", "--ensemble", "--listen", "--served-model-name", "--image-root",
        "--max-tokens", "--timeout", "--backend", "--expert-endpoint", "--expert-model",
        "--max-queue", "--max-batch", "--batch-size", "--batch-window-ms", "--device",
        "--no-verify",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--listen", "localhost"], "--listen 'localhost': expected HOST:PORT"),
        (["--listen", "127.0.0.1:99999"], "expected HOST:PORT"),
        (["--max-queue", "0"], "--max-queue: expected >= 1"),
        (["--image-root", "/no/such/folder"], "--image-root /no/such/folder: not a directory"),
        (["--expert-endpoint", "0=http://a/v1"], "only with --backend openai"),
    ],
)
def test_bad_flags_are_named(argv: list[str], message: str, tmp_path: Path) -> None:
    args = _parse("--ensemble", str(tmp_path), *argv)
    with pytest.raises(InvalidArgument, match=message):
        serve_cli.run(args)


def test_expert_endpoints() -> None:
    endpoints = parse_endpoints(["0=http://a:8001/v1/", "1=http://b:8001/v1"], ["1=lora-b"])
    assert [(e.expert, e.base_url, e.model) for e in endpoints.values()] == [
        (0, "http://a:8001/v1", "expert-0"),
        (1, "http://b:8001/v1", "lora-b"),
    ]
    with pytest.raises(InvalidArgument, match="expected K=VALUE"):
        parse_endpoints(["http://a/v1"], [])
    with pytest.raises(InvalidArgument, match="expert 0 given twice"):
        parse_endpoints(["0=http://a/v1", "0=http://b/v1"], [])
    with pytest.raises(InvalidArgument, match="expected an http"):
        parse_endpoints(["0=ftp://a/v1"], [])
    with pytest.raises(InvalidArgument, match="expert 2 has no --expert-endpoint"):
        parse_endpoints(["0=http://a/v1"], ["2=x"])
