"""The Provider port: submit with a callback URL, verify and parse a webhook, poll, cancel.

Adapters (replicate.py, fal.py, bfl.py) translate each provider's HTTP contract
(shared/PROVIDERS.md) into these types and raise the errors of callbacks/errors.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from statemachine.outcome import Outcome, OutcomeStatus

__all__ = [
    "Delivery",
    "Limits",
    "ModelGrammar",
    "Outcome",
    "OutcomeStatus",
    "Provider",
    "Submission",
    "checked_model",
]


@dataclass(frozen=True, slots=True)
class Submission:
    """One provider attempt for one task."""

    task_id: str
    attempt: int
    model: str
    prompt: str
    callback_url: str
    inputs: tuple[str, ...] = ()  # image URLs the provider can fetch, or data URIs
    negative_prompt: str | None = None
    num_outputs: int = 1
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Delivery:
    """An authenticated webhook delivery. ``outcome`` None means the delivery is only a trigger
    (BFL): the receiver must poll for the outcome."""

    delivery_id: str
    job_id: str
    outcome: Outcome | None


@dataclass(frozen=True, slots=True)
class Limits:
    """What a provider accepts as input images."""

    max_side: int = 2048
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP")
    accepts_data_uri: bool = True


class Provider(Protocol):
    """An AI image provider. Every base URL is configurable, so a faithful fake can stand in."""

    name: str
    limits: Limits

    async def submit(self, submission: Submission) -> str:
        """Start a job that will call ``submission.callback_url``; return the provider job id."""

    async def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> Delivery:
        """Authenticate a webhook over the raw ``body`` and parse it; raise ``WebhookRejected``."""

    async def poll(self, job_id: str, model: str) -> Outcome:
        """Ask the provider how the job stands (reconciliation of lost webhooks)."""

    async def cancel(self, job_id: str, model: str) -> None:
        """Cancel a job, best effort (errors are the caller's to log, never fatal)."""

    def fetch_headers(self, url: str) -> dict[str, str]:
        """Headers needed to download an output URL (e.g. Replicate's Authorization)."""


@runtime_checkable
class ModelGrammar(Protocol):
    """A provider whose model names follow a grammar (every real adapter: a model string becomes
    part of the provider's URL path, so anything outside the grammar is refused)."""

    def validate_model(self, model: str) -> str:
        """``model`` if the grammar takes it, else ``callbacks.errors.InvalidModel``."""


def checked_model(provider: Provider, model: str) -> str:
    """``model`` checked against ``provider``'s grammar, before any request (raises
    ``InvalidModel``). A provider without one (a test double) takes any model. Pure: the HTTP
    layer may call it when a task is created, to refuse such a model with 422."""
    if isinstance(provider, ModelGrammar):
        return provider.validate_model(model)
    return model
