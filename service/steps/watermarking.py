"""The watermarking step (watermarking → completed): copy the provider's outputs before their URLs
expire, watermark them, store them under deterministic keys (a retried step overwrites, never
duplicates), then complete the task.

An output URL that is gone for good fails the task with its refund; a host that is down for now,
or a blob store blip, hands the step back (the result is paid for: it must not be thrown away). An
expired URL is refreshed once by polling the job.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from typing import Final

from callbacks.errors import ProviderError
from callbacks.provider import Provider
from service.blobs.base import BlobStore, output_key
from service.media.budget import MemoryBudget, run_within
from service.media.fetch import FetchError, SafeFetcher
from service.media.images import plan_decode
from service.media.watermark import WatermarkConfig, apply_watermark
from service.steps.outcomes import BLOB_REF
from service.steps.runner import Lease
from service.timings import Timings
from statemachine import lifecycle
from statemachine.decide import backoff_s
from statemachine.errors import HooklineError, StoreError, Unavailable
from statemachine.states import Event, State
from statemachine.store import TaskStore
from statemachine.task import Output, Task

FETCH_TRIES: Final = 3


class WatermarkingStep:
    """Turns a task's provider outputs into its stored, watermarked outputs."""

    def __init__(
        self,
        store: TaskStore,
        blobs: BlobStore,
        providers: Mapping[str, Provider],
        timings: Timings,
        output_fetchers: Mapping[str, SafeFetcher],
        watermark: WatermarkConfig,
        *,
        public_fetcher: SafeFetcher,
        budget: MemoryBudget | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.providers = providers
        self.timings = timings
        self.output_fetchers = output_fetchers
        self.public_fetcher = public_fetcher  # for a provider with no output hosts of its own
        self.budget = budget  # shared by every fetch and decode of the process
        self.watermark = watermark
        self.rng = rng or random.Random()

    async def ready(self, task: Task, now: float) -> bool:
        return task.state is State.WATERMARKING

    async def run(self, lease: Lease) -> None:
        claimed = lease.task
        try:
            outputs = await self._render_outputs(claimed)
        except FetchError as exc:
            if exc.retryable:
                await lease.transient(exc, code="output_unavailable")
            else:
                await lease.failed("output_unavailable", exc.message, retryable=False)
            return
        except (Unavailable, StoreError) as exc:
            await lease.transient(exc)
            return
        except HooklineError as exc:
            await lease.failed(exc.code, exc.message, retryable=False)
            return
        await lifecycle.advance(
            self.store,
            claimed.id,
            Event.FINISHED,
            lease.runner.now(),
            self.timings.base,
            changes=lambda t: {"outputs": tuple(outputs)},
            guard=lease.holds,
            known=lease.latest,
        )

    async def _render_outputs(self, task: Task) -> list[Output]:
        provider = self.providers.get(task.provider)
        outputs: list[Output] = []
        for index, url in enumerate(task.provider_outputs):
            data = await self._download(task, provider, url, index)
            cfg = self.watermark
            plan = await asyncio.to_thread(
                plan_decode, data, max_bytes=cfg.max_bytes, max_pixels=cfg.max_pixels
            )
            rendered = await run_within(self.budget, plan.peak_bytes, apply_watermark, data, cfg)
            key = output_key(task.id, index, rendered.content_type.split("/")[-1])
            await self.blobs.put(key, rendered.data, rendered.content_type)
            outputs.append(Output(key, rendered.width, rendered.height, rendered.content_type))
        return outputs

    async def _download(self, task: Task, provider: Provider | None, url: str, index: int) -> bytes:
        """Fetch one output with retries; an expired URL is refreshed once by polling the job.
        An output the provider sent as bytes was stored when it arrived (``blob:<key>``)."""
        if url.startswith(BLOB_REF):
            return await self.blobs.get(url.removeprefix(BLOB_REF))
        fetcher = self.output_fetchers.get(task.provider) or self.public_fetcher
        headers = provider.fetch_headers(url) if provider else {}
        refreshed = False
        for attempt in range(1, FETCH_TRIES + 1):
            try:
                return (await fetcher.fetch(url, headers=headers)).data
            except FetchError as exc:
                if not exc.retryable and not refreshed and provider and task.provider_job_id:
                    refreshed = True
                    fresh = await self._fresh_url(provider, task, index)
                    if fresh and fresh != url:
                        url = fresh
                        continue
                if not exc.retryable or attempt == FETCH_TRIES:
                    raise
                await asyncio.sleep(backoff_s(attempt, 0.5, self.rng.random()))
        raise AssertionError("unreachable")

    async def _fresh_url(self, provider: Provider, task: Task, index: int) -> str | None:
        assert task.provider_job_id is not None
        try:
            outcome = await provider.poll(task.provider_job_id, task.model)
        except ProviderError:
            return None
        if outcome.succeeded and index < len(outcome.outputs):
            return outcome.outputs[index]
        return None
