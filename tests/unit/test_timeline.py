"""What a timeline note may hold (statemachine/timeline.py): headers with every credential-like
value redacted, and data cut to its byte cap, saying so, with the short facts kept whole; and
how the route renders notes (service/http/timeline.py): in time order with the transitions,
every field of its kind's shape and nothing else, whatever a note stored."""

from __future__ import annotations

import math
from typing import Any

import pytest
from starlette.datastructures import Headers

from service.http.timeline import entries, render_note
from statemachine.timeline import (
    MAX_NOTE_BYTES,
    MAX_VALUE_CHARS,
    REDACTED,
    TRUNCATED,
    Note,
    bounded,
    checked_kind,
    encoded_size,
    redact_headers,
)
from tests.support.factories import T0, make_task


@pytest.mark.parametrize(
    "name",
    [
        "Authorization",
        "proxy-authorization",
        "Cookie",
        "set-cookie",
        "webhook-signature",
        "X-Fal-Webhook-Signature",
        "x-api-key",
        "X-Access-Token",
        "x-client-secret",
        "x-session-id",
        "x-amz-security-token",
    ],
)
def test_credential_like_headers_are_redacted(name: str) -> None:
    assert redact_headers({name: "s3cr3t"}) == {name.lower(): REDACTED}


def test_other_headers_are_kept_lower_cased_and_repeats_joined() -> None:
    raw = Headers(
        raw=[
            (b"webhook-id", b"msg_1"),
            (b"user-agent", b"sim/1"),
            (b"x-forwarded-for", b"10.0.0.1"),
            (b"x-forwarded-for", b"10.0.0.2"),
            (b"cookie", b"a=1"),
            (b"cookie", b"b=2"),
        ]
    )
    assert redact_headers(raw) == {
        "webhook-id": "msg_1",
        "user-agent": "sim/1",
        "x-forwarded-for": "10.0.0.1, 10.0.0.2",
        "cookie": REDACTED,
    }


def test_small_data_is_kept_as_it_is() -> None:
    data = {"job_id": "j1", "status_code": 201, "ok": True, "latency_ms": 1.5, "none": None}
    assert bounded(data) == data


def test_long_strings_are_cut_saying_how_much() -> None:
    cut = bounded({"error": "x" * 1000, "job_id": "j1"})
    assert cut[TRUNCATED] is True and cut["job_id"] == "j1"
    assert cut["error"] == "x" * MAX_VALUE_CHARS + f"…(+{1000 - MAX_VALUE_CHARS} chars)"


def test_a_large_note_fits_its_cap_and_keeps_its_short_facts() -> None:
    data = {
        "delivery_id": "d1",
        "verified": False,
        "headers": {f"h{i}": "v" * 400 for i in range(40)},
    }
    cut = bounded(data)
    assert encoded_size(cut) <= MAX_NOTE_BYTES
    assert (cut["delivery_id"], cut["verified"], cut[TRUNCATED]) == ("d1", False, True)
    many = bounded({"items": list(range(500))})
    assert len(many["items"]) == 50 and many[TRUNCATED] is True
    too_many_keys = bounded({f"k{i:04}": "v" * 100 for i in range(400)}, max_bytes=512)
    assert encoded_size(too_many_keys) <= 512 and too_many_keys[TRUNCATED] is True


def test_values_json_cannot_hold_become_strings() -> None:
    odd: dict[Any, Any] = {
        "nan": math.nan,
        "big": 2**70,
        "bytes": b"raw",
        "tuple": (1, 2),
        "surrogate": "a\ud800b",
        "deep": {"a": {"b": {"c": {"d": {"e": 1}}}}},
        3: "a key that is no string",
    }
    cut = bounded(odd)
    assert cut["nan"] == "nan" and cut["big"] == str(2**70) and cut["bytes"] == "b'raw'"
    assert cut["tuple"] == [1, 2] and cut["surrogate"] == "a?b" and cut["3"]
    assert cut["deep"]["a"]["b"]["c"] == "{'d': {'e': 1}}" and cut[TRUNCATED] is True
    assert encoded_size(cut) <= MAX_NOTE_BYTES


def test_only_the_known_kinds_are_notes() -> None:
    for kind in ("submit", "webhook", "poll", "delivery"):
        assert checked_kind(kind) == kind
    with pytest.raises(ValueError):
        checked_kind("transition")  # transitions live in the task's history


def test_the_route_merges_transitions_and_notes_in_time_order() -> None:
    task = make_task(now=T0)
    notes = [
        Note(task.id, T0 + 2, "poll", {"status": "running"}),
        Note(task.id, T0 + 1, "submit", {"job_id": "j1"}),
        Note(task.id, T0 + 3, "gossip", {"from": "a newer version"}),  # unknown: left out
    ]
    rendered = entries(task, notes)
    assert [e["kind"] for e in rendered] == ["transition", "submit", "poll"]
    assert rendered[0]["at"] == "2023-11-14T22:13:20Z"


def test_a_note_is_rendered_in_its_kinds_shape_whatever_it_stored() -> None:
    odd = Note(
        "t",
        T0,
        "delivery",
        {
            "attempt": "two",  # of another type: null
            "status_code": True,  # a bool is no status code
            "latency_ms": 3,
            "next_retry_at": T0 + 60,
            "secret_extra": "never shown",  # a key the shape does not know
            TRUNCATED: True,
        },
    )
    entry = render_note(odd)
    assert entry == {
        "at": "2023-11-14T22:13:20Z",
        "kind": "delivery",
        "webhook_id": None,
        "endpoint_id": None,
        "url": None,
        "event": None,
        "attempt": None,
        "status_code": None,
        "latency_ms": 3.0,
        "error": None,
        "next_retry_at": "2023-11-14T22:14:20Z",
        "truncated": True,
    }
    webhook = render_note(Note("t", T0, "webhook", {"headers": "not a mapping", "verified": 1}))
    assert webhook is not None and webhook["kind"] == "webhook"
    assert webhook["headers"] == {} and webhook["verified"] is False
