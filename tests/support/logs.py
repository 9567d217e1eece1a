"""Capturing structlog lines in a test whatever the process's configured level.

``structlog.testing.capture_logs`` swaps the processors only: a filtering wrapper configured
earlier (an app started with ``log_level="error"``) would drop the lines before they are captured,
so a test's outcome would depend on the tests that ran before it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, MutableMapping
from typing import Any

import structlog
from structlog.testing import capture_logs


@contextlib.contextmanager
def captured_logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """Every line logged inside the block, at any level."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        with capture_logs() as logs:
            yield logs
    finally:
        structlog.configure(**saved)
