"""The client's end of ``bench_e2e --webhooks``: a loopback receiver of outbound webhooks.

``python -m bench.e2e_receiver --port P`` (its own process, the default) or ``Receiver.start`` in
the driver's process (``--receiver driver``). The driver registers ``http://127.0.0.1:P/hooks/NAME``
as a user's endpoint (``POST /v1/webhooks``) and hands the receiver that endpoint's secret.

Every other path is a delivery: it is answered ``204`` as soon as its body has been read whole,
and only then recorded, as a receiver that acknowledges first and works afterwards would: the
receive time (``time.time()`` when the last byte arrived), the Standard Webhooks headers, the
body's ``type``, ``created_at`` and the task's id and state, and whether the signature verifies
with the ``standardwebhooks`` library under the path's secret (``ok`` or the library's reason).

Its control routes (the driver's, not hookline's):

- ``PUT /_bench/secrets`` ``{"/hooks/NAME": "whsec_…"}`` → 204;
- ``GET /_bench/counts`` → ``{"requests": n, "paths": {path: {"received": n,
  "terminal_tasks": n}}}`` (``terminal_tasks``: distinct tasks a terminal event came for);
- ``GET /_bench/received`` → ``{"items": [record, …]}`` in arrival order;
- ``GET /_bench/healthz`` → 200.

HTTP/1.1 with keep-alive, bodies by ``Content-Length`` (hookline's client sends nothing else); a
request it cannot parse is answered 400 and its connection closed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, cast

import httpx
import orjson
from standardwebhooks import Webhook, WebhookVerificationError

TERMINAL_TYPES: Final = frozenset({"task.completed", "task.failed", "task.cancelled"})
CONTROL: Final = "/_bench/"
NO_CONTENT: Final = b"HTTP/1.1 204 No Content\r\n\r\n"
BAD_REQUEST: Final = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
MAX_HEAD_BYTES: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class Received:
    """One delivery as it arrived (``at``: epoch seconds, the body read whole)."""

    at: float
    path: str
    webhook_id: str
    webhook_timestamp: str
    signatures: int  # entries in webhook-signature
    type: str
    created_at: str
    task_id: str
    state: str
    verified: str  # "ok", "no secret", or why the library refused it
    body_bytes: int


@dataclass(slots=True)
class Receiver:
    """What arrived, the secrets to check it with, and the server (when started here)."""

    records: list[Received] = field(default_factory=list)
    signers: dict[str, Webhook] = field(default_factory=dict)
    terminal: dict[str, set[str]] = field(default_factory=lambda: collections.defaultdict(set))
    received: collections.Counter[str] = field(default_factory=collections.Counter)
    requests: int = 0
    server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Connection(self), host, port)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 2)
            self.server = None

    # -- the same three calls as RemoteReceiver ---------------------------------------------------

    async def set_secrets(self, secrets: dict[str, str]) -> None:
        self.signers.update({path: Webhook(secret) for path, secret in secrets.items()})

    async def counts(self) -> dict[str, Any]:
        return self.counts_now()

    async def items(self) -> list[dict[str, Any]]:
        return [_as_dict(r) for r in self.records]

    def counts_now(self) -> dict[str, Any]:
        paths = {
            path: {"received": n, "terminal_tasks": len(self.terminal[path])}
            for path, n in self.received.items()
        }
        return {"requests": self.requests, "paths": paths}

    # -- requests ---------------------------------------------------------------------------------

    def handle(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
        at: float,
        write: Callable[[bytes], None],
    ) -> None:
        """Answer one request with ``write``; a delivery is recorded after its answer left."""
        self.requests += 1
        if path.startswith(CONTROL):
            write(self.control(method, path, body))
            return
        write(NO_CONTENT)
        self.record(path, headers, body, at)

    def record(self, path: str, headers: dict[str, str], body: bytes, at: float) -> None:
        signer = self.signers.get(path)
        if signer is None:
            verified = "no secret"
        else:
            try:
                signer.verify(body, headers, json_parse=False)
                verified = "ok"
            except (WebhookVerificationError, ValueError) as exc:
                verified = str(exc) or type(exc).__name__
        try:
            doc = orjson.loads(body)
            data = doc.get("data") or {}
            kind, created_at = str(doc.get("type")), str(doc.get("created_at"))
            task_id, state = str(data.get("id")), str(data.get("state"))
        except (orjson.JSONDecodeError, AttributeError):
            kind = created_at = task_id = state = "unparsable"
        self.received[path] += 1
        if kind in TERMINAL_TYPES:
            self.terminal[path].add(task_id)
        self.records.append(
            Received(
                at=at,
                path=path,
                webhook_id=headers.get("webhook-id", ""),
                webhook_timestamp=headers.get("webhook-timestamp", ""),
                signatures=len(headers.get("webhook-signature", "").split()),
                type=kind,
                created_at=created_at,
                task_id=task_id,
                state=state,
                verified=verified,
                body_bytes=len(body),
            )
        )

    def control(self, method: str, path: str, body: bytes) -> bytes:
        route = (method, path.split("?", 1)[0])
        if route == ("PUT", "/_bench/secrets"):
            secrets = orjson.loads(body)
            self.signers.update({p: Webhook(s) for p, s in secrets.items()})
            return NO_CONTENT
        if route == ("GET", "/_bench/counts"):
            return _json(self.counts_now())
        if route == ("GET", "/_bench/received"):
            return _json({"items": [_as_dict(r) for r in self.records]})
        if route == ("GET", "/_bench/healthz"):
            return _json({"ok": True})
        return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


def _as_dict(record: Received) -> dict[str, Any]:
    loaded: dict[str, Any] = orjson.loads(orjson.dumps(record))
    return loaded


def _json(data: Any) -> bytes:
    body = orjson.dumps(data)
    head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


class _Connection(asyncio.Protocol):
    """One client connection: requests parsed from the bytes as they come."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None and self._one_request():
            pass

    def _one_request(self) -> bool:
        """Handle the first complete request in the buffer; False when none is complete."""
        assert self.transport is not None
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD_BYTES:
                self._refuse()
            return False
        try:
            lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            method, target, _version = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if "transfer-encoding" in headers:
                raise ValueError("only Content-Length bodies")
            length = int(headers.get("content-length", "0"))
        except ValueError:
            self._refuse()
            return False
        start = end + 4
        if len(self.buffer) < start + length:
            return False
        body = bytes(self.buffer[start : start + length])
        del self.buffer[: start + length]
        self.receiver.handle(method, target, headers, body, time.time(), self.transport.write)
        return True

    def _refuse(self) -> None:
        assert self.transport is not None
        self.transport.write(BAD_REQUEST)
        self.transport.close()
        self.transport = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class RemoteReceiver:
    """The three calls of ``Receiver`` over its control routes (the receiver's own process)."""

    def __init__(self, base_url: str) -> None:
        self.http = httpx.AsyncClient(base_url=base_url, timeout=30, trust_env=False)

    async def set_secrets(self, secrets: dict[str, str]) -> None:
        r = await self.http.put("/_bench/secrets", content=orjson.dumps(secrets))
        r.raise_for_status()

    async def counts(self) -> dict[str, Any]:
        r = await self.http.get("/_bench/counts")
        r.raise_for_status()
        counts: dict[str, Any] = r.json()
        return counts

    async def items(self) -> list[dict[str, Any]]:
        r = await self.http.get("/_bench/received")
        r.raise_for_status()
        items: list[dict[str, Any]] = orjson.loads(r.content)["items"]
        return items

    async def close(self) -> None:
        await self.http.aclose()


async def serve(host: str, port: int) -> None:
    """Receive until SIGTERM or SIGINT."""
    receiver = Receiver()
    await receiver.start(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await receiver.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.e2e_receiver", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    try:
        import uvloop

        uvloop.run(serve(args.host, args.port))
    except ImportError:
        asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
