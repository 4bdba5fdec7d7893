"""What the ServerApp and the ClientApp agree on: message types and ``ConfigRecord`` keys.

Every message is a ``query`` whose content is one ``ConfigRecord`` named ``atoll``; weights
never travel over Flower (an ``ArrayRecord`` is refused on both sides).
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

RECORD = "atoll"

IDENTIFY = "query.identify"
"""Server -> node: who are you? Reply: ``site``, ``enrolled``, ``running``, ``phase``."""

JOIN = "query.join"
"""Server -> node: ``coordinator``, ``enrol_address``, ``token`` (empty when the workdir is
already enrolled), ``ca_sha256``, ``federation``. Reply: ``started``, ``pid``, ``error``."""

STATUS = "query.status"
"""Server -> node: nothing. Reply: ``site``, ``phase``, ``expert``, ``step``, ``total_steps``,
``accepted_digest``, ``running``, ``message``, ``error``."""


def content(values: dict[str, str | int | float | bool]) -> RecordDict:
    """A message body: one ConfigRecord."""
    return RecordDict({RECORD: ConfigRecord(dict(values))})


def values(message: Message) -> dict[str, object]:
    """The ``atoll`` ConfigRecord of a message (empty when absent)."""
    if not message.has_content():
        return {}
    record = message.content.config_records.get(RECORD)
    return dict(record) if record is not None else {}


def array_records(message: Message) -> int:
    """How many ArrayRecords a message holds (always 0 for this app's messages)."""
    return len(message.content.array_records) if message.has_content() else 0


def refuse_arrays(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A ClientApp mod: a message carrying arrays, in or out, is an error, never handled."""
    if array_records(message):
        raise ValueError(f"{message.metadata.message_type}: Atoll over Flower carries no arrays")
    reply = call_next(message, context)
    if array_records(reply):
        raise ValueError(f"reply to {message.metadata.message_type} would carry arrays")
    return reply
