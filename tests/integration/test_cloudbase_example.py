"""The WeChat CloudBase example (examples/wechat-cloudbase) against a live hookline.

The example's own tests run under Node's test runner: its unit tests (photography and
hooklineWebhook on an in-memory CloudBase database), photography against this hookline, and the
seed's chain end to end (a registered webhook receiver completes the ``works`` record). This test
starts hookline on loopback — loopback webhook receivers and photo URLs allowed — makes a user and
a key for them, installs the example's locked npm dependencies when they are missing or stale,
and passes only if every Node test passed and none was skipped. It skips when Node 20+ or npm is
not installed.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.hookline import running_hookline

pytestmark = pytest.mark.asyncio

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "wechat-cloudbase"
LOCK_STAMP = EXAMPLE / "node_modules" / ".hookline-lock.sha256"
NPM_CI_TIMEOUT_S = 600
NODE_TESTS_TIMEOUT_S = 300


def node_missing() -> str | None:
    """Why the example's tests cannot run here, or None when Node 20+ and npm are installed."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        return "the CloudBase example's tests need node (20 or later) and npm on PATH"
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout
    found = re.match(r"v(\d+)\.", version)
    if found is None or int(found[1]) < 20:
        return f"the CloudBase example's tests need Node 20 or later, not {version.strip()!r}"
    return None


def install_node_modules() -> None:
    """``npm ci`` when node_modules is missing or was installed from another package-lock.json
    (a stamp inside node_modules records the lockfile's hash)."""
    lock = hashlib.sha256((EXAMPLE / "package-lock.json").read_bytes()).hexdigest()
    if LOCK_STAMP.is_file() and LOCK_STAMP.read_text().strip() == lock:
        return
    command = ["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund"]
    done = subprocess.run(
        command, cwd=EXAMPLE, capture_output=True, text=True, timeout=NPM_CI_TIMEOUT_S
    )
    if done.returncode != 0:
        pytest.fail(f"npm ci failed in {EXAMPLE} ({done.returncode}):\n{done.stdout}{done.stderr}")
    LOCK_STAMP.write_text(lock + "\n")


async def run_node_tests(env: dict[str, str]) -> tuple[int, str]:
    """``node --test`` over the example's test files, one at a time, on this loop's side (the
    server runs on it); returns the exit code and the combined output."""
    files = sorted(f"test/{p.name}" for p in (EXAMPLE / "test").glob("*.test.js"))
    proc = await asyncio.create_subprocess_exec(
        "node",
        "--test",
        "--test-concurrency=1",
        "--test-reporter=tap",
        *files,
        cwd=EXAMPLE,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(NODE_TESTS_TIMEOUT_S):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        return -1, out.decode(errors="replace") + f"\n(killed after {NODE_TESTS_TIMEOUT_S} s)"
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


def tap_count(output: str, name: str) -> int:
    found = re.search(rf"^# {name} (\d+)$", output, re.MULTILINE)
    assert found is not None, f"no '# {name}' line in Node's output:\n{output}"
    return int(found[1])


async def test_cloudbase_functions_pass_their_node_tests_against_a_live_hookline(
    tmp_path: Path,
) -> None:
    """photography and hooklineWebhook, with the real wx-server-sdk and standardwebhooks
    packages, pass every unit, live and end-to-end Node test against a real hookline."""
    reason = node_missing()
    if reason is not None:
        pytest.skip(reason)
    install_node_modules()
    async with running_hookline(
        tmp_path, webhook_hosts="127.0.0.1", input_hosts="127.0.0.1", sim_latency="fixed:0.05"
    ) as hl:
        key = await hl.create_user("wechat", credits=1000)
        env = {k: v for k, v in os.environ.items() if not k.startswith("HOOKLINE_")}
        env.update(HOOKLINE_URL=hl.base_url, HOOKLINE_API_KEY=key)
        code, output = await run_node_tests(env)
    assert code == 0, f"node --test failed ({code}):\n{output}"
    assert tap_count(output, "pass") > 0, output
    # Node counts a skipped suite under no total: its TAP line says "# SKIP"
    assert tap_count(output, "skipped") == 0 and "# SKIP" not in output, output
