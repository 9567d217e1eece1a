"""The Provider port: submit with a callback URL, verify and parse a webhook, poll, cancel.

Adapters (replicate.py, fal.py, bfl.py, openai.py, dashscope.py, kling.py, hunyuan.py,
seedream.py) translate each provider's HTTP contract (shared/PROVIDERS.md) into these types and
raise the errors of callbacks/errors.py.

How an outcome arrives is a property of the provider (``Provider.arrival``), and one lifecycle
serves all four:

    webhook   a signed webhook carries the outcome (Replicate, fal); polls only reconcile
    trigger   a callback only says "ask me" (BFL, Kling, OpenAI's thin events): confirmed by poll
    poll      no callback at all (DashScope, Hunyuan): the reaper polls on a schedule
    sync      the submit's answer is the outcome (Seedream): ``SyncProvider.generate``

``Provider.quota`` carries the provider's published request limits, the defaults an operator
may override per provider.

An output is an https URL to download, or a ``data:<type>;base64,…`` URI when the provider
answers with the bytes (OpenAI): the service stores those bytes at once and keeps a reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from statemachine.outcome import Outcome, OutcomeStatus

__all__ = [
    "Arrival",
    "Delivery",
    "Limits",
    "ModelGrammar",
    "Outcome",
    "OutcomeStatus",
    "Provider",
    "Quota",
    "Submission",
    "SyncProvider",
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


Arrival = Literal["webhook", "trigger", "poll", "sync"]


@dataclass(frozen=True, slots=True)
class Quota:
    """A provider's published request limits, as defaults (0: none published, no limit):
    submits and polls per second for the operator's account, and jobs in flight at once (the
    service's ``provider_concurrency`` is lowered to it)."""

    submits_per_s: float = 0.0
    polls_per_s: float = 0.0
    concurrency: int = 0


class Provider(Protocol):
    """An AI image provider. Every base URL is configurable, so a faithful fake can stand in."""

    name: str
    limits: Limits
    arrival: Arrival
    quota: Quota

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
class SyncProvider(Protocol):
    """A provider whose answer to the request is the outcome (``arrival`` "sync"): no job id, no
    callback. The processing step makes this call under its lease, with heartbeats."""

    async def generate(self, submission: Submission) -> Outcome:
        """Make the images now: a final outcome (its ``job_id`` one the adapter names, unique per
        call, e.g. the provider's request id) or a ``ProviderError``."""


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
