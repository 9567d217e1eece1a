"""structlog set-up: console logs in development, JSON in production; contextvars bound per entry
point (request_id, task_id); secrets redacted."""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_KEYS = re.compile(r"(secret|token|api_key|password|authorization|key_hash|x-key)", re.I)
_SECRET_VALUES = re.compile(r"(hk_[A-Za-z0-9_\-]{8,}|whsec_[A-Za-z0-9+/=]{8,}|Bearer\s+\S+)")
_SECRET_PARAMS = re.compile(r"\b(token|sig|key|secret|watch)=[^&\s\"']+")


# Every shape above contains one of these: a value without any is left as it is, unscanned (one
# search instead of two substitutions per value of every line).
_MAYBE_SECRET = re.compile(r"hk_|whsec_|Bearer|=")


@functools.lru_cache(maxsize=1024)
def _secret_name(name: str) -> bool:
    return _SECRET_KEYS.search(name) is not None


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Drop secret-looking values from a log event (keys by name, keys and tokens by shape)."""
    for name, value in list(event.items()):
        if _secret_name(name):
            event[name] = "[redacted]"
        elif isinstance(value, str) and _MAYBE_SECRET.search(value):
            value = _SECRET_VALUES.sub("[redacted]", value)
            event[name] = _SECRET_PARAMS.sub(r"\1=[redacted]", value)
    return event


def configure_logging(level: str = "info", fmt: str = "console", *, cache: bool = False) -> None:
    """Configure structlog once per process. ``cache``: each module's logger is bound once, on
    its first line, instead of on every line (``hookline serve``; tests re-configure logging
    after start-up and keep it off)."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=cache,
    )
