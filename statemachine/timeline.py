"""A task's timeline: notes of what happened around it besides its transitions.

The transitions are in ``Task.history`` already. The timeline keeps the rest of a task's story,
one ``Note`` per event: each provider submit (job id, HTTP status, latency), each provider webhook
received (delivery id, whether it verified and why not, its headers with secrets redacted), each
poll and its answer, each outbound delivery to the client. ``GET /v1/tasks/{id}/timeline``
(service/http/timeline.py) merges the two in time order.

The ``Timeline`` port is kept by ``sqlite_timeline.SqliteTimeline`` (a table in the store's file)
and ``mongo_timeline.MongoTimeline`` (a collection on the store's database); one contract suite
(tests/contract/test_timeline_contract.py) runs against both. Both keep it bounded:

- at most ``max_notes`` notes per task (``HOOKLINE_TIMELINE_MAX_NOTES``): a note past that pushes
  the task's oldest out;
- each note's data is cut to ``MAX_NOTE_BYTES`` encoded (``bounded``): long strings are truncated
  with a marker that says how much was cut, long lists and objects lose their tail, and a cut
  note says ``truncated: true``.

Notes are best effort: ``note_quietly`` logs a failing write and drops it, so a note never fails
the step or the webhook answer it describes. Nothing secret belongs in a note; webhook headers go
through ``redact_headers`` first.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol, get_args

import orjson
import structlog

from statemachine.errors import HooklineError
from statemachine.outcome import Outcome

log = structlog.get_logger(__name__)

NoteKind = Literal["submit", "webhook", "poll", "delivery"]
NOTE_KINDS: Final = frozenset(get_args(NoteKind))

DEFAULT_MAX_NOTES: Final = 200
MAX_NOTE_BYTES: Final = 4096  # one note's data, encoded as JSON
MAX_VALUE_CHARS: Final = 512  # a string longer than this is cut...
SHORT_VALUE_CHARS: Final = 64  # ... and shorter still when the note is too large even so
MAX_ITEMS: Final = 50  # entries of one list or object (a delivery's headers)
MAX_KEY_CHARS: Final = 64
MAX_DEPTH: Final = 4
MAX_SAFE_INT: Final = 2**53  # larger integers are kept as strings (JSON clients round them)
TRUNCATED: Final = "truncated"  # set to True on a note whose data was cut

REDACTED: Final = "[redacted]"
# Header names whose values are credentials or signatures (authorization, cookies, API keys,
# webhook signatures and tokens): the value is never kept.
_SECRET_HEADER: Final = re.compile(
    r"auth|signature|token|secret|key|cookie|password|passwd|session|credential|jwt", re.I
)


@dataclass(frozen=True, slots=True)
class Note:
    """One event of a task's timeline: ``at`` in epoch seconds, ``data`` JSON-able and bounded."""

    task_id: str
    at: float
    kind: str
    data: dict[str, Any]


class Timeline(Protocol):
    """Where the notes of every task are kept (module docstring)."""

    async def open(self) -> None:
        """Create the table or collection and its index if missing. Idempotent."""

    async def note(self, task_id: str, kind: str, at: float, data: Mapping[str, Any]) -> None:
        """Keep one note, its ``data`` cut by ``bounded``; the task's oldest notes go once it has
        more than the adapter's ``max_notes``. ``ValueError`` for a kind not in ``NOTE_KINDS``."""

    async def notes(self, task_id: str, limit: int) -> list[Note]:
        """The task's newest ``limit`` notes, oldest first (by ``at``, then by arrival)."""


def checked_kind(kind: str) -> str:
    """``kind`` if it is a note kind, else ``ValueError`` (the route renders only these)."""
    if kind not in NOTE_KINDS:
        raise ValueError(f"unknown note kind {kind!r}; one of {sorted(NOTE_KINDS)}")
    return kind


async def note_quietly(
    timeline: Timeline, task_id: str, kind: NoteKind, at: float, data: Mapping[str, Any]
) -> None:
    """``timeline.note`` that never raises: a note that cannot be written is logged and dropped
    (it describes the work; it is not the work)."""
    try:
        await timeline.note(task_id, kind, at, data)
    except Exception as exc:
        log.warning("timeline_note_failed", task_id=task_id, kind=kind, error=repr(exc))


def elapsed_ms(started: float) -> float:
    """Milliseconds since ``started`` (a ``time.perf_counter()`` reading): a call's latency."""
    return round((time.perf_counter() - started) * 1000, 1)


def error_note(error: HooklineError | None) -> dict[str, str] | None:
    """An error as notes keep it: its code and message."""
    return None if error is None else {"code": error.code, "message": error.message}


def poll_note(
    provider: str,
    job_id: str,
    by: str,
    latency_ms: float,
    answer: Outcome | None,
    error: HooklineError | None,
    status_code: int | None,
) -> dict[str, Any]:
    """A poll's note: who asked (``by``: ``trigger``, a webhook that carried no outcome, or
    ``reaper``), what the provider answered or the error it gave (with its HTTP status when it
    had one), and how long the poll took."""
    return {
        "provider": provider,
        "job_id": job_id,
        "by": by,
        "status": answer.status if answer is not None else None,
        "reason": answer.reason if answer is not None else None,
        "error": error_note(error),
        "status_code": status_code,
        "latency_ms": latency_ms,
    }


def submit_note(
    provider: str,
    model: str,
    attempt: int,
    tried: int,
    latency_ms: float,
    *,
    job_id: str | None,
    status_code: int | None,
    error: HooklineError | None,
    sync: bool = False,
    outcome: str | None = None,
) -> dict[str, Any]:
    """A submit's note: the task's ``attempt``, the try within it (a transient failure is tried
    again at once, a few times), the job id or the error, the HTTP status of the provider's
    answer, the latency; for a ``sync`` provider's call, the ``outcome`` its answer said."""
    return {
        "provider": provider,
        "model": model,
        "attempt": attempt,
        "try": tried,
        "job_id": job_id,
        "status_code": status_code,
        "latency_ms": latency_ms,
        "error": error_note(error),
        "sync": sync,
        "outcome": outcome,
    }


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Request headers as a note keeps them: names lower-cased, repeated ones joined with ", ",
    the value of every credential-like header (``_SECRET_HEADER``) replaced by ``REDACTED``."""
    items = headers.items()
    kept: dict[str, str] = {}
    for name, value in items:
        lower = name.lower()
        shown = REDACTED if _SECRET_HEADER.search(lower) else value
        kept[lower] = f"{kept[lower]}, {shown}" if lower in kept and shown != REDACTED else shown
    return kept


def bounded(data: Mapping[str, Any], max_bytes: int = MAX_NOTE_BYTES) -> dict[str, Any]:
    """``data`` as JSON-able values whose encoding fits ``max_bytes``.

    Strings over ``MAX_VALUE_CHARS`` are cut with a ``…(+N chars)`` marker, lists and objects
    keep their first ``MAX_ITEMS`` entries, values nested deeper than ``MAX_DEPTH`` and values
    JSON has no form for become strings. If that is still too large, strings are cut to
    ``SHORT_VALUE_CHARS``, then top-level entries are left out from the last one. Whatever was
    cut, the result says ``truncated: true``."""
    fitted: dict[str, Any] = {}
    for chars in (MAX_VALUE_CHARS, SHORT_VALUE_CHARS):
        cutter = _Cutter(chars)
        fitted = cutter.mapping(data, depth=0)
        if cutter.cut:
            fitted[TRUNCATED] = True
        if encoded_size(fitted) <= max_bytes:
            return fitted
    kept: dict[str, Any] = {TRUNCATED: True}
    for key, value in fitted.items():
        if key != TRUNCATED and encoded_size({**kept, key: value}) <= max_bytes:
            kept[key] = value
    return kept


def encoded_size(data: Mapping[str, Any]) -> int:
    """Bytes of ``data`` as JSON (what a note's bound counts)."""
    return len(orjson.dumps(data))


class _Cutter:
    """One pass of ``bounded`` with strings cut at ``chars``; ``cut`` says whether it cut."""

    def __init__(self, chars: int) -> None:
        self.chars = chars
        self.cut = False

    def mapping(self, data: Mapping[Any, Any], depth: int) -> dict[str, Any]:
        items = list(data.items())
        if len(items) > MAX_ITEMS:
            items, self.cut = items[:MAX_ITEMS], True
        return {self.text(str(k), MAX_KEY_CHARS): self.value(v, depth + 1) for k, v in items}

    def value(self, value: Any, depth: int) -> Any:
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int):
            return value if abs(value) <= MAX_SAFE_INT else str(value)
        if isinstance(value, float):
            return value if math.isfinite(value) else str(value)
        if isinstance(value, str):
            return self.text(value, self.chars)
        if depth >= MAX_DEPTH:
            self.cut = True
            return self.text(str(value), self.chars)
        if isinstance(value, Mapping):
            return self.mapping(value, depth)
        if isinstance(value, list | tuple):
            if len(value) > MAX_ITEMS:
                value, self.cut = value[:MAX_ITEMS], True
            return [self.value(v, depth + 1) for v in value]
        return self.text(str(value), self.chars)

    def text(self, value: str, chars: int) -> str:
        # a lone surrogate has no UTF-8 form, so JSON could not hold it: it becomes "?"
        value = value.encode("utf-8", "replace").decode("utf-8")
        if len(value) <= chars:
            return value
        self.cut = True
        return f"{value[:chars]}…(+{len(value) - chars} chars)"
