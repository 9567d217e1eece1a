"""Secrets never reach the logs: keys by name, API keys, webhook secrets and bearer tokens by
shape."""

from __future__ import annotations

import io
import json
import re
import sys
import threading

import pytest
import structlog

from service.logging import LineWriter, QueuedLogger, _queued_logger, configure_logging, redact


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


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "pipe"])
def test_auto_logs_console_lines_on_a_terminal_and_json_elsewhere(
    terminal: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("info", "auto")
    try:
        structlog.get_logger("t").info("transition", task_id="tsk_1", to="completed")
    finally:
        structlog.reset_defaults()
    line = stream.getvalue().strip()
    if terminal:
        plain = re.sub(r"\x1b\[[0-9;]*m", "", line)  # coloured: it is a terminal
        assert plain != line and "] transition" in plain and "task_id=tsk_1" in plain
    else:
        assert json.loads(line) | {"timestamp": None} == {
            "event": "transition",
            "level": "info",
            "task_id": "tsk_1",
            "to": "completed",
            "timestamp": None,
        }


def test_auto_with_no_stderr_logs_json_lines_to_stdout(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stderr", None)
    configure_logging("info", "auto")
    try:
        structlog.get_logger("t").info("transition", task_id="tsk_1")
    finally:
        structlog.reset_defaults()
    assert json.loads(capsys.readouterr().out.strip())["task_id"] == "tsk_1"


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


class _Held(io.StringIO):
    """A stream whose first write waits until the test lets it go (a stderr that stalled)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.entered.set()
        assert self.release.wait(30)  # only against a hang; nothing waits on time for a result
        return super().write(text)


class _SmallWriter(LineWriter):
    MAX_QUEUED = 10


def test_lines_past_the_queue_bound_are_dropped_counted_and_the_count_written() -> None:
    """A stderr that cannot keep up costs lines, not memory, and says how many."""
    stream = _Held()
    writer = _SmallWriter(stream)
    writer.put("first")
    assert stream.entered.wait(30)  # the writer holds "first" inside the stalled write
    for n in range(100):
        writer.put(f"line {n}")
    stream.release.set()
    writer.close()
    out = stream.getvalue().splitlines()
    kept = [line for line in out if line.startswith("line ")]
    notice = [line for line in out if "log lines dropped" in line]
    assert out[0] == "first" and len(kept) == _SmallWriter.MAX_QUEUED
    assert notice == [f"[hookline] {100 - len(kept)} log lines dropped: stderr did not keep up"]


class _Failing(_Recording):
    """A stream that breaks once, on its first write, and says when it has."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = threading.Event()

    def write(self, text: str) -> int:
        if not self.failed.is_set():
            self.failed.set()
            raise RuntimeError("a stream that breaks once")
        return super().write(text)


def test_a_failing_write_does_not_end_the_writer_and_lines_after_close_are_written() -> None:
    stream = _Failing()
    writer = LineWriter(stream)
    writer.put("lost with the failed write")
    assert stream.failed.wait(30)
    writer.put("written by the writer, still there")
    writer.close()
    assert threading.get_ident() not in stream.writers  # no direct write: the thread lived on
    writer.put("written after close, directly")
    assert stream.getvalue().splitlines() == [
        "written by the writer, still there",
        "written after close, directly",
    ]
    assert threading.get_ident() in stream.writers


def test_a_process_without_stderr_logs_through_structlogs_own_fallback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Started with stderr closed (``2>&-``): no writer thread over a stream that is not there."""
    monkeypatch.setattr(sys, "stderr", None)
    assert isinstance(_queued_logger(), structlog.PrintLogger)
