"""Secrets never reach the logs: keys by name, API keys, webhook secrets and bearer tokens by
shape."""

from __future__ import annotations

import json

import pytest
import structlog

from service.logging import configure_logging, redact


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
