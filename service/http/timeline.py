"""``GET /v1/tasks/{task_id}/timeline``: a task's whole story in time order.

The transitions come from the task's own history (its creation first); the rest from its notes
(statemachine/timeline.py): each provider submit, each provider webhook received, each poll and
each outbound delivery. The caller sees the timeline of a task they may see (their own; an admin:
any), and a 404 otherwise, as for the task itself.

Each kind of entry has its own shape, declared here as a ``TypedDict`` (the OpenAPI document's
schemas come from them, as service/http/views.py's do). A note is rendered field by field from
what it stored: a missing key or a value of another type becomes null, a key the shape does not
know is left out, so what a note holds can never break the documented shape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final, Literal, NotRequired

from pydantic import with_config
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from typing_extensions import TypedDict

from service.http.requests import caller, visible_task
from service.http.state import runtime
from service.http.views import STRICT, Timestamp
from statemachine.clock import iso
from statemachine.states import State
from statemachine.task import Task
from statemachine.timeline import TRUNCATED, Note


@with_config(STRICT)
class NoteError(TypedDict):
    """An error a provider call ended with: a stable code and a message."""

    code: str
    message: str


# "from" is a keyword, hence the functional form.
TimelineTransition = TypedDict(
    "TimelineTransition",
    {
        "at": Timestamp,
        "kind": Literal["transition"],
        "from": State | None,
        "to": State,
        "event": str,
        "detail": NotRequired[str],
    },
)
TimelineTransition.__pydantic_config__ = STRICT  # type: ignore[attr-defined]

# "try" too.
TimelineSubmit = TypedDict(
    "TimelineSubmit",
    {
        "at": Timestamp,
        "kind": Literal["submit"],
        "provider": str | None,
        "model": str | None,
        "attempt": int | None,
        "try": int | None,
        "job_id": str | None,
        "status_code": int | None,
        "latency_ms": float | None,
        "error": NoteError | None,
        "sync": bool,
        "outcome": str | None,
        "truncated": NotRequired[bool],
    },
)
TimelineSubmit.__pydantic_config__ = STRICT  # type: ignore[attr-defined]


@with_config(STRICT)
class TimelineWebhook(TypedDict):
    """A provider webhook received for the task: whether it verified, why it was refused
    (``reason``, a code), what it said (``status``: the job's, or ``trigger``), what became of it
    (``result``), and its headers with every credential-like value redacted."""

    at: Timestamp
    kind: Literal["webhook"]
    provider: str | None
    delivery_id: str | None
    job_id: str | None
    verified: bool
    status: str | None
    result: str | None
    reason: str | None
    message: str | None
    headers: dict[str, str]
    truncated: NotRequired[bool]


@with_config(STRICT)
class TimelinePoll(TypedDict):
    """A poll of the task's job (``by`` the reaper, or for a trigger) and the provider's answer."""

    at: Timestamp
    kind: Literal["poll"]
    provider: str | None
    job_id: str | None
    by: str | None
    status: str | None
    reason: str | None
    error: NoteError | None
    status_code: int | None
    latency_ms: float | None
    truncated: NotRequired[bool]


@with_config(STRICT)
class TimelineDelivery(TypedDict):
    """One attempt to deliver an outbound webhook about the task to the client."""

    at: Timestamp
    kind: Literal["delivery"]
    webhook_id: str | None
    endpoint_id: str | None
    url: str | None
    event: str | None
    attempt: int | None
    status_code: int | None
    latency_ms: float | None
    error: str | None
    next_retry_at: Timestamp | None
    truncated: NotRequired[bool]


NoteEntry = TimelineSubmit | TimelineWebhook | TimelinePoll | TimelineDelivery
Entry = TimelineTransition | NoteEntry


@with_config(STRICT)
class TaskTimeline(TypedDict):
    """A task's timeline: its transitions and notes, oldest first."""

    task_id: str
    entries: list[Entry]


async def get_timeline(request: Request) -> Response:
    rt = runtime(request)
    task = await visible_task(request, await caller(request))
    notes: list[Note] = []
    if rt.timeline is not None:
        notes = await rt.timeline.notes(task.id, rt.settings.timeline_max_notes)
    body: TaskTimeline = {"task_id": task.id, "entries": entries(task, notes)}
    return JSONResponse(body)


def entries(task: Task, notes: list[Note]) -> list[Entry]:
    """The task's transitions and notes in time order (a transition first at the same instant:
    the note of a submit precedes the ``submitted`` it led to, by its own clock)."""
    timed: list[tuple[float, Entry]] = [(task.created_at, _created(task))]
    for h in task.history:
        entry: TimelineTransition = {
            "at": iso(h.at),
            "kind": "transition",
            "from": h.source,
            "to": h.dest,
            "event": h.event,
        }
        if h.detail is not None:
            entry["detail"] = h.detail
        timed.append((h.at, entry))
    for note in notes:
        rendered = render_note(note)
        if rendered is not None:
            timed.append((note.at, rendered))
    timed.sort(key=lambda pair: pair[0])  # stable: ties keep the order above
    return [entry for _, entry in timed]


def _created(task: Task) -> TimelineTransition:
    return {
        "at": iso(task.created_at),
        "kind": "transition",
        "from": None,
        "to": State.PENDING,
        "event": "created",
    }


def render_note(note: Note) -> NoteEntry | None:
    """A note in its kind's shape; None for a kind this version does not know."""
    render = _RENDERERS.get(note.kind)
    if render is None:
        return None
    entry = render(note.data, iso(note.at))
    if note.data.get(TRUNCATED) is True:
        entry["truncated"] = True
    return entry


def _submit(d: Mapping[str, Any], at: str) -> TimelineSubmit:
    entry: TimelineSubmit = {
        "at": at,
        "kind": "submit",
        "provider": _str(d, "provider"),
        "model": _str(d, "model"),
        "attempt": _int(d, "attempt"),
        "try": _int(d, "try"),
        "job_id": _str(d, "job_id"),
        "status_code": _int(d, "status_code"),
        "latency_ms": _float(d, "latency_ms"),
        "error": _error(d),
        "sync": d.get("sync") is True,
        "outcome": _str(d, "outcome"),
    }
    return entry


def _webhook(d: Mapping[str, Any], at: str) -> TimelineWebhook:
    entry: TimelineWebhook = {
        "at": at,
        "kind": "webhook",
        "provider": _str(d, "provider"),
        "delivery_id": _str(d, "delivery_id"),
        "job_id": _str(d, "job_id"),
        "verified": d.get("verified") is True,
        "status": _str(d, "status"),
        "result": _str(d, "result"),
        "reason": _str(d, "reason"),
        "message": _str(d, "message"),
        "headers": _headers(d),
    }
    return entry


def _poll(d: Mapping[str, Any], at: str) -> TimelinePoll:
    entry: TimelinePoll = {
        "at": at,
        "kind": "poll",
        "provider": _str(d, "provider"),
        "job_id": _str(d, "job_id"),
        "by": _str(d, "by"),
        "status": _str(d, "status"),
        "reason": _str(d, "reason"),
        "error": _error(d),
        "status_code": _int(d, "status_code"),
        "latency_ms": _float(d, "latency_ms"),
    }
    return entry


def _delivery(d: Mapping[str, Any], at: str) -> TimelineDelivery:
    entry: TimelineDelivery = {
        "at": at,
        "kind": "delivery",
        "webhook_id": _str(d, "webhook_id"),
        "endpoint_id": _str(d, "endpoint_id"),
        "url": _str(d, "url"),
        "event": _str(d, "event"),
        "attempt": _int(d, "attempt"),
        "status_code": _int(d, "status_code"),
        "latency_ms": _float(d, "latency_ms"),
        "error": _str(d, "error"),
        "next_retry_at": iso(_float(d, "next_retry_at")),
    }
    return entry


_RENDERERS: Final[dict[str, Callable[[Mapping[str, Any], str], NoteEntry]]] = {
    "submit": _submit,
    "webhook": _webhook,
    "poll": _poll,
    "delivery": _delivery,
}


def _str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) else None


def _int(data: Mapping[str, Any], key: str) -> int | None:
    value = data.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(data: Mapping[str, Any], key: str) -> float | None:
    value = data.get(key)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _error(data: Mapping[str, Any]) -> NoteError | None:
    value = data.get("error")
    if not isinstance(value, Mapping):
        return None
    code, message = value.get("code"), value.get("message")
    return {"code": str(code or "error"), "message": str(message or "")}


def _headers(data: Mapping[str, Any]) -> dict[str, str]:
    value = data.get("headers")
    if not isinstance(value, Mapping):
        return {}
    return {str(k): str(v) for k, v in value.items()}


def routes() -> list[Route]:
    return [Route("/v1/tasks/{task_id}/timeline", get_timeline, methods=["GET"])]
