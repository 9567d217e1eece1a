"""Secrets never reach the logs: keys by name, API keys, webhook secrets and bearer tokens by
shape."""

from __future__ import annotations

import io
import json
import threading

import pytest
import structlog

from service.logging import LineWriter, QueuedLogger, configure_logging, redact


def test_secret_fields_and_secret_shaped_values_are_redacted() -> None:
    event = {
        "event": "x",
        "api_key": "hk_abcdefghijklmnop",
        "webhook_secret": "whsec_abc",
        "authorization": "Bearer hk_abcdefghijklmnop",
        "message": "calling with hk_abcdefghijklmnopqrs and whsec_QUJDREVGR0hJSktM",
        "header": "Bearer sk-live-123",
        "task_id": "tsk_1",
    }
    out = redact(None, "info", dict(event))
    assert out["api_key"] == out["webhook_secret"] == out["authorization"] == "[redacted]"
    assert "hk_" not in out["message"] and "whsec_" not in out["message"]
    assert out["header"] == "[redacted]"
    assert out["task_id"] == "tsk_1"


def test_json_logs_carry_context_and_no_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    try:
        structlog.contextvars.bind_contextvars(request_id="r1", task_id="tsk_9")
        structlog.get_logger("t").info(
            "submitted", token="secret-token-value", url="https://h/cb?token=abc&x=1"
        )
    finally:
        structlog.contextvars.clear_contextvars()
        structlog.reset_defaults()
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["request_id"] == "r1" and line["task_id"] == "tsk_9"
    assert line["token"] == "[redacted]"
    assert line["url"] == "https://h/cb?token=[redacted]&x=1"


def test_a_watch_link_in_a_log_line_loses_its_token() -> None:
    event = redact(None, "info", {"url": "https://h/v1/tasks/tsk_1?watch=1767225600.0.abcDEF"})
    assert event["url"] == "https://h/v1/tasks/tsk_1?watch=[redacted]"


class _Recording(io.StringIO):
    """A stream that notes which thread wrote to it."""

    def __init__(self) -> None:
        super().__init__()
        self.writers: set[int] = set()

    def write(self, text: str) -> int:
        self.writers.add(threading.get_ident())
        return super().write(text)


def test_queued_lines_are_written_by_the_writer_thread_in_order_and_all_at_close() -> None:
    """``hookline serve``'s logs: the code that logs never writes (a write let go of the event
    loop's GIL); the writer thread writes every line, in order, and ``close`` waits for them."""
    stream = _Recording()
    writer = LineWriter(stream)
    structlog.configure(
        processors=[structlog.processors.JSONRenderer()],
        logger_factory=lambda *_: QueuedLogger(writer),
    )
    try:
        log = structlog.get_logger("t")
        for n in range(3000):
            (log.info if n % 2 else log.error)("line", n=n)
        writer.close()
    finally:
        structlog.reset_defaults()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["n"] for line in lines] == list(range(3000))
    assert stream.writers and threading.get_ident() not in stream.writers
