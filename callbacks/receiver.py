"""The inbound webhook receiver: authenticate, de-duplicate, record the outcome, answer at once.

The answer never waits for heavy work: applying an outcome is one or two store writes; downloads
and watermarking happen later, in the step the resulting feed event starts.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from callbacks.errors import ProviderError, WebhookRejected
from callbacks.provider import Outcome, Provider
from statemachine.errors import NotFound
from statemachine.store import TaskStore
from statemachine.task import Task

log = structlog.get_logger()


class OutcomeSink(Protocol):
    async def apply(self, task_id: str, outcome: Outcome, task: Task | None = None) -> str:
        """Apply a provider outcome monotonically; return a word for what happened. ``task`` is
        the record as just read, if the caller has it."""


@dataclass(frozen=True, slots=True)
class Receipt:
    """What the receiver answers: an HTTP status and a small JSON body."""

    status: int
    body: dict[str, Any]


class WebhookReceiver:
    def __init__(
        self,
        store: TaskStore,
        providers: Mapping[str, Provider],
        sink: OutcomeSink,
        *,
        now: Callable[[], float],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        on_rejected: Callable[[str, str], None] | None = None,
    ) -> None:
        self.store = store
        self.providers = providers
        self.sink = sink
        self.now = now
        self.spawn = spawn
        self.on_rejected = on_rejected

    async def handle(
        self, provider_name: str, task_id: str, token: str, headers: Mapping[str, str], body: bytes
    ) -> Receipt:
        """Handle one delivery. Raises ``WebhookRejected``/``NotFound`` for bad deliveries."""
        try:
            return await self._handle(provider_name, task_id, token, headers, body)
        except (WebhookRejected, NotFound) as exc:
            log.warning(
                "webhook_rejected", provider=provider_name, reason=exc.code, error=exc.message
            )
            if self.on_rejected:
                self.on_rejected(provider_name, exc.code)
            raise

    async def _handle(
        self, provider_name: str, task_id: str, token: str, headers: Mapping[str, str], body: bytes
    ) -> Receipt:
        provider = self.providers.get(provider_name)
        if provider is None:
            raise NotFound(f"unknown provider {provider_name!r}", code="unknown_provider")
        task = await self.store.get_task(task_id)
        if task is None:
            raise NotFound(f"unknown task {task_id!r}", code="unknown_task")
        if not hmac.compare_digest(token.encode(), task.callback_token.encode()):
            raise WebhookRejected("callback token does not match the task", code="bad_token")
        used = {task.provider, *(a.provider for a in task.attempt_log)}
        if provider_name not in used:
            raise WebhookRejected(
                f"task {task_id} never ran on {provider_name}", code="wrong_provider"
            )
        delivery = await provider.verify(headers, body, self.now())
        if await self.store.seen_delivery(provider_name, delivery.delivery_id):
            return Receipt(200, {"status": "duplicate"})
        if delivery.outcome is None:
            # A trigger only (BFL): fetch the outcome by polling, after answering.
            self.spawn(self._poll_and_apply(provider, task_id, delivery.job_id, task.model))
            await self.store.record_delivery(
                provider_name, delivery.delivery_id, task_id, self.now()
            )
            return Receipt(202, {"status": "polling"})
        result = await self.sink.apply(task_id, delivery.outcome, task)
        await self.store.record_delivery(provider_name, delivery.delivery_id, task_id, self.now())
        log.info(
            "webhook_applied", provider=provider_name, status=delivery.outcome.status, result=result
        )
        return Receipt(200, {"status": result})

    async def _poll_and_apply(
        self, provider: Provider, task_id: str, job_id: str, model: str
    ) -> None:
        for attempt in range(3):
            try:
                outcome = await provider.poll(job_id, model)
            except ProviderError as exc:
                log.warning("webhook_poll_failed", task_id=task_id, error=exc.message)
                await asyncio.sleep(0.5 * 2**attempt)
                continue
            if outcome.final:
                await self.sink.apply(task_id, outcome)
            return
