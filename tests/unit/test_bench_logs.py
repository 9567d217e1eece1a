"""bench_e2e's scan of hookline's logs finds warnings and errors in either log format: a run
whose logs it cannot read must not be reported as clean."""

from __future__ import annotations

import json
from pathlib import Path

from bench.bench_e2e import scan_logs


def test_warnings_and_errors_are_found_in_console_and_json_lines(tmp_path: Path) -> None:
    lines = [
        "2026-12-04T18:52:57.893780Z [warning  ] submit_retry                   wait_s=0.5",
        json.dumps({"event": "transition", "level": "info", "task_id": "tsk_1"}),
        json.dumps({"event": "step_failed", "level": "error", "task_id": "tsk_2"}),
        json.dumps({"event": "submit_retry", "level": "warning"}),
        json.dumps({"event": "step_crashed", "level": "error", "exception": "Traceback ..."}),
        "{not json",
        "Traceback (most recent call last):",
    ]
    log = tmp_path / "hookline.log"
    log.write_text("\n".join(lines) + "\n")
    assert scan_logs({"hookline": log}) == {
        "warning: submit_retry": 2,
        "error: step_failed": 1,
        "error: step_crashed": 1,
        "traceback": 2,
    }
