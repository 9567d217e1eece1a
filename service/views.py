"""How records look on the wire: ISO-8601 times, outputs with signed URLs."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from statemachine.store import User
from statemachine.task import Task

if TYPE_CHECKING:
    from service.blobs import BlobStore


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


async def task_json(task: Task, blobs: BlobStore, url_ttl_s: int) -> dict[str, Any]:
    """The public shape of a task (DESIGN.md, "Response shapes")."""
    outputs = [
        {
            "url": await blobs.url(o.key, url_ttl_s),
            "width": o.width,
            "height": o.height,
            "content_type": o.content_type,
        }
        for o in task.outputs
    ]
    history: list[dict[str, Any]] = []
    for h in task.history:
        entry: dict[str, Any] = {
            "from": h.source.value,
            "to": h.dest.value,
            "event": h.event,
            "at": iso(h.at),
        }
        if h.detail is not None:
            entry["detail"] = h.detail
        history.append(entry)
    return {
        "id": task.id,
        "state": task.state.value,
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


def user_json(user: User) -> dict[str, Any]:
    return {"user": user.name, "balance": user.balance, "admin": user.is_admin}
