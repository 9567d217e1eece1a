"""The cyclic garbage collector switched off around a block, for tests that prove objects are
freed by reference counting alone (not left in cycles for the collector to find)."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def collector_off() -> Iterator[None]:
    """One full collection first, so what the block leaves in cycles is its own."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
