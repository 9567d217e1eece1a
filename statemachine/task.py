"""The Task record, its parts, and its stored-document form (shared by every store adapter)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypedDict

from statemachine.states import State, state_of


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One transition: from, to, event, when, and an optional detail."""

    source: State
    dest: State
    event: str
    at: float
    detail: str | None = None

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "from": self.source.value,
            "to": self.dest.value,
            "event": self.event,
            "at": self.at,
        }
        if self.detail is not None:
            doc["detail"] = self.detail
        return doc

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> HistoryEntry:
        return cls(
            state_of(doc["from"]), state_of(doc["to"]), doc["event"], doc["at"], doc.get("detail")
        )


@dataclass(frozen=True, slots=True)
class Output:
    """A stored output image: blob key plus what clients need to show it."""

    key: str
    width: int
    height: int
    content_type: str


@dataclass(frozen=True, slots=True)
class TaskFailure:
    """Why a task failed (or the last attempt failed): a stable code and a message."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Attempt:
    """One provider attempt: which provider and job, and how it ended (None while running).

    ``outcome`` is one of ``succeeded``, ``failed``, ``timeout``, ``late_success`` (timed out,
    then its result was adopted), ``cancelled``, ``superseded``;
    these are what the KPIs (first-try success, timeout rate, retries per task) are computed from.
    """

    number: int
    provider: str
    model: str
    job_id: str | None = None
    submitted_at: float | None = None
    finished_at: float | None = None
    outcome: str | None = None


@dataclass(frozen=True, slots=True)
class Task:
    """The persisted state machine of one image job. Immutable: change with ``dataclasses.replace``.

    ``version`` grows by one on every stored change; every change is a compare-and-set on
    (id, state, version). ``deadline`` is when the reaper must look at the task (None only in a
    terminal state). ``lease_owner``/``lease_expires`` mark work claimed in processing/watermarking.
    """

    id: str
    owner: str
    state: State
    version: int
    provider: str
    model: str
    prompt: str
    cost: int
    created_at: float
    updated_at: float
    callback_token: str
    style: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    inputs: tuple[dict[str, str], ...] = ()
    num_outputs: int = 1
    attempts: int = 0
    refunded: bool = False
    deadline: float | None = None
    lease_owner: str | None = None
    lease_expires: float | None = None
    provider_job_id: str | None = None
    provider_outputs: tuple[str, ...] = ()
    outputs: tuple[Output, ...] = ()
    error: TaskFailure | None = None
    history: tuple[HistoryEntry, ...] = ()
    attempt_log: tuple[Attempt, ...] = ()
    idempotency_key: str | None = None
    request_hash: str | None = None
    # An outcome that arrived while the task could not take it yet (a webhook racing the submit,
    # or a success of an earlier attempt): the step that holds the task applies it.
    early_outcome: dict[str, Any] | None = None
    # Times a leased step was handed back after a transient failure (bounded by the worker).
    step_retries: int = 0
    # Times the current step's worker died holding its lease (bounded: no poison loops).
    lost_leases: int = 0
    # A processing task whose inputs are ready and which is submitting: it holds one of its
    # provider's (and its owner's) slots, like every task in ai_processing. A processing task
    # still preparing its inputs, or backing off, holds none.
    holds_slot: bool = False
    # polls of the current job that found it still running (the poll schedule's backoff)
    polls: int = 0
    # The task's own destination for outbound webhooks (``webhook`` on POST /v1/tasks), signed
    # with its owner's task-webhook secret; None: only the owner's registered endpoints.
    webhook: str | None = None
    # The watch link's revision: rotating the link bumps it, and every older link stops working.
    watch_rev: int = 0

    @property
    def terminal(self) -> bool:
        from statemachine.states import TERMINAL

        return self.state in TERMINAL

    def lease_held(self, now: float) -> bool:
        """True if someone holds an unexpired lease on this task."""
        return self.lease_owner is not None and (self.lease_expires or 0.0) > now

    def with_changes(self, **changes: Any) -> Task:
        return dataclasses.replace(self, **changes)


class TaskDoc(TypedDict):
    """A task as stored (SQLite JSON column, MongoDB document). Times are epoch seconds."""

    id: str
    owner: str
    state: str
    version: int
    provider: str
    model: str
    prompt: str
    cost: int
    created_at: float
    updated_at: float
    callback_token: str
    style: str | None
    params: dict[str, Any]
    inputs: list[dict[str, str]]
    num_outputs: int
    attempts: int
    refunded: bool
    deadline: float | None
    lease_owner: str | None
    lease_expires: float | None
    provider_job_id: str | None
    provider_outputs: list[str]
    outputs: list[dict[str, Any]]
    error: dict[str, str] | None
    history: list[dict[str, Any]]
    attempt_log: list[dict[str, Any]]
    idempotency_key: str | None
    request_hash: str | None
    early_outcome: dict[str, Any] | None
    step_retries: int
    lost_leases: int
    holds_slot: bool
    polls: int
    webhook: str | None
    watch_rev: int


def to_doc(task: Task) -> TaskDoc:
    """The stored form of ``task``."""
    return TaskDoc(
        id=task.id,
        owner=task.owner,
        state=task.state.value,
        version=task.version,
        provider=task.provider,
        model=task.model,
        prompt=task.prompt,
        cost=task.cost,
        created_at=task.created_at,
        updated_at=task.updated_at,
        callback_token=task.callback_token,
        style=task.style,
        params=dict(task.params),
        inputs=[dict(i) for i in task.inputs],
        num_outputs=task.num_outputs,
        attempts=task.attempts,
        refunded=task.refunded,
        deadline=task.deadline,
        lease_owner=task.lease_owner,
        lease_expires=task.lease_expires,
        provider_job_id=task.provider_job_id,
        provider_outputs=list(task.provider_outputs),
        outputs=[_output_doc(o) for o in task.outputs],
        error={"code": task.error.code, "message": task.error.message} if task.error else None,
        history=[h.to_doc() for h in task.history],
        attempt_log=[_attempt_doc(a) for a in task.attempt_log],
        idempotency_key=task.idempotency_key,
        request_hash=task.request_hash,
        early_outcome=task.early_outcome,
        step_retries=task.step_retries,
        lost_leases=task.lost_leases,
        holds_slot=task.holds_slot,
        polls=task.polls,
        webhook=task.webhook,
        watch_rev=task.watch_rev,
    )


# Written out rather than dataclasses.asdict, which deep-copies recursively (a hot path: every
# stored change encodes the whole task).
def _output_doc(o: Output) -> dict[str, Any]:
    return {"key": o.key, "width": o.width, "height": o.height, "content_type": o.content_type}


def _attempt_doc(a: Attempt) -> dict[str, Any]:
    return {
        "number": a.number,
        "provider": a.provider,
        "model": a.model,
        "job_id": a.job_id,
        "submitted_at": a.submitted_at,
        "finished_at": a.finished_at,
        "outcome": a.outcome,
    }


def from_doc(doc: TaskDoc | dict[str, Any]) -> Task:
    """The task stored as ``doc`` (extra keys such as MongoDB's ``_id`` are ignored)."""
    error = doc.get("error")
    return Task(
        id=doc["id"],
        owner=doc["owner"],
        state=state_of(doc["state"]),
        version=doc["version"],
        provider=doc["provider"],
        model=doc["model"],
        prompt=doc["prompt"],
        cost=doc["cost"],
        created_at=doc["created_at"],
        updated_at=doc["updated_at"],
        callback_token=doc["callback_token"],
        style=doc.get("style"),
        params=dict(doc.get("params") or {}),
        inputs=tuple(dict(i) for i in doc.get("inputs") or ()),
        num_outputs=doc.get("num_outputs", 1),
        attempts=doc.get("attempts", 0),
        refunded=doc.get("refunded", False),
        deadline=doc.get("deadline"),
        lease_owner=doc.get("lease_owner"),
        lease_expires=doc.get("lease_expires"),
        provider_job_id=doc.get("provider_job_id"),
        provider_outputs=tuple(doc.get("provider_outputs") or ()),
        outputs=tuple(Output(**o) for o in doc.get("outputs") or ()),
        error=TaskFailure(**error) if error else None,
        history=tuple(HistoryEntry.from_doc(h) for h in doc.get("history") or ()),
        attempt_log=tuple(Attempt(**a) for a in doc.get("attempt_log") or ()),
        idempotency_key=doc.get("idempotency_key"),
        request_hash=doc.get("request_hash"),
        early_outcome=doc.get("early_outcome"),
        step_retries=doc.get("step_retries", 0),
        lost_leases=doc.get("lost_leases", 0),
        holds_slot=doc.get("holds_slot", False),
        polls=doc.get("polls", 0),
        webhook=doc.get("webhook"),
        watch_rev=doc.get("watch_rev", 0),
    )
