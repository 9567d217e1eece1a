"""The dispatcher: a change-feed watcher that starts the step each new state needs."""

from __future__ import annotations

import structlog

from service.steps.worker import Worker
from statemachine.states import State
from statemachine.store import FeedEvent, TaskStore

log = structlog.get_logger()


class Dispatcher:
    """pending → the processing step; a retry → the processing step after its backoff;
    watermarking → the watermarking step. Each step claims its task by compare-and-set, so several
    dispatchers (processes) may see the same event and exactly one does the work."""

    def __init__(self, store: TaskStore, worker: Worker) -> None:
        self.store = store
        self.worker = worker

    async def handle(self, event: FeedEvent) -> None:
        if event.dest is State.PENDING:
            self.worker.spawn(self.worker.process(event.task_id))
        elif event.dest is State.PROCESSING and event.event == "retry":
            task = await self.store.get_task(event.task_id)
            if task is not None and task.state is State.PROCESSING and task.deadline is not None:
                self.worker.spawn_at(task.deadline, task.id)
        elif event.dest is State.WATERMARKING:
            self.worker.spawn(self.worker.watermark(event.task_id))
