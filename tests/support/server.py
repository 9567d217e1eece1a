"""Run an ASGI app on a real uvicorn server on a free loopback port, for the length of a test.

    async with serve_app(app) as base_url:       # in the test's event loop (async tests)
        ...
    with serve_app_in_thread(app) as base_url:   # in a thread of its own (sync tests, CLIs)
        ...

The listening socket is bound (port 0) and listening before uvicorn starts, so there is no race
for the port and a client may connect at once. Start-up is awaited through uvicorn's own
``startup`` (lifespan included); a failing lifespan raises ``ServerStartupError`` instead of
exiting the process. Leaving the block shuts the server down gracefully (lifespan shutdown runs),
cancelling requests still running after ``graceful_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import Any, Literal

import uvicorn

__all__ = ["ServerStartupError", "listening_socket", "serve_app", "serve_app_in_thread"]

LifespanMode = Literal["auto", "on", "off"]


class ServerStartupError(RuntimeError):
    """The app did not start (its lifespan failed)."""


class _Server(uvicorn.Server):
    """uvicorn, told to report readiness and never to touch signals or exit the process."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_ready = on_ready
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exit = asyncio.Event()

    def request_exit(self) -> None:
        """Stop serving; callable from any thread."""
        self.should_exit = True
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop stopped in the meantime
                self._loop.call_soon_threadsafe(self._exit.set)

    async def main_loop(self) -> None:
        # uvicorn polls should_exit every 0.1 s; waking on an event makes teardown prompt
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864_000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exit.wait(), 0.1)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # the test runner owns SIGINT/SIGTERM

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await super().startup(sockets=sockets)
        except SystemExit:  # uvicorn exits when the lifespan fails; make it a normal failure
            self.should_exit = True
        finally:
            self._on_ready()


def _listening_socket(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _config(app: Any, graceful_timeout_s: float, lifespan: LifespanMode) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        lifespan=lifespan,  # "on": a lifespan failure is an error, not "unsupported"
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(max(1, graceful_timeout_s)),
    )


def listening_socket(host: str = "127.0.0.1") -> tuple[socket.socket, str]:
    """A bound, listening socket on a free port and its base URL, for ``serve_app(sock=…)``."""
    sock = _listening_socket(host)
    return sock, _base_url(sock)


def _base_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{host}:{port}"


@contextlib.asynccontextmanager
async def serve_app(
    app: Any,
    *,
    host: str = "127.0.0.1",
    graceful_timeout_s: float = 5.0,
    lifespan: LifespanMode = "on",
    sock: socket.socket | None = None,
) -> AsyncIterator[str]:
    """Serve ``app`` in the running event loop; yield its base URL (``http://127.0.0.1:PORT``).

    Pass ``sock`` (from ``listening_socket``) when the app must know its URL before it starts."""
    ready = asyncio.Event()
    server = _Server(_config(app, graceful_timeout_s, lifespan), ready.set)
    sock = sock or _listening_socket(host)
    task = asyncio.create_task(server.serve(sockets=[sock]), name=f"uvicorn:{_base_url(sock)}")
    try:
        waiter = asyncio.create_task(ready.wait())
        await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not server.started:
            await asyncio.gather(task, return_exceptions=True)
            raise ServerStartupError(f"app {app!r} failed to start")
        yield _base_url(sock)
    finally:
        server.request_exit()
        await asyncio.wait({task})
        sock.close()
    if not task.cancelled() and (error := task.exception()) is not None:
        raise error


@contextlib.contextmanager
def serve_app_in_thread(
    app: Any,
    *,
    host: str = "127.0.0.1",
    graceful_timeout_s: float = 5.0,
    lifespan: LifespanMode = "on",
    startup_timeout_s: float = 30.0,
    sock: socket.socket | None = None,
) -> Iterator[str]:
    """Serve ``app`` on its own event loop in a daemon thread; yield its base URL."""
    ready = threading.Event()
    server = _Server(_config(app, graceful_timeout_s, lifespan), ready.set)
    sock = sock or _listening_socket(host)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(server.serve(sockets=[sock]))
        except BaseException as exc:  # reported to the test thread below
            errors.append(exc)
            ready.set()

    thread = threading.Thread(target=run, name=f"uvicorn:{_base_url(sock)}", daemon=True)
    thread.start()
    try:
        if not ready.wait(startup_timeout_s) or not server.started:
            raise ServerStartupError(f"app {app!r} failed to start: {errors!r}")
        yield _base_url(sock)
    finally:
        server.request_exit()
        thread.join(graceful_timeout_s + 10)
        sock.close()
