"""Fault injection for crash tests: named points in the coordinator where a test can have
the process killed (``ATOLL_FAULTS=commit-recorded coordinator serve ...``).

Unset (always, outside tests) a point costs one dictionary lookup. Only SIGKILL is offered:
what these tests check is that nothing is lost when the process dies without a chance to
clean up, which is what a power loss or the OOM killer does.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("atoll.coordinator")

# Points that exist (a typo in ATOLL_FAULTS should fail loudly, not test nothing).
POINTS = frozenset({"commit-recorded"})


def armed() -> frozenset[str]:
    """The points ``ATOLL_FAULTS`` (comma-separated) names."""
    names = frozenset(n.strip() for n in os.environ.get("ATOLL_FAULTS", "").split(",") if n)
    unknown = names - POINTS
    if unknown:
        raise ValueError(f"ATOLL_FAULTS names {sorted(unknown)}: expected some of {sorted(POINTS)}")
    return names


def point(name: str) -> None:
    """Kills this process with SIGKILL when ``name`` is armed."""
    if name in armed():
        log.error("[faults] %s: killing the coordinator (ATOLL_FAULTS)", name)
        os.kill(os.getpid(), signal.SIGKILL)
