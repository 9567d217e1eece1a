"""A small synchronous client of the hookline API, and ``hookline submit``.

    with HooklineClient("http://127.0.0.1:8000", key) as client:
        upload = client.upload(Path("photo.jpg"))
        task = client.create_task(upload["key"], "a lighthouse at dusk", style="anime")
        for event in client.events(task["id"]):      # Server-Sent Events, resumed if dropped
            print(event.state)

Errors from the API become ``ClientError`` with the server's code and message.
"""

from __future__ import annotations

import json
import mimetypes
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TextIO

import httpx

DEFAULT_URL: Final = "http://127.0.0.1:8000"
TERMINAL: Final = frozenset({"completed", "failed", "cancelled"})
STEPS: Final = ("pending", "processing", "ai_processing", "watermarking", "completed")
RECONNECTS: Final = 10
BAR_WIDTH: Final = 24


class ClientError(Exception):
    """The API refused a request (or could not be reached): a code and a message to show."""

    def __init__(self, message: str, *, code: str = "error", status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status


@dataclass(frozen=True, slots=True)
class StateEvent:
    """One ``event: state`` frame of a task's stream."""

    id: str | None
    task_id: str
    state: str
    event: str
    at: str


class HooklineClient:
    """The API over one ``httpx.Client`` with the key in the Authorization header."""

    def __init__(
        self,
        base_url: str,
        key: str,
        *,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {key}"},
            timeout=httpx.Timeout(timeout_s),
            transport=transport,
        )

    def __enter__(self) -> HooklineClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def me(self) -> dict[str, Any]:
        return self._json("GET", "/v1/me")

    def upload(self, path: Path) -> dict[str, Any]:
        """``POST /v1/uploads`` with the file's bytes; the server checks it really is an image."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            message = f"cannot read {path}: {exc.strerror}"
            raise ClientError(message, code="unreadable_file") from exc
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        headers = {"Content-Type": content_type}
        return self._json("POST", "/v1/uploads", content=data, headers=headers)

    def create_task(
        self, upload_key: str, prompt: str, *, style: str | None = None, num_outputs: int = 1
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"inputs": [{"upload": upload_key}], "prompt": prompt}
        if style:
            body["style"] = style
        if num_outputs != 1:
            body["num_outputs"] = num_outputs
        return self._json("POST", "/v1/tasks", json=body)

    def get_task(self, task_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/tasks/{task_id}")

    def events(self, task_id: str) -> Iterator[StateEvent]:
        """The task's state events until a terminal one; a dropped connection is resumed with
        ``Last-Event-ID`` (the server then sends exactly what was missed)."""
        last_id: str | None = None
        failures = 0
        while True:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with self._http.stream(
                    "GET",
                    f"/v1/tasks/{task_id}/events",
                    headers=headers,
                    timeout=httpx.Timeout(30.0, read=90.0),  # pings come every 15 s
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise _error(response)
                    for frame in parse_frames(response.iter_lines()):
                        failures = 0
                        last_id = frame.id or last_id
                        yield frame
                        if frame.state in TERMINAL:
                            return
            except httpx.TransportError as exc:
                failures += 1
                if failures > RECONNECTS:
                    raise ClientError(f"live stream lost: {exc}", code="stream_lost") from exc
                time.sleep(min(0.2 * 2**failures, 5.0))
                continue
            # The server ended the stream before a terminal state (it is shutting down): resume.
            failures += 1
            if failures > RECONNECTS:
                raise ClientError("live stream keeps ending early", code="stream_lost")

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ClientError(f"cannot reach hookline: {exc}", code="unreachable") from exc
        if response.status_code >= 400:
            raise _error(response)
        body: dict[str, Any] = response.json()
        return body


def _error(response: httpx.Response) -> ClientError:
    try:
        error = response.json()["error"]
        return ClientError(error["message"], code=error["code"], status=response.status_code)
    except (ValueError, KeyError, TypeError):
        return ClientError(f"HTTP {response.status_code}", status=response.status_code)


def parse_frames(lines: Iterator[str]) -> Iterator[StateEvent]:
    """``event: state`` frames from the lines of an event stream (comments and others skipped)."""
    fields: dict[str, str] = {}
    data: list[str] = []
    for line in lines:
        if line == "":
            if fields.get("event") == "state" and data:
                payload = json.loads("\n".join(data))
                yield StateEvent(
                    fields.get("id"),
                    payload["task_id"],
                    payload["state"],
                    payload["event"],
                    payload["at"],
                )
            fields, data = {}, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        else:
            fields[name] = value


class Progress:
    """A one-line progress bar through the states on a terminal, one line per state otherwise."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._tty = out.isatty()
        self._started = time.monotonic()
        self._attempt = 1

    def update(self, event: StateEvent) -> None:
        if event.event == "retry":
            self._attempt += 1
        done = STEPS.index(event.state) + 1 if event.state in STEPS else len(STEPS)
        filled = BAR_WIDTH * done // len(STEPS)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        elapsed = time.monotonic() - self._started
        line = f"[{bar}] {event.state:<13} attempt {self._attempt}  {elapsed:5.1f}s"
        if self._tty:
            end = "\n" if event.state in TERMINAL else ""
            self._out.write(f"\r{line}{end}")
        else:
            self._out.write(line + "\n")
        self._out.flush()


def submit(
    image: Path,
    prompt: str,
    *,
    style: str | None,
    url: str | None,
    key: str | None,
    wait: bool,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """``hookline submit``: upload, create the task, and with ``wait`` follow it to the end.

    Prints the task id (and with ``wait`` the output URLs) on ``out``; progress and errors on
    ``err``. Returns the exit code: 0 done, 1 refused or failed, 2 usage."""
    out = out or sys.stdout
    err = err or sys.stderr
    key = key or os.environ.get("HOOKLINE_API_KEY")
    if not key:
        err.write("error: no API key: pass --key or set HOOKLINE_API_KEY\n")
        return 2
    base = url or DEFAULT_URL
    try:
        with HooklineClient(base, key) as client:
            upload = client.upload(image)
            task = client.create_task(upload["key"], prompt, style=style)
            out.write(f"task {task['id']} ({task['state']}, cost {task['cost']})\n")
            out.flush()
            if not wait:
                return 0
            progress = Progress(err)
            for event in client.events(task["id"]):
                progress.update(event)
            final = client.get_task(task["id"])
    except ClientError as exc:
        err.write(f"error: {exc.message} ({exc.code})\n")
        return 1
    if final["state"] != "completed":
        error = final.get("error") or {}
        reason = f": {error.get('message')} ({error.get('code')})" if error else ""
        refund = " (credits refunded)" if final.get("refunded") else ""
        err.write(f"error: task {final['id']} {final['state']}{reason}{refund}\n")
        return 1
    for output in final["outputs"]:
        out.write(output["url"] + "\n")
    return 0
