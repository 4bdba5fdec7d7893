"""Reading a typed format at the edge: one error style for every file that crosses a boundary.

A pydantic error becomes one line per problem, each naming the file, the dotted field and what
was expected (``plan.json: clusters.1.samples: Input should be greater than or equal to 0, got
-3``), raised as :class:`~protocol.errors.InvalidArgument`. The formats (plan, shard manifest,
assignment, recipe description) call :func:`parse_model` and :func:`read_json`, so a bad file
reads the same wherever it is found.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from protocol.errors import InvalidArgument, NotFound

__all__ = [
    "NonNegativeInt",
    "Sha256Hex",
    "StrictFormat",
    "describe_errors",
    "parse_model",
    "read_json",
]

Model = TypeVar("Model", bound=BaseModel)


class StrictFormat(BaseModel):
    """Unknown keys are errors (a typo in a hand-edited file must not be ignored); values are
    immutable once read."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _non_negative_int(value: Any) -> int:
    # JSON has no integer type of its own: 2.0, "2" and true are not counts.
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return value


NonNegativeInt = Annotated[int, BeforeValidator(_non_negative_int)]
"""An integer >= 0, given as a JSON integer (not a float, string or boolean)."""

Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
"""A sha256 as 64 lowercase hex digits."""


def _describe(error: Any) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key (remove it or check its spelling)"
    if error["type"] == "missing":
        return f"{where}: required, missing"
    message = str(error["msg"])
    if error["type"] == "value_error":
        # Our own checks say what they got; cross-field checks name their own field.
        message = message.removeprefix("Value error, ")
        field, colon, rest = message.partition(": ")
        if not error["loc"]:
            return message  # a check of the whole document names its own field
        if colon and field.isidentifier():
            return f"{where}.{field}: {rest}"  # a nested model's check, naming its field
        return f"{where}: {message}"
    given = error.get("input")
    shown = "" if isinstance(given, dict | list) else f", got {given!r}"
    return f"{where}: {message}{shown}"


def describe_errors(error: ValidationError) -> str:
    """Every problem of a validation error, ``; ``-separated, each naming its dotted field."""
    return "; ".join(_describe(item) for item in error.errors())


def parse_model(model: type[Model], data: Any, source: str) -> Model:
    """Validates decoded JSON into ``model``.

    Args:
        model: The format's pydantic model.
        data: The decoded document.
        source: How errors name the input (the file, e.g. ``shard manifest expert-0.json``).

    Raises:
        InvalidArgument: naming each field that is wrong and what was expected.
    """
    if not isinstance(data, dict):
        raise InvalidArgument(f"{source}: expected a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise InvalidArgument(f"{source}: {describe_errors(error)}") from None


def read_json(path: Path, what: str) -> tuple[bytes, Any]:
    """The bytes of a JSON file and their decoded value.

    Args:
        path: The file.
        what: How errors name it (``shard manifest``, ``partition plan``, ...).

    Raises:
        NotFound: no such file.
        InvalidArgument: not readable or not JSON.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"{what} {path}: no such file") from None
    except OSError as error:
        raise InvalidArgument(f"{what} {path}: not readable ({error})") from None
    try:
        return raw, json.loads(raw)
    except ValueError as error:
        raise InvalidArgument(f"{what} {path}: not valid JSON ({error})") from None
