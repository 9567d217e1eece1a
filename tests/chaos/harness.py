"""Real OS processes for the chaos tests: the provider simulator and ``hookline serve`` instances.

    with ChaosCluster(tmp_path, servers=3, sim_env={...}) as cluster:
        cluster.start()                          # simulator, then every server; waits for health
        key = cluster.create_user("alice", 100)  # ``hookline users create`` (key = last line)
        cluster.kill(0)                          # SIGKILL, no cleanup, no graceful shutdown
        await cluster.restart(0)                 # same port, same DB, same blobs

Every child is started in its own session and is killed when the cluster closes, whatever happened
(a failing assertion, a timeout, a KeyboardInterrupt). Every wait is bounded. Logs go to files
under the cluster's root; ``log_tail`` shows them in failure messages. The simulator is locked
as in production use: a random token per cluster (given to every server as its Replicate token),
webhooks and URL inputs only to and from the cluster's servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx

VENV_BIN = Path(sys.executable).parent
HOOKLINE = str(VENV_BIN / "hookline")
HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h

# Short lifecycle timings: a lost webhook is reconciled within seconds, a dead worker's lease
# expires in two, the reaper looks three times a second.
FAST_TIMINGS: dict[str, str] = {
    "HOOKLINE_AI_DEADLINE_S": "3",
    "HOOKLINE_AI_HARD_CAP_S": "10",
    "HOOKLINE_LEASE_S": "2",
    "HOOKLINE_HANDOFF_S": "1",
    "HOOKLINE_REAPER_INTERVAL_S": "0.3",
    "HOOKLINE_RETRY_BACKOFF_S": "0.1",
    "HOOKLINE_RATE_LIMIT_PER_S": "0",
}


class HarnessError(RuntimeError):
    """A child process did not start, answer or stop in time."""


def free_port(host: str = HOST) -> int:
    """A port free right now on ``host`` (the child binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGKILL it when the test runner dies, so even a runner
    killed with SIGKILL leaves no hookline process behind."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def clean_env() -> dict[str, str]:
    """The test runner's environment without any HOOKLINE_* setting (a developer's .env or shell
    must not leak into the children); each child gets exactly the settings it is given."""
    return {k: v for k, v in os.environ.items() if not k.upper().startswith("HOOKLINE_")}


@dataclass
class Child:
    """One child process: started, SIGKILLed, stopped and restarted with the same argv and env."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    cwd: Path
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0
    kills: int = 0
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> None:
        if self.alive:
            raise HarnessError(f"{self.name} is already running (pid {self.pid})")
        self._close_log()
        self._log = self.log_path.open("ab")
        self.starts += 1
        self._log.write(f"\n===== start #{self.starts} of {self.name} =====\n".encode())
        self._log.flush()
        self.popen = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a signal to the test runner's group never reaches it
            preexec_fn=_die_with_parent,
        )

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to finish anything."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.kills += 1
        self.popen.wait(STOP_TIMEOUT_S)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (graceful shutdown), then SIGKILL if it is still running after ``timeout_s``."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.send_signal(signal.SIGKILL)
                self.popen.wait(STOP_TIMEOUT_S)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


async def wait_http_ok(
    child: Child,
    url: str,
    *,
    timeout_s: float = START_TIMEOUT_S,
    headers: Mapping[str, str] | None = None,
) -> httpx.Response:
    """Poll ``url`` until it answers 200; fail early if ``child`` exits, and after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=2.0) as client:
        while True:
            if not child.alive:
                raise HarnessError(f"{child.name} exited while starting:\n{child.log_tail()}")
            with contextlib.suppress(httpx.TransportError):
                response = await client.get(url, headers=headers)
                if response.status_code == 200:
                    return response
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"{child.name} did not answer {url} within {timeout_s} s:\n{child.log_tail()}"
                )
            await asyncio.sleep(0.05)


@dataclass(frozen=True)
class Server:
    """Where one ``hookline serve`` listens, and its process."""

    index: int
    port: int
    child: Child

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"


class ChaosCluster:
    """The simulator and ``servers`` hookline processes sharing one SQLite file and blob dir."""

    def __init__(
        self,
        root: Path,
        *,
        servers: int = 1,
        sim_env: Mapping[str, str] | None = None,
        server_env: Mapping[str, str] | None = None,
    ) -> None:
        self.root = root
        self.db_path = root / "hookline.db"
        self.blob_dir = root / "blobs"
        self.var_dir = root / "var"
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.sim_port = free_port()
        self.sim_token = secrets.token_urlsafe(24)  # the simulator's, given to every server
        self._server_env = dict(server_env or {})
        self.webhook_secret: str | None = None
        self.admin_key: str | None = None
        self._up: set[int] = set()  # servers started and healthy, not killed since
        self.servers: list[Server] = []
        for index in range(servers):
            port = free_port()
            child = Child(
                f"serve-{index}",
                [HOOKLINE, "serve"],
                {},  # filled in by start(), once the simulator's webhook secret is known
                self.logs / f"serve-{index}.log",
                root,
            )
            self.servers.append(Server(index, port, child))
        self.sim_child = Child(
            "simulator",
            [HOOKLINE, "simulator", "--host", HOST, "--port", str(self.sim_port)],
            {**self._sim_env(), **(sim_env or {})},
            self.logs / "simulator.log",
            root,
        )

    # --- context management: children never outlive the cluster ----------------------------------

    def __enter__(self) -> ChaosCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop every child (gracefully, SIGKILL after a bound); safe to call twice."""
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.child.stop()
        with contextlib.suppress(Exception):
            self.sim_child.stop()

    # --- environment ---------------------------------------------------------------------------

    @property
    def sim_base_url(self) -> str:
        return f"http://{HOST}:{self.sim_port}"

    def _sim_env(self) -> dict[str, str]:
        """The simulator's locks: its token, and every server as a webhook host and as the host
        of its inputs (each server's own signed file URLs)."""
        hosts = ",".join(f"{HOST}:{server.port}" for server in self.servers)
        own = {"HOOKLINE_PUBLIC_URL": self.servers[0].base_url} if self.servers else {}
        return {
            **clean_env(),
            **own,
            "HOOKLINE_SIM_API_TOKEN": self.sim_token,
            "HOOKLINE_SIM_WEBHOOK_HOSTS": hosts,
            "HOOKLINE_INPUT_HOSTS": hosts,
        }

    def store_env(self) -> dict[str, str]:
        """What every hookline command (serve, users create) needs to find the same data."""
        return {
            **clean_env(),
            "HOOKLINE_STORE_URL": f"sqlite:///{self.db_path}",
            "HOOKLINE_BLOB_URL": f"file://{self.blob_dir}",
            "HOOKLINE_VAR_DIR": str(self.var_dir),
            # shared by all servers: a file URL signed by one is valid on the others
            "HOOKLINE_SECRET_KEY": "chaos-file-url-signing-key",
            "HOOKLINE_LOG_LEVEL": "info",
        }

    def _serve_env(self, server: Server) -> dict[str, str]:
        assert self.webhook_secret is not None
        return {
            **self.store_env(),
            "HOOKLINE_HOST": HOST,
            "HOOKLINE_PORT": str(server.port),
            # each process gets its own callbacks: the URL is fixed when the job is submitted
            "HOOKLINE_PUBLIC_URL": server.base_url,
            "HOOKLINE_PROVIDER": "replicate",
            "HOOKLINE_REPLICATE_BASE_URL": f"{self.sim_base_url}/v1",
            "HOOKLINE_REPLICATE_API_TOKEN": self.sim_token,
            "HOOKLINE_REPLICATE_WEBHOOK_SECRET": self.webhook_secret,
            "HOOKLINE_OUTPUT_HOSTS": f"{HOST}:{self.sim_port}",
            **FAST_TIMINGS,
            **self._server_env,
        }

    # --- starting, killing, restarting ---------------------------------------------------------

    async def start(self) -> None:
        """The simulator, its webhook secret, then every server; each waited for (bounded)."""
        self.sim_child.start()
        auth = {"Authorization": f"Bearer {self.sim_token}"}
        response = await wait_http_ok(
            self.sim_child, f"{self.sim_base_url}/v1/webhooks/default/secret", headers=auth
        )
        self.webhook_secret = str(response.json()["key"])
        for server in self.servers:
            server.child.env = self._serve_env(server)
        # creates the schema once, before several processes race to do it
        self.admin_key = self._last_line(self.run_cli("users", "create", "chaos-admin", "--admin"))
        await asyncio.gather(*(self.restart(s.index) for s in self.servers))

    async def restart(self, index: int) -> None:
        """Start server ``index`` (same port, DB and blobs) and wait until /healthz answers."""
        server = self.servers[index]
        server.child.start()
        await wait_http_ok(server.child, f"{server.base_url}/healthz")
        self._up.add(index)

    def kill(self, index: int) -> None:
        """SIGKILL server ``index``."""
        self._up.discard(index)
        self.servers[index].child.kill()

    def up(self) -> list[int]:
        """Servers that are running and answered /healthz since their last start."""
        return sorted(i for i in self._up if self.servers[i].child.alive)

    @property
    def kills(self) -> int:
        return sum(s.child.kills for s in self.servers)

    def live_urls(self) -> list[str]:
        return [self.servers[i].base_url for i in self.up()]

    def run_cli(self, *args: str) -> str:
        """``hookline ARGS`` against the cluster's store; its stdout."""
        done = subprocess.run(
            [HOOKLINE, *args],
            env=self.store_env(),
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0:
            raise HarnessError(f"hookline {' '.join(args)} failed: {done.stderr}")
        return done.stdout

    def create_user(self, name: str, credits: int) -> str:
        """A user with ``credits``; the API key (the last line ``users create`` prints)."""
        return self._last_line(self.run_cli("users", "create", name, "--credits", str(credits)))

    @staticmethod
    def _last_line(text: str) -> str:
        return text.strip().splitlines()[-1].strip()

    async def sim_stats(self) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=5.0) as client:
            response = await client.get(f"{self.sim_base_url}/v1/_sim/stats")
            response.raise_for_status()
            stats: dict[str, Any] = response.json()
            return stats

    def logs_tail(self, lines: int = 30) -> str:
        """The end of every server's log, for failure messages."""
        return "\n".join(f"--- {s.child.name} ---\n{s.child.log_tail(lines)}" for s in self.servers)
