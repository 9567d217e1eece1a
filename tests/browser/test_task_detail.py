"""The dashboard's task detail view in headless Chromium, over the DevTools protocol: opened at
``#/tasks/<id>`` before the key is given, and by clicking the task in the list, it shows the task
and its timeline — the transitions up to ``completed``, the submit with its job id, the verified
webhook, a forged delivery as not verified with its reason — with a provider's headers shown as
text (a hostile header runs nothing), no CSP rule broken and no script error. A screenshot goes to
tests/artifacts/task_detail.png."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from callbacks.standard_webhooks import generate_secret, sign_headers
from statemachine import clock
from tests.browser.test_dashboard import ARTIFACTS, CHROMIUM, Cdp, chromium, submit_form
from tests.support.hookline import Hookline, running_hookline

pytestmark = [pytest.mark.asyncio, pytest.mark.browser]

HOSTILE = '<img src=x onerror="window.pwned=1">'


async def entries_text(cdp: Cdp, kind: str) -> list[str]:
    texts: list[str] = await cdp.js(
        f"[...document.querySelectorAll('#timeline li[data-kind={kind}]')]"
        ".map(li => li.textContent)"
    )
    return texts


async def completed_task_with_a_forged_delivery(hl: Hookline, key: str) -> tuple[str, str]:
    """A task run to completion on the simulator, then a forged delivery to its callback URL;
    (task id, job id), once the timeline has both webhook notes."""
    created = await hl.create_task(key)
    await hl.wait_terminal(key, created["id"])
    task = await hl.store.get_task(created["id"])
    assert task is not None and task.provider_job_id is not None
    body = json.dumps({"id": task.provider_job_id, "status": "failed"}).encode()
    forged = sign_headers(generate_secret(), "msg_forged", int(clock.now()), body)
    r = await hl.client.post(
        f"/v1/callbacks/sim/{task.id}",
        params={"token": task.callback_token},
        content=body,
        headers={**forged, "X-Hostile": HOSTILE},
    )
    assert r.status_code == 401
    await hl.runtime.drain()
    timeline = await hl.client.get(f"/v1/tasks/{task.id}/timeline", headers=hl.auth(key))
    kinds = [e["kind"] for e in timeline.json()["entries"]]
    assert kinds.count("webhook") == 2, kinds
    return task.id, task.provider_job_id


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed: apt-get install chromium")
async def test_the_task_detail_view_shows_the_task_and_its_timeline(tmp_path: Path) -> None:
    async with running_hookline(tmp_path) as hl, chromium(tmp_path) as cdp:
        key = await hl.create_user("alice", credits=100)
        task_id, job_id = await completed_task_with_a_forged_delivery(hl, key)

        await cdp.call("Page.enable")
        await cdp.call("Log.enable")
        await cdp.call("Runtime.enable")
        # Opened at the task's address before the key is given: it shows once connected.
        await cdp.call("Page.navigate", url=f"{hl.base_url}/#/tasks/{task_id}")
        await cdp.until("document.readyState === 'complete' && !!document.getElementById('key')")
        await cdp.js(f"document.getElementById('key').value = {key!r}")
        await submit_form(cdp, "key-form")
        await cdp.until("document.querySelectorAll('#timeline li').length > 0")
        assert await cdp.js("document.getElementById('task-detail').hidden") is False
        assert await cdp.js("document.getElementById('detail-id').textContent") == task_id
        facts = await cdp.js("document.getElementById('detail-facts').textContent")
        assert "completed" in facts and "sim" in facts

        transitions = await entries_text(cdp, "transition")
        assert "created" in transitions[0] and "pending" in transitions[0]
        assert "watermarking → completed" in transitions[-1] and "(finished)" in transitions[-1]
        (submit,) = await entries_text(cdp, "submit")
        assert f"job {job_id}" in submit and "HTTP 20" in submit and "attempt 1" in submit
        genuine, forged = await entries_text(cdp, "webhook")
        assert "verified" in genuine and "not verified" not in genuine
        assert "said succeeded" in genuine
        assert "not verified: bad_signature" in forged
        verified = await cdp.js(
            "[...document.querySelectorAll('#timeline li[data-kind=webhook]')]"
            ".map(li => li.dataset.verified)"
        )
        assert verified == ["true", "false"]
        # The provider's headers are text: the hostile one is shown, and ran nothing.
        await cdp.js("document.querySelectorAll('#timeline details').forEach(d => d.open = true)")
        headers = await cdp.js(
            "document.querySelectorAll('#timeline li[data-kind=webhook]')[1]"
            ".querySelector('table').textContent"
        )
        assert HOSTILE in headers and "[redacted]" in headers
        assert await cdp.js(
            "window.pwned === undefined && !document.querySelector('#timeline img')"
        )

        shot = await cdp.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "task_detail.png").write_bytes(base64.b64decode(shot["data"]))

        # Back to the list, then the task is opened by clicking it.
        await cdp.js("document.getElementById('detail-back').click()")
        await cdp.until("document.getElementById('task-detail').hidden")
        await cdp.until("document.querySelectorAll('#tasks tbody tr').length === 1")
        await cdp.js("document.querySelector('#tasks tbody tr').click()")
        await cdp.until("!document.getElementById('task-detail').hidden")
        assert await cdp.js("location.hash") == f"#/tasks/{task_id}"
        await cdp.until("document.querySelectorAll('#timeline li[data-kind=submit]').length === 1")

        # Another user's task (or none) is said to be missing, not shown.
        await cdp.js("location.hash = '#/tasks/tsk_000000000000000000000000'")
        error = await cdp.until(
            "(e => !e.hidden && e.textContent)(document.getElementById('detail-error'))"
        )
        assert "no task" in error
        assert await cdp.js("document.querySelectorAll('#timeline li').length") == 0

        messages = [
            e["params"]["entry"]["text"] for e in cdp.events if e["method"] == "Log.entryAdded"
        ]
        assert not [m for m in messages if "Content Security Policy" in m], messages
        exceptions = [e for e in cdp.events if e["method"] == "Runtime.exceptionThrown"]
        assert not exceptions, exceptions
