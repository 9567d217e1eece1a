"""States and events as data, the transition table declared once, and the one shared machine."""

from __future__ import annotations

from enum import StrEnum
from functools import cache
from typing import Final

from transitions import Machine, MachineError


class State(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    AI_PROCESSING = "ai_processing"
    WATERMARKING = "watermarking"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


_STATES: Final = {s.value: s for s in State}


def state_of(value: str) -> State:
    """``State(value)`` without the enum machinery (1.2 µs a call on a small machine, against a
    dict lookup): every stored record read parses one state per history entry."""
    try:
        return _STATES[value]
    except KeyError:
        raise ValueError(f"{value!r} is not a valid State") from None


class Event(StrEnum):
    START = "start"
    SUBMITTED = "submitted"
    AI_SUCCEEDED = "ai_succeeded"
    FINISHED = "finished"
    RETRY = "retry"
    EXTEND = "extend"
    FAIL = "fail"
    CANCEL = "cancel"


TERMINAL: Final = frozenset({State.COMPLETED, State.FAILED, State.CANCELLED})
NON_TERMINAL: Final = frozenset(set(State) - TERMINAL)
REFUNDED_STATES: Final = frozenset({State.FAILED, State.CANCELLED})
LEASED_STATES: Final = frozenset({State.PROCESSING, State.WATERMARKING})

# (event, sources, destination). The lifecycle of DESIGN.md:
# - retry goes back to processing from processing (a failed submit) or ai_processing (timeout,
#   provider failure), while attempts are left;
# - extend keeps ai_processing and moves its deadline (the provider says it is still running);
# - fail from any non-terminal state; cancel while no output is being produced.
TRANSITIONS: Final[tuple[tuple[Event, frozenset[State], State], ...]] = (
    (Event.START, frozenset({State.PENDING}), State.PROCESSING),
    (Event.SUBMITTED, frozenset({State.PROCESSING}), State.AI_PROCESSING),
    (Event.AI_SUCCEEDED, frozenset({State.AI_PROCESSING}), State.WATERMARKING),
    (Event.FINISHED, frozenset({State.WATERMARKING}), State.COMPLETED),
    (Event.RETRY, frozenset({State.PROCESSING, State.AI_PROCESSING}), State.PROCESSING),
    (Event.EXTEND, frozenset({State.AI_PROCESSING}), State.AI_PROCESSING),
    (Event.FAIL, NON_TERMINAL, State.FAILED),
    (
        Event.CANCEL,
        frozenset({State.PENDING, State.PROCESSING, State.AI_PROCESSING}),
        State.CANCELLED,
    ),
)


class _Probe:
    """The model the shared machine is run on for one decision; holds nothing but the state."""

    state: State


# One module-level machine, built without a model; models are added for one decision and removed
# again, with no await in between. Its callbacks do no I/O (it has none).
MACHINE: Final = Machine(
    model=None,
    states=State,
    transitions=[
        {"trigger": event.value, "source": list(sources), "dest": dest}
        for event, sources, dest in TRANSITIONS
    ],
    initial=State.PENDING,
    auto_transitions=False,
    ignore_invalid_triggers=False,
)


@cache
def next_state(state: State, event: Event) -> State | None:
    """The state ``event`` leads to from ``state``, or None if the machine forbids it.

    Asks the shared machine; the answer for a (state, event) pair never changes, so it is
    remembered (adding and removing a model costs ~40 µs, far more than the rest of a decision)."""
    probe = _Probe()
    MACHINE.add_model(probe, initial=state)
    try:
        probe.trigger(event.value)  # type: ignore[attr-defined]
    except MachineError:
        return None
    finally:
        MACHINE.remove_model(probe)
    return probe.state


def is_valid_path(steps: list[tuple[State, State, Event]]) -> bool:
    """True if ``steps`` (from, to, event) is a path through the machine starting at pending."""
    current = State.PENDING
    for source, dest, event in steps:
        if source != current or next_state(source, event) != dest:
            return False
        current = dest
    return True
