"""The timings that apply to a task: the settings' defaults refined per provider and per model
(``HOOKLINE_PROVIDER_TIMINGS``), computed once per (provider, model)."""

from __future__ import annotations

from service.settings import Settings
from statemachine.decide import Deadlines
from statemachine.task import Task


class Timings:
    """``base`` for everything; ``for_task`` for decisions about one task's provider attempt."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.base: Deadlines = settings.deadlines()
        self._by_model: dict[tuple[str, str], Deadlines] = {}

    def for_task(self, task: Task) -> Deadlines:
        key = (task.provider, task.model)
        found = self._by_model.get(key)
        if found is None:
            found = self._by_model[key] = self._settings.deadlines_for(*key, base=self.base)
        return found
