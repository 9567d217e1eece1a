"""The resources one process holds, created in the app's lifespan and reached by handlers through
``request.state.services``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from callbacks.provider import Provider
from service.http.ratelimit import RateLimiter
from service.settings import Settings
from service.styles import Catalogue
from statemachine import clock
from statemachine.decide import Deadlines
from statemachine.errors import BadRequest
from statemachine.store import ChangeFeed, TaskStore
from statemachine.task import Task

if TYPE_CHECKING:
    from service.blobs.base import BlobStore


@dataclass
class Services:
    settings: Settings
    store: TaskStore
    feed: ChangeFeed
    blobs: BlobStore
    http: httpx.AsyncClient
    providers: dict[str, Provider]
    catalogue: Catalogue
    limiter: RateLimiter
    deadlines: Deadlines
    now: Callable[[], float] = clock.now
    extras: dict[str, Any] = field(default_factory=dict)
    _timings: dict[tuple[str, str], Deadlines] = field(default_factory=dict, repr=False)

    def deadlines_for(self, task: Task) -> Deadlines:
        """The timings that apply to ``task``'s current provider and model."""
        key = (task.provider, task.model)
        found = self._timings.get(key)
        if found is None:
            found = self._timings[key] = self.settings.deadlines_for(*key, base=self.deadlines)
        return found

    def provider(self, name: str) -> Provider:
        try:
            return self.providers[name]
        except KeyError:
            raise BadRequest(
                f"unknown provider {name!r}",
                code="unknown_provider",
                details=sorted(self.providers),
            ) from None
