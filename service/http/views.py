"""How records look on the wire: ISO-8601 times, outputs with signed URLs.

Every response body is declared here as a ``TypedDict`` and built as a plain dict literal of that
type: mypy checks each builder against its type (a missing or extra key is an error), building
costs nothing more than the dict, and service/http/openapi.py generates the document's schemas
from the same types through pydantic. ``extra="forbid"`` makes the schemas strict, so a test that
validates real responses against the document (tests/integration/test_openapi.py, and the
fuzzer) catches a body that grew a key its type does not declare.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, NotRequired

from pydantic import ConfigDict, Field, WithJsonSchema, with_config
from typing_extensions import TypedDict

from statemachine.clock import iso
from statemachine.states import State
from statemachine.store import User
from statemachine.task import Task as TaskRecord

if TYPE_CHECKING:
    from service.blobs.base import BlobStore
    from service.http.watch import WatchLink
    from service.styles import ParamRule as ParamRuleRecord
    from service.styles import Style as StyleRecord

STRICT = ConfigDict(extra="forbid")

Timestamp = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]
Rate = Annotated[float, Field(ge=0, le=1)]


@with_config(STRICT)
class Output(TypedDict):
    """An output image: a signed URL that expires (fetch it again from the task for a new one)."""

    url: str
    width: int
    height: int
    content_type: str


@with_config(STRICT)
class TaskError(TypedDict):
    """Why a task failed: a stable code and a message."""

    code: str
    message: str


# "from" is a keyword, hence the functional form.
Transition = TypedDict(
    "Transition",
    {"from": State, "to": State, "event": str, "at": Timestamp, "detail": NotRequired[str]},
)
Transition.__pydantic_config__ = STRICT  # type: ignore[attr-defined]


@with_config(STRICT)
class Task(TypedDict):
    """A task (DESIGN.md, "Response shapes")."""

    id: str
    state: State
    attempts: int
    provider: str
    model: str
    style: str | None
    prompt: str
    num_outputs: int
    cost: int
    refunded: bool
    created_at: Timestamp
    updated_at: Timestamp
    deadline: Timestamp | None
    history: list[Transition]
    outputs: list[Output]
    error: TaskError | None
    # the task's watch link (service/http/watch.py): on a task shown to its key, never on a
    # list's items, a link reader's view or a cancelled task
    watch_url: NotRequired[str]
    watch_expires_at: NotRequired[Timestamp]


@with_config(STRICT)
class TaskList(TypedDict):
    """A page of tasks; ``next`` is the cursor of the following page (null on the last)."""

    items: list[Task]
    next: str | None


@with_config(STRICT)
class Me(TypedDict):
    """The caller and their credit balance, as of now."""

    user: str
    balance: int
    admin: bool


@with_config(STRICT)
class Upload(TypedDict):
    """A stored upload: use ``key`` as ``{"upload": key}`` in a task's inputs."""

    key: str
    width: int
    height: int
    content_type: str
    bytes: int


@with_config(STRICT)
class SizeTier(TypedDict):
    """Credits per output for outputs up to ``max_pixels`` (``width × height``)."""

    max_pixels: int
    per_output: int


@with_config(STRICT)
class Price(TypedDict):
    """A task costs ``base + num_outputs × per_output``: ``per_output`` is flat, or (null) the
    first tier of ``sizes`` that covers the output size; params may add surcharges per output."""

    base: int
    per_output: int | None
    sizes: list[SizeTier]


@with_config(STRICT)
class Surcharge(TypedDict):
    """Credits per output added when the value is above ``above``."""

    above: float
    per_output: int


ParamChoice = str | int | float | bool


@with_config(STRICT)
class ParamRule(TypedDict):
    """A param a user may set: its type and allowed values, and what a value adds to the price
    per output (``prices`` by choice, or the highest ``surcharges`` threshold exceeded)."""

    type: Literal["integer", "number", "boolean", "string"]
    minimum: NotRequired[float]
    maximum: NotRequired[float]
    choices: NotRequired[list[ParamChoice]]
    max_length: NotRequired[int]
    prices: NotRequired[dict[str, int]]
    surcharges: NotRequired[list[Surcharge]]


@with_config(STRICT)
class Style(TypedDict):
    """A style of the catalogue: what it runs, what a user may choose and what it costs."""

    name: str
    description: str
    prompt_template: str
    negative_prompt: str | None
    provider: str
    model: str
    params: dict[str, Any]
    # the price of one output at the style's own params (what the simplest task costs)
    cost: int
    price: Price
    # provider → the models a user may run on it; first the provider the style runs on, and
    # first in each list the model that runs when the request names none
    providers: dict[str, list[str]]
    user_params: dict[str, ParamRule]
    fallbacks: list[str]


@with_config(STRICT)
class StyleList(TypedDict):
    """The styles, and ``plain``: what a task without a style runs and costs."""

    items: list[Style]
    plain: Style


@with_config(STRICT)
class Status(TypedDict):
    status: Literal["ok", "ready"]


@with_config(STRICT)
class ErrorDetail(TypedDict):
    code: str
    message: str
    details: Any


@with_config(STRICT)
class Error(TypedDict):
    """Every error: ``{"error": {"code", "message", "details"}}`` (service/http/errors.py)."""

    error: ErrorDetail


@with_config(STRICT)
class StateEvent(TypedDict):
    """The ``data`` of one Server-Sent Event (``event: state``) of ``/v1/tasks/{id}/events``."""

    task_id: str
    state: State
    event: str
    at: Timestamp


@with_config(STRICT)
class WebhookReceipt(TypedDict):
    """What the webhook route answers a provider: what became of the delivery."""

    status: str


# /v1/stats (service/ops/stats.py builds it; tests validate its responses against this type)


@with_config(STRICT)
class Summary(TypedDict):
    count: int
    p50: float | None
    p95: float | None
    mean: float | None


# "from" and "40_to_60s" are no identifiers, hence the functional form.
Bucket = TypedDict("Bucket", {"from": float, "to": float | None, "count": int})
Bucket.__pydantic_config__ = STRICT  # type: ignore[attr-defined]

Bands = TypedDict(
    "Bands", {"under_40s": Rate | None, "40_to_60s": Rate | None, "over_60s": Rate | None}
)
Bands.__pydantic_config__ = STRICT  # type: ignore[attr-defined]


@with_config(STRICT)
class AiLatency(TypedDict):
    count: int
    p50: float | None
    p95: float | None
    mean: float | None
    bands: Bands
    histogram: list[Bucket]


@with_config(STRICT)
class RateThresholds(TypedDict):
    acceptable_below: Rate
    redesign_above: Rate


@with_config(STRICT)
class Thresholds(TypedDict):
    timeout_rate: RateThresholds


@with_config(STRICT)
class Baseline(TypedDict):
    first_try_success_rate: Rate
    final_success_rate: Rate
    mean_latency_s: float


@with_config(STRICT)
class Stats(TypedDict):
    """The seed's KPIs over the caller's tasks (an admin's: everyone's); rates are 0-1 fractions
    over settled (completed or failed) tasks, null without any."""

    window_s: int
    since: Timestamp
    scope: Literal["all", "own"]
    tasks: int
    settled: int
    completed: int
    failed: int
    cancelled: int
    in_flight: int
    first_try_success_rate: Rate | None
    final_success_rate: Rate | None
    timeout_rate: Rate | None
    timeouts: int
    retries_per_task: float | None
    latency_s: Summary
    ai_latency_s: AiLatency
    state_latency_s: dict[str, Summary]
    thresholds: Thresholds
    verdict: Literal["acceptable", "tune", "redesign"] | None
    baseline: Baseline


async def task_json(
    task: TaskRecord, blobs: BlobStore, url_ttl_s: int, *, watch: WatchLink | None = None
) -> Task:
    """The public shape of a task (DESIGN.md, "Response shapes"), with ``watch`` as its
    ``watch_url`` and ``watch_expires_at`` when given (``watch.watch_link``)."""
    outputs: list[Output] = [
        {
            "url": await blobs.url(o.key, url_ttl_s),
            "width": o.width,
            "height": o.height,
            "content_type": o.content_type,
        }
        for o in task.outputs
    ]
    history: list[Transition] = []
    for h in task.history:
        entry: Transition = {"from": h.source, "to": h.dest, "event": h.event, "at": iso(h.at)}
        if h.detail is not None:
            entry["detail"] = h.detail
        history.append(entry)
    body: Task = {
        "id": task.id,
        "state": task.state,
        "attempts": task.attempts,
        "provider": task.provider,
        "model": task.model,
        "style": task.style,
        "prompt": task.prompt,
        "num_outputs": task.num_outputs,
        "cost": task.cost,
        "refunded": task.refunded,
        "created_at": iso(task.created_at),
        "updated_at": iso(task.updated_at),
        "deadline": iso(task.deadline),
        "history": history,
        "outputs": outputs,
        "error": {"code": task.error.code, "message": task.error.message} if task.error else None,
    }
    if watch is not None:
        body["watch_url"] = watch.url
        body["watch_expires_at"] = iso(watch.expires_at)
    return body


def user_json(user: User) -> Me:
    return {"user": user.name, "balance": user.balance, "admin": user.is_admin}


def style_json(style: StyleRecord, providers: dict[str, list[str]]) -> Style:
    """A style as ``/v1/styles`` shows it; ``providers`` is what the catalogue offers on the
    configured providers (``Catalogue.choices``)."""
    price = style.price
    return {
        "name": style.name,
        "description": style.description,
        "prompt_template": style.prompt_template,
        "negative_prompt": style.negative_prompt,
        "provider": style.provider,
        "model": style.model,
        "params": style.params,
        "cost": style.cost,
        "price": {
            "base": price.base,
            "per_output": price.per_output,
            "sizes": [
                {"max_pixels": t.max_pixels, "per_output": t.per_output} for t in price.sizes
            ],
        },
        "providers": providers,
        "user_params": {name: param_rule_json(r) for name, r in style.user_params.items()},
        "fallbacks": list(style.fallbacks),
    }


def param_rule_json(rule: ParamRuleRecord) -> ParamRule:
    out: ParamRule = {"type": rule.type}
    if rule.minimum is not None and rule.maximum is not None:
        out["minimum"], out["maximum"] = rule.minimum, rule.maximum
    if rule.choices:
        out["choices"] = list(rule.choices)
    if rule.max_length is not None:
        out["max_length"] = rule.max_length
    if rule.prices:
        out["prices"] = dict(rule.prices)
    if rule.surcharges:
        out["surcharges"] = [
            {"above": s.above, "per_output": s.per_output} for s in rule.surcharges
        ]
    return out


def upload_json(key: str, width: int, height: int, content_type: str, size: int) -> Upload:
    return {
        "key": key,
        "width": width,
        "height": height,
        "content_type": content_type,
        "bytes": size,
    }
