"""Builders of domain records for tests and benches, with sensible defaults.

    task = make_task(owner="bob", cost=10)
    waiting = make_task(state=State.AI_PROCESSING, version=3, attempts=1)

Each builder gives a valid record; keyword arguments override any field. The benches import this
module too (``python -m bench.X`` runs from the repository root, where ``tests`` is a package).
"""

from __future__ import annotations

import secrets
from typing import Any

from statemachine.decide import Deadlines
from statemachine.states import State
from statemachine.task import Task

T0 = 1_700_000_000.0
# How long a new task has to be picked up: the service's default, not a number of our own.
_HANDOFF_S = Deadlines().handoff_s


def make_task(*, now: float = T0, **changes: Any) -> Task:
    """A new task as the REST API stores it: pending at version 1, owned by ``alice``, costing 5,
    created at ``now`` and due after the hand-off deadline, with a unique id and callback token
    and no Idempotency-Key. ``changes`` set any other field (or override these)."""
    fields: dict[str, Any] = {
        "id": "tsk_" + secrets.token_hex(12),
        "owner": "alice",
        "state": State.PENDING,
        "version": 1,
        "provider": "sim",
        "model": "m",
        "prompt": "a portrait in the rain",
        "cost": 5,
        "created_at": now,
        "updated_at": now,
        "callback_token": secrets.token_urlsafe(24),
        "deadline": now + _HANDOFF_S,
    }
    fields.update(changes)
    return Task(**fields)
