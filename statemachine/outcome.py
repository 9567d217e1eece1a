"""What a provider says about a job, as data: the ``Outcome`` the adapters produce and the outcome
rules (statemachine/rules.py) judge.

An outcome that arrives before the task can take it is kept on the task (``Task.early_outcome``)
in its stored form, ``to_record`` / ``from_record``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

OutcomeStatus = Literal["running", "succeeded", "failed", "cancelled"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the provider says about a job. ``retryable`` matters only for ``failed``."""

    status: OutcomeStatus
    job_id: str
    outputs: tuple[str, ...] = ()
    reason: str | None = None
    retryable: bool = True

    @property
    def final(self) -> bool:
        return self.status != "running"

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    def to_record(self) -> dict[str, Any]:
        """The stored form (``Task.early_outcome``)."""
        return {
            "status": self.status,
            "job_id": self.job_id,
            "outputs": list(self.outputs),
            "reason": self.reason,
            "retryable": self.retryable,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Outcome:
        return cls(
            status=record["status"],
            job_id=str(record["job_id"]),
            outputs=tuple(record.get("outputs") or ()),
            reason=record.get("reason"),
            retryable=record.get("retryable", True),
        )
