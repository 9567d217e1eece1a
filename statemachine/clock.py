"""The one clock. Tests patch ``statemachine.clock.now`` (or pass ``now`` explicitly)."""

from __future__ import annotations

import time


def now() -> float:
    """Seconds since the epoch, as a float."""
    return time.time()
