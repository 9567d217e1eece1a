"""structlog set-up: console logs in development, JSON in production; contextvars bound per entry
point (request_id, task_id); secrets redacted.

``hookline serve`` writes its lines from a thread of their own (``LineWriter``): a line is
rendered where it is logged and queued, and the writer thread writes what has queued up, in one
write and flush. Written by the logging code itself, each line was a ``write`` system call on
the event loop's thread, which let go of the GIL for it and then waited to take it back from the
database and image threads (a cProfile of the loop's thread in bench_e2e's phase B: 215 µs per
call, three lines a task; a loop logging beside a busy database thread: 60–76 µs of CPU per line
written directly, 36–48 queued; bench/RESULTS.md).

What the queue costs: a line still queued when the process is killed outright is lost (at a
normal exit, ``atexit``, the writer goes on while it makes progress); lines written to stderr by
other code (uvicorn's, a traceback) can come out before structlog lines logged earlier; and when
stderr cannot keep up, lines beyond ``MAX_QUEUED`` are dropped, counted, and the count is written
when it can be, instead of the service stalling on its logs. Where the writer thread is gone (a
forked child, after ``close``) or stderr is missing, lines are written directly, as before.
"""

from __future__ import annotations

import atexit
import functools
import logging
import queue
import re
import sys
import threading
import time
from collections.abc import MutableMapping
from typing import Any, Final, TextIO

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


class LineWriter:
    """Writes queued log lines to ``file`` from its own daemon thread (module docstring): each
    pass writes everything queued by then (up to ``MAX_BATCH`` lines) in one write and flush.
    ``close`` (also run at exit) lets it write what is queued and ends the thread."""

    MAX_BATCH: Final = 1024
    MAX_QUEUED: Final = 50_000  # ~10 MB of lines waiting for a stderr that cannot keep up
    STALLED_S: Final = 5.0  # ``close`` gives up once nothing was written for this long

    def __init__(self, file: TextIO) -> None:
        self._file = file
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._written = 0
        self._dropped = 0
        self._thread = threading.Thread(target=self._run, name="hookline-log", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def put(self, line: str) -> None:
        if not self._thread.is_alive():  # a forked child, after close: no writer to hand it to
            self._write([line])
        elif self._lines.qsize() >= self.MAX_QUEUED:
            self._dropped += 1
        else:
            self._lines.put(line)

    def close(self) -> None:
        """Write what is queued (for as long as lines keep being written), then end."""
        atexit.unregister(self.close)
        if not self._thread.is_alive():
            return
        self._lines.put(None)
        written, since = self._written, time.monotonic()
        while self._thread.is_alive() and time.monotonic() - since < self.STALLED_S:
            self._thread.join(0.1)
            if self._written != written:
                written, since = self._written, time.monotonic()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch = [self._lines.get()]
            while len(batch) < self.MAX_BATCH:
                try:
                    batch.append(self._lines.get_nowait())
                except queue.Empty:
                    break
            lines = [line for line in batch if line is not None]
            stopping = len(lines) < len(batch)
            if self._dropped:
                dropped, self._dropped = self._dropped, 0
                lines.append(f"[hookline] {dropped} log lines dropped: stderr did not keep up")
            if lines:
                self._write(lines)
                self._written += len(lines)

    def _write(self, lines: list[str]) -> None:
        try:
            self._file.write("\n".join(lines) + "\n")
            self._file.flush()
        except Exception:  # a closed or broken stream: logging never takes the service down
            return


class QueuedLogger:
    """A structlog logger handing its rendered lines to a ``LineWriter``."""

    def __init__(self, writer: LineWriter) -> None:
        self._writer = writer

    def msg(self, message: str) -> None:
        self._writer.put(message)

    log = debug = info = warn = warning = msg
    error = err = critical = exception = fatal = failure = msg


_writer: LineWriter | None = None


def _queued_logger(*_: Any) -> QueuedLogger | structlog.PrintLogger:
    global _writer
    if sys.stderr is None:  # started with stderr closed: structlog's own fallback (stdout)
        return structlog.PrintLogger(None)
    if _writer is None:
        _writer = LineWriter(sys.stderr)
    return QueuedLogger(_writer)


def configure_logging(
    level: str = "info", fmt: str = "auto", *, cache: bool = False, queued: bool = False
) -> None:
    """Configure structlog once per process. ``cache``: each module's logger is bound once, on
    its first line, instead of on every line (``hookline serve``; tests re-configure logging
    after start-up and keep it off). ``queued``: lines are written by a thread of their own
    (``LineWriter``, ``hookline serve``), not by the code that logs them.

    ``fmt``: ``console`` (aligned, coloured on a terminal), ``json`` (one object per line), or
    ``auto``: console when stderr is a terminal, else JSON. Logs that a pipe, a file or a
    collector takes are read by programs, and a JSON line costs a third of a console one (13
    against 33 µs, bench/RESULTS.md), five lines per task."""
    terminal = sys.stderr is not None and sys.stderr.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json" or (fmt == "auto" and not terminal)
        else structlog.dev.ConsoleRenderer(colors=terminal)
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
        logger_factory=_queued_logger if queued else structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=cache,
    )
