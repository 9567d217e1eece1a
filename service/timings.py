"""The timings that apply to a task: the settings' defaults refined per provider and per model
(``HOOKLINE_PROVIDER_TIMINGS``), computed once per (provider, model). A provider whose outcomes
must be asked for (``arrival`` trigger or poll) gets the poll schedule."""

from __future__ import annotations

from collections.abc import Mapping

from callbacks.provider import Arrival
from service.settings import Settings
from statemachine.decide import Deadlines
from statemachine.task import Task

POLLED: frozenset[Arrival] = frozenset({"trigger", "poll"})


class Timings:
    """``base`` for everything; ``for_task`` for decisions about one task's provider attempt."""

    def __init__(self, settings: Settings, arrivals: Mapping[str, Arrival] | None = None) -> None:
        self._settings = settings
        self._polled = {name for name, way in (arrivals or {}).items() if way in POLLED}
        self.base: Deadlines = settings.deadlines()
        self._by_model: dict[tuple[str, str], Deadlines] = {}

    def for_task(self, task: Task) -> Deadlines:
        key = (task.provider, task.model)
        found = self._by_model.get(key)
        if found is None:
            polled = task.provider in self._polled
            found = self._by_model[key] = self._settings.deadlines_for(
                *key, base=self.base, polled=polled
            )
        return found
