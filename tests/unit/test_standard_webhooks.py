"""Our Standard Webhooks v1 signer and verifier, cross-checked against the reference package
(signatures both ways, a non-UTF-8 body, malformed entries, bytes bodies, zoned times), and the
reference package's limit that callbacks/standard_webhooks.py's docstring gives as the reason it
does not verify for us: its own wall clock and fixed window (those tests fail if a release lifts
it)."""

from __future__ import annotations

import base64
import inspect
import json
import time
from datetime import UTC, datetime, timedelta, timezone

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from callbacks import standard_webhooks as sw
from callbacks.errors import WebhookRejected

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"o" * 32).decode()
MSG_ID = "msg_2LJd8ZcG3kT0e1H9"
TS = 1_750_000_000
BODY = b'{"id":"p1","status":"succeeded","output":["https://replicate.delivery/a.png"]}'


def headers(signature: str, *, msg_id: str = MSG_ID, ts: int = TS) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": signature}


def rejected_code(secret: str, hdrs: dict[str, str], body: bytes, now: float) -> str:
    with pytest.raises(WebhookRejected) as info:
        sw.verify(secret, hdrs, body, now)
    return info.value.code


def test_reference_signature_verifies_with_ours() -> None:
    theirs = Webhook(SECRET).sign(MSG_ID, datetime.fromtimestamp(TS, tz=UTC), BODY.decode())
    sw.verify(SECRET, headers(theirs), BODY, now=TS)


def test_our_signature_verifies_with_the_reference() -> None:
    # the reference library reads the real clock, so this message is stamped with it
    ts = int(time.time())
    signed = sw.sign_headers(SECRET, MSG_ID, ts, BODY)
    assert Webhook(SECRET).verify(BODY, signed) == json.loads(BODY)
    assert sw.sign(SECRET, MSG_ID, ts, BODY) == Webhook(SECRET).sign(
        MSG_ID, datetime.fromtimestamp(ts, tz=UTC), BODY.decode()
    )


def test_any_matching_signature_among_several_accepts() -> None:
    """Rotation: the sender signs with the old and the new secret; either verifier accepts."""
    both = sw.sign_headers([OTHER_SECRET, SECRET], MSG_ID, TS, BODY)
    assert len(both["webhook-signature"].split()) == 2
    sw.verify(SECRET, both, BODY, now=TS)
    sw.verify(OTHER_SECRET, both, BODY, now=TS)


def test_unknown_versions_are_skipped_but_a_v1_match_still_accepts() -> None:
    good = sw.sign(SECRET, MSG_ID, TS, BODY)
    forged_v1a = "v1a," + base64.b64encode(b"x" * 64).decode()
    sw.verify(SECRET, headers(f"{forged_v1a} {good}"), BODY, now=TS)


def test_only_unknown_versions_is_a_bad_signature() -> None:
    good_digest = sw.sign(SECRET, MSG_ID, TS, BODY).split(",", 1)[1]
    hdrs = headers(f"v1a,{good_digest} v2,{good_digest}")
    assert rejected_code(SECRET, hdrs, BODY, TS) == "bad_signature"


def test_garbage_entries_are_skipped() -> None:
    good = sw.sign(SECRET, MSG_ID, TS, BODY)
    sw.verify(SECRET, headers(f"nocomma v1,!!!notbase64 {good}"), BODY, now=TS)
    assert rejected_code(SECRET, headers("nocomma v1,!!!"), BODY, TS) == "bad_signature"


def test_tampered_body_is_rejected() -> None:
    hdrs = headers(sw.sign(SECRET, MSG_ID, TS, BODY))
    assert rejected_code(SECRET, hdrs, BODY.replace(b"a.png", b"b.png"), TS) == "bad_signature"
    assert rejected_code(SECRET, hdrs, BODY + b" ", TS) == "bad_signature"


def test_signed_id_and_timestamp_cannot_be_swapped() -> None:
    sig = sw.sign(SECRET, MSG_ID, TS, BODY)
    assert rejected_code(SECRET, headers(sig, msg_id="msg_other"), BODY, TS) == "bad_signature"
    assert rejected_code(SECRET, headers(sig, ts=TS + 1), BODY, TS) == "bad_signature"


def test_wrong_secret_is_rejected() -> None:
    hdrs = headers(sw.sign(OTHER_SECRET, MSG_ID, TS, BODY))
    assert rejected_code(SECRET, hdrs, BODY, TS) == "bad_signature"


@pytest.mark.parametrize("offset", [-301, 301, -86_400, 86_400])
def test_timestamps_outside_the_window_are_rejected_even_when_signed(offset: int) -> None:
    hdrs = headers(sw.sign(SECRET, MSG_ID, TS, BODY))
    assert rejected_code(SECRET, hdrs, BODY, TS + offset) == "stale_timestamp"


@pytest.mark.parametrize("offset", [-300, 0, 300])
def test_timestamps_inside_the_window_are_accepted(offset: int) -> None:
    sw.verify(SECRET, headers(sw.sign(SECRET, MSG_ID, TS, BODY)), BODY, now=TS + offset)


def test_tolerance_is_configurable() -> None:
    hdrs = headers(sw.sign(SECRET, MSG_ID, TS, BODY))
    with pytest.raises(WebhookRejected):
        sw.verify(SECRET, hdrs, BODY, now=TS + 11, tolerance_s=10)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_a_missing_header_is_missing_headers(missing: str) -> None:
    hdrs = headers(sw.sign(SECRET, MSG_ID, TS, BODY))
    del hdrs[missing]
    assert rejected_code(SECRET, hdrs, BODY, TS) == "missing_headers"


def test_a_non_integer_timestamp_is_rejected() -> None:
    hdrs = headers(sw.sign(SECRET, MSG_ID, TS, BODY))
    hdrs["webhook-timestamp"] = "yesterday"
    assert rejected_code(SECRET, hdrs, BODY, TS) == "missing_headers"


def test_header_names_are_case_insensitive() -> None:
    sig = sw.sign(SECRET, MSG_ID, TS, BODY)
    hdrs = {"Webhook-Id": MSG_ID, "WEBHOOK-TIMESTAMP": str(TS), "Webhook-Signature": sig}
    sw.verify(SECRET, hdrs, BODY, now=TS)


def test_secret_forms_are_equivalent() -> None:
    """``whsec_``-prefixed, bare base64 and raw key bytes name the same key."""
    hdrs = headers(sw.sign(SECRET, MSG_ID, TS, BODY))
    sw.verify(SECRET.removeprefix("whsec_"), hdrs, BODY, now=TS)
    sw.verify(b"k" * 32, hdrs, BODY, now=TS)


def test_an_unusable_secret_is_a_configuration_error() -> None:
    with pytest.raises(ValueError):
        sw.decode_secret("whsec_")
    with pytest.raises(ValueError):
        sw.decode_secret("whsec_not base64!")


def test_generated_secrets_are_whsec_and_usable_by_the_reference() -> None:
    secret = sw.generate_secret()
    assert secret.startswith("whsec_")
    assert len(sw.decode_secret(secret)) == 32
    ts = int(time.time())
    Webhook(secret).verify(BODY, sw.sign_headers(secret, MSG_ID, ts, BODY))


# --- what the reference library cannot do for us (callbacks/standard_webhooks.py's docstring) ---


def reference_headers(ts: int, body: str = BODY.decode(), *, before: str = "") -> dict[str, str]:
    """Headers signed by the reference library; ``before`` goes ahead of its signature entry."""
    signature = Webhook(SECRET).sign(MSG_ID, datetime.fromtimestamp(ts, tz=UTC), body)
    return headers(before + signature, ts=ts)


def test_reference_verify_takes_no_clock_and_no_tolerance() -> None:
    assert list(inspect.signature(Webhook.verify).parameters) == [
        "self",
        "data",
        "headers",
        "json_parse",
    ]


def test_reference_verify_reads_the_wall_clock() -> None:
    """A message stamped at TS is good for our verifier told it is TS; the library, which asks
    the real clock, calls it too old."""
    hdrs = reference_headers(TS)
    sw.verify(SECRET, hdrs, BODY, now=TS)
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(SECRET).verify(BODY, hdrs)


@pytest.mark.parametrize(
    ("offset_s", "accepted"), [(-360, False), (-240, True), (240, True), (360, False)]
)
def test_reference_tolerance_is_five_minutes_either_way(offset_s: int, accepted: bool) -> None:
    # a minute from the edge both ways, so the real clock moving during the test changes nothing
    hdrs = reference_headers(int(time.time()) + offset_s)
    if accepted:
        assert Webhook(SECRET).verify(BODY, hdrs) == json.loads(BODY)
    else:
        with pytest.raises(
            WebhookVerificationError, match="too old" if offset_s < 0 else "too new"
        ):
            Webhook(SECRET).verify(BODY, hdrs)


def test_reference_verify_takes_a_non_utf8_body_unparsed() -> None:
    """Both verify the bytes (before 1.3 the library failed decoding them as UTF-8); asked to
    parse them, the library fails at the JSON, as it should."""
    body = b"\xff\xfe not utf-8"
    ts = int(time.time())
    hdrs = sw.sign_headers(SECRET, MSG_ID, ts, body)
    sw.verify(SECRET, hdrs, body, now=ts)
    Webhook(SECRET).verify(body, hdrs, json_parse=False)
    with pytest.raises(json.JSONDecodeError):
        Webhook(SECRET).verify(body, hdrs, json_parse=True)


@pytest.mark.parametrize(
    "entry",
    [
        "nocomma",
        "v1,two,commas",
        "v1a,eHg= ",  # a double space between two entries
        "v1,!!!notbase64",
        "v1,abc",  # bad padding
    ],
)
def test_reference_verify_skips_a_malformed_entry_before_the_match(entry: str) -> None:
    """The spec says skip what is not a valid entry: both do (before 1.3 the library raised
    ``ValueError`` or ``binascii.Error``)."""
    ts = int(time.time())
    hdrs = reference_headers(ts, before=entry + " ")
    sw.verify(SECRET, hdrs, BODY, now=ts)
    assert Webhook(SECRET).verify(BODY, hdrs) == json.loads(BODY)


def test_reference_sign_of_a_bytes_body_is_ours() -> None:
    """Before 1.3 the library signed the ``repr`` of a bytes body (``b'…'``)."""
    theirs = Webhook(SECRET).sign(MSG_ID, datetime.fromtimestamp(TS, tz=UTC), BODY)  # type: ignore[arg-type]
    assert theirs == sw.sign(SECRET, MSG_ID, TS, BODY)


def test_reference_sign_of_a_zoned_time_is_ours() -> None:
    """An aware time in UTC+8 is the same instant (before 1.3 the library relabelled its wall
    time as UTC: 8 hours off)."""
    at = datetime.fromtimestamp(TS, tz=timezone(timedelta(hours=8)))
    assert Webhook(SECRET).sign(MSG_ID, at, BODY.decode()) == sw.sign(SECRET, MSG_ID, TS, BODY)
