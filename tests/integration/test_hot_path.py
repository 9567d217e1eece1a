"""Nothing on the real path imports a module once it is warm: a failed or first import searches
``sys.path`` on the file system, on the event loop, for every request that reaches it (httpcore
tries ``import sniffio`` for every lock it makes: without sniffio installed, every outbound
request paid for that search)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from callbacks.transport import OutboundClient
from tests.support.hookline import Hookline, running_hookline

_counting: list[bool] = []
_imports: list[str] = []


def _on_audit(event: str, args: tuple[Any, ...]) -> None:
    if _counting and event == "import":
        _imports.append(str(args[0]))


sys.addaudithook(_on_audit)  # raised for every import that is not already in sys.modules


async def one_task(hl: Hookline, key: str) -> dict[str, Any]:
    task = await hl.create_task(key)
    return await hl.wait_terminal(key, task["id"])


async def test_a_warm_process_imports_nothing_while_a_task_runs(tmp_path: Path) -> None:
    async with running_hookline(tmp_path) as hl:
        key = await hl.create_user("alice")
        assert (await one_task(hl, key))["state"] == "completed"  # warm: every module loaded
        _counting.append(True)
        try:
            done = await one_task(hl, key)
            await hl.client.get(f"/v1/tasks/{done['id']}/events", headers=hl.auth(key))
        finally:
            _counting.clear()
        assert done["state"] == "completed"
        assert _imports == [], f"imported on the hot path: {sorted(set(_imports))}"


async def test_the_outbound_pool_has_a_connection_for_every_step_and_delivery(
    tmp_path: Path,
) -> None:
    """A request waiting for a free connection spends its connect timeout waiting (a submit
    would fail as unreachable): the one client every step and delivery shares has a
    connection for each, and some to spare."""
    async with running_hookline(tmp_path, step_concurrency=300, webhook_concurrency=60) as hl:
        http = hl.runtime.http
        assert isinstance(http, OutboundClient)
        assert http.max_connections is not None and http.max_connections > 300 + 60
