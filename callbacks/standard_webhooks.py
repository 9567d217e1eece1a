"""Standard Webhooks v1 (symmetric): sign and verify, with the timestamp window enforced.

Signed content is ``{webhook-id}.{webhook-timestamp}.{raw body}`` (the exact bytes received),
HMAC-SHA256 keyed with the base64-decoded part of a ``whsec_…`` secret. The signature header holds
space-separated ``<version>,<base64 signature>`` entries so a sender can rotate secrets: any ``v1``
entry that matches accepts, other versions (``v1a`` is ed25519) are skipped.

Why the reference library (``standardwebhooks``, which the tests cross-check against) does not do
the verifying: its ``Webhook.verify`` reads its own wall clock with a fixed ±5-minute window, so
neither the caller's one clock (``now`` here, a fake one in tests) nor a per-provider tolerance
can reach it. Since 1.3 (the lowest version allowed) it agrees with this module on the rest: a
non-UTF-8 body verified over its bytes, malformed signature entries skipped as the spec says.
(Replicate's helper, ``replicate.webhooks.validate``, does not check the timestamp at all.)

``sign`` makes the same ``v1,`` entry as ``Webhook.sign`` byte for byte (a test holds them equal,
for bytes bodies and zoned times too), but shares ``_signature`` with the verifier instead: one
HMAC over the exact bytes, for a body that need not be UTF-8, and the time as the integer that
goes on the wire rather than a ``datetime``.

tests/unit/test_standard_webhooks.py proves each claim about ``standardwebhooks`` against the
installed version, so a release that changes one fails a test and this text gets rewritten.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Mapping, Sequence

from callbacks.errors import WebhookRejected

SECRET_PREFIX = "whsec_"
DEFAULT_TOLERANCE_S = 300.0
ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"


def generate_secret(nbytes: int = 32) -> str:
    """A fresh ``whsec_`` secret of ``nbytes`` random bytes (the spec allows 24–64)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(nbytes)).decode("ascii")


def decode_secret(secret: str | bytes) -> bytes:
    """The HMAC key of a secret: ``whsec_``-prefixed (or bare) base64 text, or the raw key bytes.

    Raises ``ValueError`` for an empty or undecodable secret: that is a configuration error, not a
    bad delivery.
    """
    if isinstance(secret, bytes):
        key = secret
    else:
        text = secret.removeprefix(SECRET_PREFIX)
        try:
            # tolerate unpadded base64, as the reference implementation does
            key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("webhook secret is not valid base64") from exc
    if not key:
        raise ValueError("webhook secret is empty")
    return key


def _signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> bytes:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return hmac.new(key, signed, hashlib.sha256).digest()


def sign(secret: str | bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``v1,<base64>`` signature entry of one message."""
    digest = _signature(decode_secret(secret), msg_id, int(timestamp), body)
    return "v1," + base64.b64encode(digest).decode("ascii")


def sign_headers(
    secret: str | bytes | Sequence[str | bytes], msg_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """The three Standard Webhooks headers for a message; several secrets give several entries."""
    keys: Sequence[str | bytes] = [secret] if isinstance(secret, (str, bytes)) else secret
    return {
        ID_HEADER: msg_id,
        TIMESTAMP_HEADER: str(int(timestamp)),
        SIGNATURE_HEADER: " ".join(sign(k, msg_id, timestamp, body) for k in keys),
    }


def get_header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive header lookup over any mapping (a plain dict or Starlette's Headers)."""
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, candidate in headers.items():
        if key.lower() == lowered:
            return candidate
    return None


def verify(
    secret: str | bytes,
    headers: Mapping[str, str],
    body: bytes,
    now: float,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
) -> None:
    """Authenticate one delivery over its raw ``body``; raise ``WebhookRejected`` otherwise.

    Codes: ``missing_headers`` (a header absent, or a timestamp that is not an integer),
    ``stale_timestamp`` (more than ``tolerance_s`` from ``now``, either way), ``bad_signature``
    (no ``v1`` entry matches). The timestamp is checked first: an old, validly signed message is
    a replay.
    """
    msg_id = get_header(headers, ID_HEADER)
    raw_timestamp = get_header(headers, TIMESTAMP_HEADER)
    raw_signatures = get_header(headers, SIGNATURE_HEADER)
    if not (msg_id and raw_timestamp and raw_signatures):
        raise WebhookRejected("missing Standard Webhooks headers", code="missing_headers")
    try:
        timestamp = int(raw_timestamp.strip())
    except ValueError as exc:
        raise WebhookRejected(
            "webhook-timestamp is not an integer", code="missing_headers"
        ) from exc
    if abs(now - timestamp) > tolerance_s:
        raise WebhookRejected(
            "webhook-timestamp outside the tolerance window",
            code="stale_timestamp",
            details={"timestamp": timestamp, "now": now, "tolerance_s": tolerance_s},
        )
    expected = _signature(decode_secret(secret), msg_id, timestamp, body)
    for entry in raw_signatures.split():
        version, sep, encoded = entry.partition(",")
        if not sep or version != "v1":
            continue
        try:
            candidate = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        if hmac.compare_digest(expected, candidate):
            return
    raise WebhookRejected("no matching webhook signature", code="bad_signature")
