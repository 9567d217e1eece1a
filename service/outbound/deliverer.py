"""Sending the outbox: claim due messages with a lease, sign, post, settle.

One loop per process claims as many due messages as it has free request slots
(``concurrency``), each under a lease of ``lease_s`` (longer than a request may take, so no other
deliverer sends it meanwhile), and sends them concurrently. It wakes when this process queued new
messages, and otherwise every ``poll_s`` to find retries that came due or messages other
processes queued. A deliverer killed mid-send loses its leases; once they expire the messages are
claimed and sent again, with the same ``webhook-id``: at least once.

Each try is signed anew (``webhook-timestamp`` is the try's time, so a receiver's timestamp
tolerance holds for retries too) with every secret live for the destination: during a rotation's
overlap the ``webhook-signature`` header holds one ``v1,`` entry per secret, and a receiver with
either secret accepts. The outcome of a try:

- any 2xx: delivered;
- 410 Gone from a registered endpoint: the endpoint is disabled, the message fails;
- anything else (another status, a redirect, a timeout, a refused or forbidden address): tried
  again after ``Backoff``'s next gap, or failed when that would pass the retry horizon;
- a message whose endpoint was deleted (or whose owner's secret is gone) fails without a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Final, Protocol

import structlog
from standardwebhooks import Webhook

from service.media.fetch import FetchError, SafeFetcher
from statemachine.outbox import (
    TASK_DESTINATION,
    Backoff,
    DeliveryAttempt,
    Endpoint,
    Message,
    MessageState,
    Outbox,
    OwnerSecret,
)

log = structlog.get_logger(__name__)

MAX_ANSWER_BYTES: Final = 64 * 1024  # read of a receiver's answer, then dropped
KEEP_ATTEMPTS: Final = 30  # attempts remembered per message (a day of retries is ~15)
USER_AGENT: Final = "hookline-webhooks/1"
SECRETS_CACHE_S: Final = 1.0
MAX_CACHED_SECRETS: Final = 10_000


class Note(Protocol):
    """Where each try is told (the task's timeline); None: nowhere."""

    def __call__(self, task_id: str, at: float, data: dict[str, object]) -> Awaitable[None]: ...


class Deliverer:
    """The outbox's sending loop (see the module docstring)."""

    def __init__(
        self,
        outbox: Outbox,
        fetcher: SafeFetcher,
        backoff: Backoff,
        *,
        lease_s: float,
        concurrency: int,
        poll_s: float,
        now: Callable[[], float],
        per_destination: int = 16,
        worker: str | None = None,
        note: Note | None = None,
        on_outcome: Callable[[str], None] | None = None,
        on_disabled: Callable[[str], None] | None = None,
    ) -> None:
        self._outbox = outbox
        self.fetcher = fetcher
        self._backoff = backoff
        self._lease_s = lease_s
        self._concurrency = concurrency
        self._poll_s = poll_s
        self._per_destination = per_destination
        self._now = now
        self.worker = worker or "deliverer-" + secrets.token_hex(6)
        self.note = note
        self.on_outcome = on_outcome
        self.on_disabled = on_disabled  # told the owner whose endpoint answered 410
        self._wake = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self._secrets: dict[tuple[str, str], tuple[float, Endpoint | OwnerSecret | str]] = {}

    def wake(self) -> None:
        """New messages are due: look now rather than at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        """Claim and send until cancelled; sends in flight are cancelled with it (their leases
        expire and another deliverer sends them again)."""
        try:
            while True:
                self._wake.clear()
                free = self._concurrency - len(self._inflight)
                claimed: list[Message] = []
                if free > 0:
                    try:
                        claimed = await self._outbox.claim(
                            self._now(),
                            self.worker,
                            self._lease_s,
                            free,
                            per_destination=self._per_destination,
                        )
                    except Exception:
                        log.exception("outbox.claim_failed")
                for message in claimed:
                    task = asyncio.create_task(self._deliver(message))
                    self._inflight.add(task)
                    task.add_done_callback(self._done)
                if claimed and len(claimed) == free:
                    await self._slot_or_timeout()
                elif not claimed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self._poll_s)
        finally:
            for task in self._inflight:
                task.cancel()

    async def drain(self) -> None:
        """Wait for the sends in flight (for an orderly stop and for tests)."""
        while self._inflight:
            await asyncio.wait(set(self._inflight))

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._wake.set()  # a slot is free
        if not task.cancelled() and task.exception() is not None:
            log.error("outbox.deliver_failed", error=repr(task.exception()))

    async def _slot_or_timeout(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self._poll_s)

    async def _deliver(self, message: Message) -> None:
        number = message.attempts + 1
        started = self._now()
        signing = await self._signing_secrets(message, started)
        if isinstance(signing, str):
            attempt = DeliveryAttempt(message.id, number, started, 0.0, error=signing)
            await self._settle(message, attempt, "failed", "undeliverable")
            return
        status, error = await self._post(message, signing, started)
        finished = self._now()
        latency_ms = round((finished - started) * 1000, 3)
        if status is not None and 200 <= status < 300:
            attempt = DeliveryAttempt(message.id, number, started, latency_ms, status)
            await self._settle(message, attempt, "delivered", "delivered")
            return
        if status == 410:  # gone: a registered endpoint is disabled, a task's own one dropped
            if message.endpoint_id != TASK_DESTINATION:
                await self._outbox.disable_endpoint(message.endpoint_id, "410 Gone", finished)
                self._secrets.pop((message.endpoint_id, message.owner), None)
                if self.on_disabled is not None:
                    self.on_disabled(message.owner)
            attempt = DeliveryAttempt(message.id, number, started, latency_ms, status, "gone")
            await self._settle(message, attempt, "failed", "gone")
            return
        if status is not None:
            error = f"HTTP {status}"
        retry_at = self._backoff.next_at(number, message.queued_at, finished)
        attempt = DeliveryAttempt(
            message.id, number, started, latency_ms, status, error, next_retry_at=retry_at
        )
        if retry_at is None:
            await self._settle(message, attempt, "failed", "failed")
        else:
            await self._settle(message, attempt, "pending", "retried")

    async def _signing_secrets(self, message: Message, now: float) -> tuple[str, ...] | str:
        """The secrets to sign with, or why there are none. Endpoints and owners' secrets are
        read at most once a second each (``SECRETS_CACHE_S``): a rotation, deletion or 410
        seen by another process reaches this one within that time."""
        key = (message.endpoint_id, message.owner)
        cached = self._secrets.get(key)
        if cached is not None and cached[0] > time.monotonic():
            found = cached[1]
        else:
            found = await self._read_secrets(message)
            if len(self._secrets) >= MAX_CACHED_SECRETS:
                self._secrets.clear()
            self._secrets[key] = (time.monotonic() + SECRETS_CACHE_S, found)
        if isinstance(found, str):
            return found
        if isinstance(found, OwnerSecret):
            return found.signing_secrets(now)
        if found.disabled_at is not None:
            return "endpoint_disabled"
        return found.signing_secrets(now)

    async def _read_secrets(self, message: Message) -> Endpoint | OwnerSecret | str:
        if message.endpoint_id == TASK_DESTINATION:
            owner = await self._outbox.owner_secret(message.owner)
            return owner if owner is not None else "owner_secret_missing"
        endpoint = await self._outbox.get_endpoint(message.endpoint_id)
        return endpoint if endpoint is not None else "endpoint_deleted"

    async def _post(
        self, message: Message, signing: tuple[str, ...], now: float
    ) -> tuple[int | None, str | None]:
        stamp = datetime.fromtimestamp(int(now), UTC)
        text = message.body.decode()
        headers = {
            "webhook-id": message.id,
            "webhook-timestamp": str(int(now)),
            "webhook-signature": " ".join(
                Webhook(secret).sign(message.id, stamp, text) for secret in signing
            ),
            "content-type": "application/json",
            "user-agent": USER_AGENT,
        }
        try:
            status = await self.fetcher.post(
                message.url, message.body, headers, max_answer_bytes=MAX_ANSWER_BYTES
            )
        except FetchError as exc:
            return None, f"{exc.code}: {exc.message}"
        return status, None

    async def _settle(
        self, message: Message, attempt: DeliveryAttempt, state: MessageState, outcome: str
    ) -> None:
        kept = await self._outbox.settle(
            message, self.worker, attempt, state, keep_attempts=KEEP_ATTEMPTS
        )
        if not kept:  # the lease was lost (we were too slow): the new holder's try counts
            log.warning("outbox.lease_lost", message=message.id)
            return
        log.info(
            "outbox.attempt",
            message=message.id,
            task=message.task_id,
            outcome=outcome,
            status=attempt.status_code,
            attempt=attempt.number,
        )
        if self.on_outcome is not None:
            self.on_outcome(outcome)
        # the timeline hears the first try and how the message ended; the tries in between are
        # in the deliveries (GET /v1/tasks/{id}/deliveries), not pushing the task's story out
        if self.note is not None and (attempt.number == 1 or state != "pending"):
            with contextlib.suppress(Exception):
                await self.note(
                    message.task_id,
                    attempt.at,
                    {
                        "webhook_id": message.id,
                        "endpoint_id": message.endpoint_id,
                        "url": message.url,
                        "event": message.event,
                        "attempt": attempt.number,
                        "status_code": attempt.status_code,
                        "latency_ms": attempt.latency_ms,
                        "error": attempt.error,
                        "next_retry_at": attempt.next_retry_at,
                    },
                )
