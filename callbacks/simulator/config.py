"""What the simulated provider does: its latency, its failures and its webhook faults, and whom
it trusts.

Probabilities are fractions in [0, 1]. "Simulated" durations (latency, webhook delays and retry
backoff) are multiplied by ``time_scale``; expiry and retention times are real seconds on the
simulator's clock.

The simulator is a development tool and is locked down by default: its API token is random per
instance unless one is given, and it posts webhooks only to the hosts in ``webhook_hosts`` (none
unless given: a create naming any other webhook is refused with 422).
"""

from __future__ import annotations

import base64
import math
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

import httpx

from callbacks.simulator.latency import LatencyModel, parse_latency

__all__ = [
    "DEFAULT_REORDER_WITH_DELAY",
    "LatencyModel",
    "SimConfig",
    "generate_api_token",
    "generate_webhook_secret",
    "normalise_hosts",
    "parse_latency",
]

# When only a webhook delay is configured (HOOKLINE_SIM_WEBHOOK_DELAY_S), this share of the
# predictions also gets a stale "processing" webhook after its terminal one.
DEFAULT_REORDER_WITH_DELAY = 0.5

_PROBABILITIES = (
    "failure_rate",
    "webhook_loss",
    "webhook_duplicate",
    "webhook_reorder",
    "webhook_bad_signature",
    "output_5xx",
)


def generate_api_token() -> str:
    """A fresh Bearer token (``sim_`` + 32 random bytes, URL-safe): each simulator built without
    one accepts only its own."""
    return "sim_" + secrets.token_urlsafe(32)


def normalise_hosts(hosts: Iterable[str]) -> frozenset[str]:
    """Host entries (``host``, ``host:port`` or ``[v6]:port``), stripped and lower-cased."""
    return frozenset(h.strip().lower().rstrip(".") for h in hosts if h.strip())


def generate_webhook_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Behaviour of one simulator instance. Validated on construction (``ValueError``)."""

    latency: str = "uniform:1:3"  # see latency.parse_latency
    time_scale: float = 1.0  # multiplies every simulated duration; 1/60 makes a minute a second
    failure_rate: float = 0.0  # a prediction ends ``failed`` with an ``error`` text
    webhook_loss: float = 0.0  # a delivery is never sent (retries included)
    webhook_duplicate: float = 0.0  # a delivery is sent twice with the same webhook-id
    webhook_delay_s: float = 0.0  # each delivery waits uniform(0, this) simulated seconds first
    webhook_reorder: float = 0.0  # a stale "processing" webhook follows the terminal one
    webhook_bad_signature: float = 0.0  # an attempt is signed with a wrong secret
    output_5xx: float = 0.0  # a file fetch answers 503 ...
    output_5xx_max_consecutive: int = 3  # ... but never more often than this in a row per file
    seed: int | None = None  # fixes latencies and faults per prediction (by creation order)
    api_token: str = field(default_factory=generate_api_token)  # the one Bearer token accepted
    # where webhooks may go: ``host`` (any port) or ``host:port``; any other webhook URL is
    # refused when the prediction is created, so no request is ever made to it
    webhook_hosts: frozenset[str] = frozenset()
    webhook_secret: str = field(default_factory=generate_webhook_secret)
    output_url_ttl_s: float = 3600.0  # file URLs expire this long after completion
    data_retention_s: float = 3600.0  # then ``data_removed: true``, ``output: null``
    max_in_flight: int | None = None  # unfinished predictions beyond it get 429 + Retry-After
    retry_after_s: int = 1  # the Retry-After of that 429
    webhook_attempts: int = 6  # first try + retries of a terminal webhook
    webhook_backoff_s: float = 2.0  # simulated; doubles per retry (2+4+8+16+32: ~1 min)
    webhook_timeout_s: float = 10.0  # real seconds the receiver gets to answer
    max_input_bytes: int = 20_000_000
    base_url: str | None = None  # public base of the simulator (``…/sim``); default: from request

    def __post_init__(self) -> None:
        parse_latency(self.latency)
        if not self.api_token.strip():
            raise ValueError("SimConfig.api_token must not be empty")
        # frozen: normalise through object.__setattr__, once, so every check compares alike
        object.__setattr__(self, "webhook_hosts", normalise_hosts(self.webhook_hosts))
        for name in _PROBABILITIES:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"SimConfig.{name} must be within [0, 1], got {value!r}")
        if not (math.isfinite(self.time_scale) and self.time_scale >= 0):
            raise ValueError(f"SimConfig.time_scale must be >= 0, got {self.time_scale!r}")
        if self.webhook_delay_s < 0:
            raise ValueError("SimConfig.webhook_delay_s must be >= 0")
        if self.webhook_attempts < 1 or self.output_5xx_max_consecutive < 0:
            raise ValueError("SimConfig.webhook_attempts must be >= 1, max_consecutive >= 0")
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ValueError("SimConfig.max_in_flight must be >= 1 or None (unlimited)")
        if not self.webhook_secret.startswith("whsec_"):
            raise ValueError("SimConfig.webhook_secret must start with 'whsec_'")
        try:
            key = base64.b64decode(self.webhook_secret.removeprefix("whsec_"), validate=True)
        except ValueError:
            raise ValueError("SimConfig.webhook_secret is not whsec_ + base64") from None
        if not 24 <= len(key) <= 64:
            raise ValueError("SimConfig.webhook_secret must hold 24 to 64 bytes")

    def allows_webhook(self, url: str) -> bool:
        """Whether ``url`` (already an http(s) URL) names a host in ``webhook_hosts``. The URL is
        parsed as httpx, which sends the webhook, parses it: the host checked is the host
        called."""
        try:
            parsed = httpx.URL(url)
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
        except (httpx.InvalidURL, ValueError):
            return False
        if parsed.userinfo or not parsed.raw_host:
            return False
        host = parsed.raw_host.decode("ascii").lower().rstrip(".")
        shown = f"[{host}]" if ":" in host else host
        return bool({host, shown, f"{shown}:{port}"} & self.webhook_hosts)

    @property
    def latency_model(self) -> LatencyModel:
        return parse_latency(self.latency)

    @property
    def webhook_key(self) -> bytes:
        """The HMAC key behind ``webhook_secret``."""
        return base64.b64decode(self.webhook_secret.removeprefix("whsec_"))
