"""Who starts the next step: the change feed, and the reaper as the backstop. Nobody else.

    feed ──▶ Watcher("dispatcher") ──▶ Dispatcher.handle ──▶ StepRunner.start / start_at
    deadline index ──▶ Reaper ──▶ Backstop.dispatch ──▶ StepRunner.offer
                             └──▶ Backstop.reconcile ──▶ OutcomeApplier.reconcile (poll, judge)

A process started without the dispatcher and reaper roles (``--roles api``) builds no runner, so
it never runs a step: the task it creates, or a webhook it applies, is picked up by another
process's dispatcher, or by a reaper once the task's deadline passes.
"""

from __future__ import annotations

from service.steps.outcomes import OutcomeApplier
from service.steps.runner import StepRunner
from statemachine.states import Event, State
from statemachine.store import FeedEvent, TaskStore
from statemachine.task import Task


class Dispatcher:
    """pending → the processing step; a retry → the processing step after its backoff;
    watermarking → the watermarking step. Each step claims its task by compare-and-set, so several
    dispatchers (processes) may see the same event and exactly one does the work."""

    def __init__(self, store: TaskStore, runner: StepRunner) -> None:
        self.store = store
        self.runner = runner

    async def handle(self, event: FeedEvent) -> None:
        """A Watcher handler."""
        if event.dest in (State.PENDING, State.WATERMARKING):
            self.runner.start(event.task_id)
        elif event.dest is State.PROCESSING and event.event == Event.RETRY.value:
            task = await self.store.get_task(event.task_id)
            if task is not None and task.state is State.PROCESSING and task.deadline is not None:
                self.runner.start_at(task.deadline, task.id)


class Backstop:
    """The reaper's actions (statemachine.reaper.ReaperActions): an overdue task's step is offered
    to the runner; an overdue job is reconciled by polling."""

    def __init__(self, runner: StepRunner, outcomes: OutcomeApplier) -> None:
        self.runner = runner
        self.outcomes = outcomes

    async def dispatch(self, task: Task) -> bool:
        return self.runner.offer(task)

    async def reconcile(self, task: Task, now: float) -> None:
        await self.outcomes.reconcile(task, now)
