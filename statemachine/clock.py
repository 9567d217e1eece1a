"""The one clock. Tests patch ``statemachine.clock.now`` (or pass ``now`` explicitly)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import overload


def now() -> float:
    """Seconds since the epoch, as a float."""
    return time.time()


@overload
def iso(ts: float) -> str: ...
@overload
def iso(ts: None) -> None: ...
@overload
def iso(ts: float | None) -> str | None: ...
def iso(ts: float | None) -> str | None:
    """``ts`` as ISO-8601 in UTC with a ``Z`` (how the API writes every time); None stays None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")
