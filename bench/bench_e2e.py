"""End to end on the real path (issue 14): ``python -m bench.bench_e2e [--quick] [--n N] …``.

Three kinds of process, each on its own, on one machine:

- **hookline**: the real ``hookline serve`` (``python -m service.cli serve``), one process with
  every role by default; ``--api-procs A --worker-procs W`` runs the documented multi-process
  layout on one SQLite file instead (A × ``--roles api``, each on its own port — one port for
  several processes would need SO_REUSEPORT — and W × ``--roles dispatcher,reaper``). Configured
  only through ``HOOKLINE_*`` variables on a fresh temporary directory: SQLite store, local blobs,
  ``HOOKLINE_PROVIDER=replicate`` pointed at the fake, a generated ``whsec_`` secret, the fake's
  host:port as the output host, an AI deadline far beyond the run (the reaper never polls).
  ``--set KEY=VALUE`` overrides any of them (or sets any other); the settings in force are
  printed with the figures. The users come from ``hookline users create``.
- **the provider fake** (``bench/e2e_provider.py``): Replicate's contract; it holds every
  prediction until the driver completes it and sends no webhook of its own. Like Replicate, it
  downloads an input given by URL (``HOOKLINE_INPUTS_BY_URL=always``) before the prediction
  counts as held, so hookline serving it is part of phase A.
- **the driver** (``bench/e2e_driver.py``): phase A — N × ``POST /v1/tasks``, 32 at once; phase
  B — N signed webhooks, 32 at once; then the checks. Its CPU is reported apart, and so is the
  fake's.

``--webhooks`` measures hookline's outbound webhooks in the same run (issue 16): a fourth process,
the receiver (``bench/e2e_receiver.py``; ``--receiver driver`` runs it inside the driver instead),
answers 204 at once and records every delivery; ``HOOKLINE_WEBHOOK_HOSTS`` lists its
``127.0.0.1:port``. The driver registers it as the bench user's endpoint (and the warm-up user's)
with the default events before the warm-up; phase C waits after phase B until every terminal
task's event has arrived. Figures: outbound deliveries/s (first to last terminal-event delivery),
delivery lag (receive time − the body's ``created_at``, the ``finished`` transition's time)
p50/p99, split at the first try's start; every ``task.completed`` received once per task and
``webhook-id`` and verified with ``standardwebhooks``; hookline's CPU per task counting phase C.

Figures: starts/s acked (and every non-202 answer by status); the time from the last ack until
the fake holds every job and every task is ``ai_processing``; completions/s; callback→completed
p50/p99 (``ai_succeeded`` → ``finished`` in the tasks' histories; also webhook sent → finished);
PSS/RSS growth of hookline's processes per waiting task (read once all wait, against the idle
baseline after start-up and warm-up); hookline's CPU per phase and per task; every output
stored, watermarked (a sample decoded) and served.

``--profile`` samples every hookline process with ``py-spy`` during phases A, B (and C) (from
the ``bench`` extra) and writes speedscope files, folded stacks and a summary of the top
self-time and cumulative frames (and of the outbound delivery path's) into a directory it prints
(``BENCH_PY_SPY_ARGS=--gil``: only the thread holding the GIL is sampled). ``BENCH_SITE_DIR``
puts a directory first on every started process's ``PYTHONPATH``, so that a ``sitecustomize.py``
there runs in them: ``bench/cprofile_site`` profiles hookline's event-loop thread with cProfile
(its docstring says how). Speed is reported, never asserted.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import ctypes
import json
import linecache
import math
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from unittest import mock

import httpx

ROOT: Final = Path(__file__).resolve().parent.parent
USER: Final = "bench"
WARM_USER: Final = "warm"
MODEL: Final = "black-forest-labs/flux-schnell"
CREDITS_PER_TASK: Final = 10  # the plain style costs 5 a task: twice that leaves room
START_TIMEOUT_S: Final = 60.0
STOP_GRACE_S: Final = 10.0
N_FULL, N_QUICK = 2_000, 300
RUN_PHASE_TIMEOUT_S: Final = {False: 60.0, True: 25.0}  # bench/run.py: within its budget

# The settings that shape this workload, shown with the figures (from service/settings.py).
SHOWN_SETTINGS: Final = (
    "rate_limit_per_s",
    "rate_limit_burst",
    "provider_concurrency",
    "user_concurrency",
    "ai_deadline_s",
    "ai_hard_cap_s",
    "lease_s",
    "reaper_interval_s",
    "media_memory_budget_bytes",
    "upload_decodes_per_user",
    "output_format",
    "output_quality",
    "watermark_position",
    "log_level",
    "log_format",
    "webhook_concurrency",
    "webhook_poll_s",
    "webhook_timeout_s",
)


# --- child processes ----------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the bench dies (even by SIGKILL), so nothing
    outlives it; then a session of its own, so its whole group can be signalled."""
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass(slots=True)
class Children:
    """Every process the bench started, each the leader of its own process group."""

    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    def spawn(
        self,
        name: str,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: Path,
        log: Path,
        stdin: int | None = subprocess.DEVNULL,
        stdout: int | None = None,
    ) -> subprocess.Popen[bytes]:
        sink = log.open("ab")
        proc = subprocess.Popen(
            list(cmd),
            cwd=cwd,
            env=dict(env),
            stdin=stdin,
            stdout=sink if stdout is None else stdout,
            stderr=sink,
            preexec_fn=_die_with_parent,
        )
        sink.close()
        self.procs[name] = proc
        self.logs[name] = log
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        for signal_, wait_s in ((sig, STOP_GRACE_S), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal_)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait_s)
        # anything left in its group (it should be empty by now)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_http(url: str, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    """Until ``url`` answers 200; a clear error if the process dies or the time runs out."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=1, trust_env=False).status_code == 200:
                return
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} at start-up: {tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer {url} in {START_TIMEOUT_S:.0f} s")
        time.sleep(0.05)


def tail(log: Path, lines: int = 5) -> str:
    text = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return " | ".join(text[-lines:]) or "no output"


def base_env() -> dict[str, str]:
    """The bench's environment without HOOKLINE_* and proxies: loopback only, no internet."""
    proxies = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("HOOKLINE_") and k.lower() not in proxies
    }
    if os.environ.get("BENCH_CPROFILE_OUT"):  # hookline runs in its work directory
        env["BENCH_CPROFILE_OUT"] = str(Path(os.environ["BENCH_CPROFILE_OUT"]).resolve())
    site = (
        [str(Path(os.environ["BENCH_SITE_DIR"]).resolve())]
        if os.environ.get("BENCH_SITE_DIR")
        else []
    )
    env.update(
        NO_PROXY="127.0.0.1,localhost",
        PYTHONPATH=os.pathsep.join([*site, str(ROOT)]),
        PYTHONUNBUFFERED="1",
    )
    return env


# --- configuration ------------------------------------------------------------------------------


def parse_sets(pairs: Sequence[str]) -> dict[str, str]:
    sets = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.startswith("HOOKLINE_"):
            raise SystemExit(f"--set wants HOOKLINE_NAME=VALUE, got {pair!r}")
        sets[key] = value
    return sets


def hookline_env(
    workdir: Path,
    public_url: str,
    fake_port: int,
    token: str,
    secret: str,
    sets: Mapping[str, str],
    receiver_port: int | None = None,
) -> dict[str, str]:
    """The HOOKLINE_* settings of the run: the bench's own, then ``--set`` over them."""
    env = {
        "HOOKLINE_STORE_URL": f"sqlite:///{workdir / 'hookline.db'}",
        "HOOKLINE_BLOB_URL": f"file://{workdir / 'blobs'}",
        "HOOKLINE_VAR_DIR": str(workdir / "var"),
        "HOOKLINE_PUBLIC_URL": public_url,
        "HOOKLINE_SECRET_KEY": secrets.token_urlsafe(32),  # one for every process
        "HOOKLINE_PROVIDER": "replicate",
        "HOOKLINE_REPLICATE_BASE_URL": f"http://127.0.0.1:{fake_port}/v1",
        "HOOKLINE_REPLICATE_API_TOKEN": token,
        "HOOKLINE_REPLICATE_WEBHOOK_SECRET": secret,
        "HOOKLINE_REPLICATE_MODEL": MODEL,
        "HOOKLINE_OUTPUT_HOSTS": f"127.0.0.1:{fake_port}",
        # far beyond the run: the reaper never polls a job the bench holds on purpose
        "HOOKLINE_AI_DEADLINE_S": "3600",
        "HOOKLINE_AI_HARD_CAP_S": "7200",
    }
    if receiver_port is not None:  # the loopback receiver of outbound webhooks
        env["HOOKLINE_WEBHOOK_HOSTS"] = f"127.0.0.1:{receiver_port}"
    env.update(sets)
    return env


def effective_settings(env: Mapping[str, str]) -> dict[str, Any]:
    """What hookline makes of ``env`` for the settings that shape this workload."""
    from service.settings import Settings
    from service.steps.pacing import fair_share

    with mock.patch.dict(os.environ, dict(env), clear=True):
        settings = Settings(_env_file=None)  # type: ignore[call-arg]
    shown: dict[str, Any] = {name: getattr(settings, name) for name in SHOWN_SETTINGS}
    # the fair share, computed
    shown["user_concurrency"] = fair_share(settings.provider_concurrency, settings.user_concurrency)
    return shown


def masked(env: Mapping[str, str]) -> dict[str, str]:
    hidden = re.compile(r"(SECRET|TOKEN|KEY)$")
    return {k: ("***" if hidden.search(k) else v) for k, v in sorted(env.items())}


def create_user(env: Mapping[str, str], cwd: Path, name: str, credits: int) -> str:
    """``hookline users create NAME --credits N``; its key is the last line it prints."""
    cmd = [sys.executable, "-m", "service.cli", "users", "create", name, "--credits", str(credits)]
    done = subprocess.run(cmd, cwd=cwd, env=dict(env), capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"users create {name} failed: {done.stderr.strip()[-500:]}")
    return done.stdout.strip().splitlines()[-1]


# --- profiling ----------------------------------------------------------------------------------


def py_spy() -> str:
    """py-spy from the venv (``pip install -e '.[bench]'``, as ``make bench`` does) or PATH."""
    venv_bin = Path(sys.executable).parent / "py-spy"
    found = str(venv_bin) if venv_bin.exists() else shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy is missing: pip install -e '.[bench]' installs it")
    return found


# A sample whose innermost Python frame is on one of these source lines is a thread waiting
# (py-spy's own idle detection does not work here: it reports waiting threads as busy).
IDLE_LINE: Final = re.compile(
    r"\.get\((block=True)?\)|\.wait\(|\.select\(|\.acquire\(|time\.sleep\(|\.join\("
)
# ... and one on these is the event loop inside uvloop's C code: waiting in epoll, or doing its own
# socket work (not split: no Python frame tells them apart).
LOOP_LINE: Final = re.compile(r"run_until_complete\(|run_forever\(")
# A work sample with a frame of these files in its stack is the outbound delivery path's: the
# feeder, the deliverer (its HTTP client calls included) and the outbox's statements on the store's
# database thread (not the timeline's note of each try: that thread's stack does not say whose).
OUTBOUND_FILES: Final = (
    "service/outbound/",
    "statemachine/sqlite_outbox.py",
    "statemachine/mongo_outbox.py",
)


@dataclass(frozen=True, slots=True)
class Frame:
    name: str
    file: str
    line: int

    @property
    def short_file(self) -> str:
        for marker in ("/site-packages/", "/lib/python3.11/", str(ROOT) + "/"):
            if marker in self.file:
                return self.file.split(marker, 1)[1]
        return self.file

    @property
    def function(self) -> str:
        return f"{self.name} ({self.short_file})"

    @property
    def at_line(self) -> str:
        return f"{self.name} ({self.short_file}:{self.line})"

    def kind(self) -> str:
        source = linecache.getline(self.file, self.line)
        if LOOP_LINE.search(source):
            return "loop"
        return "idle" if IDLE_LINE.search(source) else "work"


Stack = tuple[Frame, ...]


def profile_stacks(speedscope: Path) -> collections.Counter[tuple[str, Stack]]:
    """The samples of a py-spy speedscope file: (thread, stack root first) → samples."""
    doc = json.loads(speedscope.read_text())
    frames = [
        Frame(str(f.get("name", "?")), str(f.get("file", "?")), int(f.get("line") or 0))
        for f in doc["shared"]["frames"]
    ]
    stacks: collections.Counter[tuple[str, Stack]] = collections.Counter()
    for profile in doc["profiles"]:
        thread = str(profile.get("name", "?")).split('"')[1::2] or ["?"]
        for sample in profile["samples"]:
            stacks[(thread[0], tuple(frames[i] for i in sample))] += 1
    return stacks


def write_folded(path: Path, process: str, stacks: collections.Counter[tuple[str, Stack]]) -> None:
    """Brendan Gregg's folded format (flamegraph.pl, speedscope, inferno read it)."""
    with path.open("w") as out:
        for (thread, stack), count in stacks.most_common():
            names = ";".join([f"{process}:{thread}", *(f.at_line for f in stack)])
            out.write(f"{names} {count}\n")


def top(counter: collections.Counter[str], total: int, n: int = 25) -> list[str]:
    return [
        f"{c / max(total, 1) * 100:6.2f} %  {c:6d}  {label}" for label, c in counter.most_common(n)
    ]


def write_profile_summary(out_dir: Path, files: Sequence[Path], cpu_s: float) -> str:
    """Folded stacks beside each speedscope file, and one summary over every hookline process:
    how the samples split (waiting / event loop in C / work), then the top self-time and
    cumulative functions and the top self-time lines of the work samples."""
    kinds: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    own_lines: collections.Counter[str] = collections.Counter()
    cumulative: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    outbound_own: collections.Counter[str] = collections.Counter()
    outbound_cumulative: collections.Counter[str] = collections.Counter()
    for path in files:
        process = path.name.split(".")[0]
        stacks = profile_stacks(path)
        write_folded(path.with_name(f"{process}.folded"), process, stacks)
        for (thread, stack), count in stacks.items():
            if not stack:
                continue
            kind = stack[-1].kind()
            kinds[kind] += count
            if kind != "work":
                continue
            threads[f"{process}:{thread}"] += count
            own[stack[-1].function] += count
            own_lines[stack[-1].at_line] += count
            functions = {f.function for f in stack}
            for function in functions:
                cumulative[function] += count
            if any(f.short_file.startswith(OUTBOUND_FILES) for f in stack):
                outbound_own[stack[-1].function] += count
                for function in functions:
                    outbound_cumulative[function] += count
    total = sum(kinds.values())
    work = kinds["work"]
    lines = [
        f"py-spy, 100 samples/s per thread, every hookline process: {total} samples;",
        f"  waiting (queue get, wait, select, sleep): {kinds['idle']} "
        f"({kinds['idle'] / max(total, 1):.0%})",
        f"  event loop inside uvloop's C code (epoll wait or its own socket work): {kinds['loop']} "
        f"({kinds['loop'] / max(total, 1):.0%})",
        f"  work (a Python frame or a C call under it): {work} = {work / 100:.1f} s, against "
        f"{cpu_s:.1f} s of CPU measured in /proc over the phases",
        "",
        "work samples by thread: " + ", ".join(f"{t} {c}" for t, c in threads.most_common(8)),
        "",
        "top 25 functions by self time (share of the work samples, samples):",
        *top(own, work),
        "",
        "top 25 functions by cumulative time (anywhere in the stack):",
        *top(cumulative, work),
        "",
        "top 15 lines by self time:",
        *top(own_lines, work, 15),
    ]
    if outbound_own:
        outbound = sum(outbound_own.values())
        lines += [
            "",
            f"the outbound delivery path (a frame of {', '.join(OUTBOUND_FILES)} in the stack): "
            f"{outbound} work samples = {outbound / 100:.1f} s, {outbound / max(work, 1):.1%} "
            "of the work samples; as shares of the delivery path's samples:",
            "top 20 functions by cumulative time:",
            *top(outbound_cumulative, outbound, 20),
            "",
            "top 15 functions by self time:",
            *top(outbound_own, outbound, 15),
        ]
    text = "\n".join(lines) + "\n"
    (out_dir / "profile-summary.txt").write_text(text)
    return text


# --- logs ---------------------------------------------------------------------------------------

LEVEL: Final = re.compile(r"\[(warning|error|critical|exception)\s*\]\s+(\S+)")
STDLIB_LEVEL: Final = re.compile(r"^(WARNING|ERROR|CRITICAL):\s+(.*)")
JSON_LEVELS: Final = frozenset({"warning", "error", "critical", "exception"})


def scan_logs(logs: Mapping[str, Path]) -> dict[str, int]:
    """Warnings, errors and tracebacks in hookline's logs: counts by level and event."""
    found: collections.Counter[str] = collections.Counter()
    for name, path in logs.items():
        if not name.startswith("hookline") or not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):  # a JSON line (HOOKLINE_LOG_FORMAT auto, stderr a file)
                with contextlib.suppress(ValueError, AttributeError):
                    event = json.loads(line)
                    if (level := event.get("level")) in JSON_LEVELS:
                        found[f"{level}: {event.get('event')}"] += 1
                    if "exception" in event:  # a traceback, rendered into the line
                        found["traceback"] += 1
                continue
            if match := LEVEL.search(line):
                found[f"{match.group(1)}: {match.group(2)}"] += 1
            elif match := STDLIB_LEVEL.match(line):
                found[f"{match.group(1).lower()}: {match.group(2)[:80]}"] += 1
            elif line.startswith("Traceback"):
                found["traceback"] += 1
    return dict(found.most_common(20))


# --- one run ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Options:
    n: int = N_FULL
    concurrency: int = 32
    sets: dict[str, str] = field(default_factory=dict)
    api_procs: int = 0  # 0: one process with every role
    worker_procs: int = 1
    client: str = "raw"
    warmup: int = 20
    settle_s: float = 2.0
    stall_s: float = 15.0
    phase_timeout_s: float = 600.0
    upload_size: tuple[int, int] = (1024, 768)
    verify_sample: int = 20
    webhooks: bool = False
    receiver: str = "process"  # or "driver": the receiver inside the driver's process
    profile: bool = False
    keep: bool = False


@dataclass(slots=True)
class Result:
    figures: dict[str, float]
    notes: list[str]
    settings: dict[str, Any]
    env: dict[str, str]
    layout: str
    log_findings: dict[str, int]
    profile_dir: Path | None = None
    profile_summary: str = ""


def hookline_commands(opts: Options) -> list[tuple[str, str, int]]:
    """(name, roles, port) of each hookline process."""
    if opts.api_procs <= 0:
        return [("hookline", "api,dispatcher,reaper", free_port())]
    procs = [(f"hookline-api-{i + 1}", "api", free_port()) for i in range(opts.api_procs)]
    procs += [
        (f"hookline-worker-{i + 1}", "dispatcher,reaper", free_port())
        for i in range(opts.worker_procs)
    ]
    return procs


def run_once(opts: Options) -> Result:
    """One run: the fake, hookline, the users, the driver; everything stopped afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix="hookline-bench-e2e-"))
    profile_dir = Path(tempfile.mkdtemp(prefix="hookline-e2e-profile-")) if opts.profile else None
    spy = py_spy() if opts.profile else None
    children = Children()
    try:
        return _run(opts, workdir, children, profile_dir, spy)
    finally:
        children.stop_all()
        if opts.keep:
            print(f"[bench_e2e] kept {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _run(
    opts: Options, workdir: Path, children: Children, profile_dir: Path | None, spy: str | None
) -> Result:
    env0 = base_env()
    logs = workdir / "logs"
    logs.mkdir()
    token = secrets.token_urlsafe(24)
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    fake_port = free_port()
    fake = children.spawn(
        "fake",
        [sys.executable, "-m", "bench.e2e_provider", "--port", str(fake_port),
         f"--token={token}", "--secret", secret],  # "=": a token may start with "-"
        env=env0, cwd=ROOT, log=logs / "fake.log",
    )  # fmt: skip
    fake_url = f"http://127.0.0.1:{fake_port}/_bench/stats"
    wait_http(fake_url, fake, "the provider fake", logs / "fake.log")

    receiver_port = free_port() if opts.webhooks else None
    receiver_pid = None
    if receiver_port is not None and opts.receiver == "process":
        receiver = children.spawn(
            "receiver",
            [sys.executable, "-m", "bench.e2e_receiver", "--port", str(receiver_port)],
            env=env0, cwd=ROOT, log=logs / "receiver.log",
        )  # fmt: skip
        receiver_url = f"http://127.0.0.1:{receiver_port}/_bench/healthz"
        wait_http(receiver_url, receiver, "the webhook receiver", logs / "receiver.log")
        receiver_pid = receiver.pid

    procs = hookline_commands(opts)
    api = [f"http://127.0.0.1:{port}" for _, roles, port in procs if "api" in roles]
    env = hookline_env(workdir, api[0], fake_port, token, secret, opts.sets, receiver_port)
    settings = effective_settings(env)
    full_env = {**env0, **env}
    credits = opts.n * CREDITS_PER_TASK + 1_000
    key = create_user(full_env, workdir, USER, credits)
    warm_key = create_user(full_env, workdir, WARM_USER, opts.warmup * CREDITS_PER_TASK + 1_000)

    pids = []
    for name, roles, port in procs:
        cmd = [sys.executable, "-m", "service.cli", "serve", "--roles", roles]
        cmd += ["--host", "127.0.0.1", "--port", str(port)]
        proc = children.spawn(name, cmd, env=full_env, cwd=workdir, log=logs / f"{name}.log")
        pids.append(proc.pid)
    for name, _roles, port in procs:
        url = f"http://127.0.0.1:{port}/healthz"
        wait_http(url, children.procs[name], name, logs / f"{name}.log")

    layout = (
        "1 process (api,dispatcher,reaper)"
        if opts.api_procs <= 0
        else f"{opts.api_procs} × api + {opts.worker_procs} × dispatcher,reaper on one SQLite file"
    )
    if opts.webhooks:
        where = "its own process" if opts.receiver == "process" else "the driver's process"
        layout += f"; outbound webhooks on, the receiver in {where}"
    cfg = {
        "api": api,
        "fake": f"http://127.0.0.1:{fake_port}",
        "db": str(workdir / "hookline.db"),
        "blob_dir": str(workdir / "blobs"),
        "key": key,
        "warm_key": warm_key,
        "user": USER,
        "warm_user": WARM_USER,
        "secret": secret,
        "model": MODEL,
        "n": opts.n,
        "concurrency": opts.concurrency,
        "warmup": opts.warmup,
        "settle_s": opts.settle_s,
        "client": opts.client,
        "hookline_pids": pids,
        "fake_pid": fake.pid,
        "stall_s": opts.stall_s,
        "phase_timeout_s": opts.phase_timeout_s,
        "upload_size": list(opts.upload_size),
        "verify_sample": opts.verify_sample,
        "watermark_position": settings["watermark_position"],
        "webhooks": opts.webhooks,
        "receiver": opts.receiver,
        "receiver_url": f"http://127.0.0.1:{receiver_port}" if receiver_port else None,
        "receiver_pid": receiver_pid,
    }
    config_path, out_path = workdir / "driver.json", workdir / "driver-out.json"
    config_path.write_text(json.dumps(cfg))
    driver = children.spawn(
        "driver",
        [sys.executable, "-m", "bench.e2e_driver", str(config_path), str(out_path)],
        env=env0, cwd=ROOT, log=logs / "driver.log",
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    budget_s = 2 * opts.phase_timeout_s + 300
    spies: list[tuple[subprocess.Popen[bytes], Path]] = []
    deadline = time.monotonic() + budget_s
    expect_line(driver, "READY", deadline, logs / "driver.log")
    if spy and profile_dir:
        spies = start_spies(spy, procs, pids, profile_dir)
    go(driver)
    expect_line(driver, "PHASES_DONE", deadline, logs / "driver.log")
    for proc, _ in spies:
        proc.send_signal(signal.SIGINT)
    for proc, _ in spies:
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    go(driver)
    try:
        driver.wait(max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"the driver did not finish in {budget_s:.0f} s") from exc
    if not out_path.exists():
        raise RuntimeError(f"the driver exited {driver.returncode}: {tail(logs / 'driver.log')}")
    out = json.loads(out_path.read_text())
    if out["error"]:
        raise RuntimeError(f"the driver stopped: {out['error']}")
    figures: dict[str, float] = out["figures"]
    for name, _roles, _port in procs:
        if children.procs[name].poll() is not None:
            out["notes"].append(f"{name} exited with {children.procs[name].returncode}")
    summary = ""
    if profile_dir:
        files = [path for _, path in spies if path.exists() and path.stat().st_size]
        if files:
            cpu = sum(figures.get(f"hookline_cpu_{p}_s", 0.0) for p in "abc")
            summary = write_profile_summary(profile_dir, files, cpu)
        else:
            out["notes"].append(f"py-spy wrote no profile: {tail(profile_dir / 'py-spy.log')}")
    figures.update(
        setting_n=opts.n,
        setting_concurrency=opts.concurrency,
        setting_api_procs=max(1, opts.api_procs),
        setting_worker_procs=opts.worker_procs if opts.api_procs > 0 else 0,
        setting_webhooks=float(opts.webhooks),
        setting_rate_limit_per_s=float(settings["rate_limit_per_s"]),
        setting_rate_limit_burst=float(settings["rate_limit_burst"]),
        setting_provider_concurrency=float(settings["provider_concurrency"]),
        setting_user_concurrency=float(settings["user_concurrency"]),
    )
    children.stop_all()  # the logs are complete once the processes have stopped
    return Result(
        figures=figures,
        notes=out["notes"],
        settings=settings,
        env=masked(env),
        layout=layout,
        log_findings=scan_logs(children.logs),
        profile_dir=profile_dir,
        profile_summary=summary,
    )


def start_spies(
    spy: str, procs: Sequence[tuple[str, str, int]], pids: Sequence[int], out_dir: Path
) -> list[tuple[subprocess.Popen[bytes], Path]]:
    """py-spy attached to each hookline process (on-CPU samples only, 100 Hz, non-blocking)."""
    spies = []
    log = (out_dir / "py-spy.log").open("ab")
    for (name, _roles, _port), pid in zip(procs, pids, strict=True):
        path = out_dir / f"{name}.speedscope.json"
        cmd = [spy, "record", "--pid", str(pid), "--rate", "100", "--format", "speedscope",
               "--nonblocking", "--output", str(path),
               *os.environ.get("BENCH_PY_SPY_ARGS", "").split()]  # fmt: skip
        spies.append((subprocess.Popen(cmd, stdout=log, stderr=log), path))
    log.close()
    time.sleep(1.5)  # attached before the first request
    for proc, _ in spies:
        if proc.poll() is not None:
            raise RuntimeError(f"py-spy could not attach: {tail(out_dir / 'py-spy.log')}")
    return spies


def expect_line(proc: subprocess.Popen[bytes], word: str, deadline: float, log: Path) -> None:
    """Read the driver's protocol line ``word`` (its stdout), or fail clearly."""
    assert proc.stdout is not None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"the driver did not reach {word} in time: {tail(log)}")
        ready, _, _ = select.select([proc.stdout], [], [], min(left, 1.0))
        if ready:
            line = proc.stdout.readline().decode().strip()
            if line == word:
                return
            if not line and proc.poll() is not None:
                raise RuntimeError(f"the driver exited with {proc.returncode}: {tail(log)}")
        elif proc.poll() is not None:
            raise RuntimeError(f"the driver exited with {proc.returncode}: {tail(log)}")


def go(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdin is not None
    proc.stdin.write(b"go\n")
    proc.stdin.flush()


# --- the report ---------------------------------------------------------------------------------

ROWS: Final = (
    ("phase A: creates", ""),
    ("tasks asked / accepted (202)", "n|accepted"),
    ("starts/s acked", "starts_per_s"),
    ("POST /v1/tasks p50 / p99 ms", "create_p50_ms|create_p99_ms"),
    ("last ack → all held by the fake, s", "fake_holds_all_after_last_ack_s"),
    ("last ack → all ai_processing in the store, s", "store_all_waiting_after_last_ack_s"),
    ("created → ai_processing p50 / p99 ms", "created_to_ai_processing_p50_ms|"
     "created_to_ai_processing_p99_ms"),
    ("phase A wall s (requests / until all wait)", "phase_a_requests_s|phase_a_s"),
    ("phase B: webhooks", ""),
    ("completions/s", "completions_per_s"),
    ("completed / failed / not completed", "completed|failed|tasks_not_completed"),
    ("webhook answer p50 / p99 ms", "webhook_p50_ms|webhook_p99_ms"),
    ("callback→completed p50 / p99 ms (history)", "callback_to_completed_p50_ms|"
     "callback_to_completed_p99_ms"),
    ("webhook sent→completed p50 / p99 ms", "webhook_sent_to_completed_p50_ms|"
     "webhook_sent_to_completed_p99_ms"),
    ("phase B wall s", "phase_b_s"),
    ("outputs", ""),
    ("stored (file, magic, 256×256) / not", "outputs_stored|outputs_not_stored"),
    ("watermark found / checked (sample)", "watermark_found|watermark_checked"),
    ("served by hookline / checked", "outputs_served|outputs_served_checked"),
    ("fake: output fetches / polls / cancels", "fake_output_fetches|fake_polls|fake_cancels"),
    ("upload bytes / width / height", "upload_bytes|upload_width|upload_height"),
    ("input sent as data URI / URL", "fake_data_uri_inputs|fake_url_inputs"),
    ("input URLs fetched by the fake / failed", "fake_input_fetches|fake_input_fetch_failures"),
    ("webhook body mean bytes", "webhook_body_bytes_mean"),
    ("memory (hookline)", ""),
    ("PSS MiB start / baseline / all waiting / after", "hookline_pss_start_mib|"
     "hookline_pss_baseline_mib|hookline_pss_waiting_mib|hookline_pss_after_mib"),
    ("RSS MiB start / baseline / all waiting / after", "hookline_rss_start_mib|"
     "hookline_rss_baseline_mib|hookline_rss_waiting_mib|hookline_rss_after_mib"),
    ("PSS / RSS growth per waiting task KiB", "pss_per_waiting_task_kib|rss_per_waiting_task_kib"),
    ("waiting tasks at the read", "waiting_tasks_at_read"),
    ("CPU", ""),
    ("hookline CPU s phase A / B", "hookline_cpu_a_s|hookline_cpu_b_s"),
    ("hookline CPU ms per task A / B / all phases", "hookline_cpu_a_ms_per_task|"
     "hookline_cpu_b_ms_per_task|hookline_cpu_ms_per_task"),
    ("hookline cores busy A / B", "hookline_cores_a|hookline_cores_b"),
    ("fake CPU s A / B", "fake_cpu_a_s|fake_cpu_b_s"),
    ("driver CPU s A / B", "driver_cpu_a_s|driver_cpu_b_s"),
    ("driver CPU µs per create / per webhook", "driver_cpu_us_per_create|"
     "driver_cpu_us_per_webhook"),
)  # fmt: skip

# Shown when the run had --webhooks.
WEBHOOK_ROWS: Final = (
    ("outbound webhooks", ""),
    ("terminal-event deliveries / all received / repeats", "deliveries_terminal|"
     "deliveries_received|deliveries_duplicates"),
    ("outbound deliveries/s (first to last terminal event)", "deliveries_per_s"),
    ("delivery lag p50 / p99 / max ms (received − created_at)", "delivery_lag_p50_ms|"
     "delivery_lag_p99_ms|delivery_lag_max_ms"),
    ("  created_at → first try started p50 / p99 ms", "delivery_queue_p50_ms|"
     "delivery_queue_p99_ms"),
    ("    created_at → seen in the feed table p50 / p99 ms (±20 ms)", "delivery_to_feed_p50_ms|"
     "delivery_to_feed_p99_ms"),
    ("    created_at → seen in the outbox p50 / p99 ms (±20 ms)", "delivery_to_outbox_p50_ms|"
     "delivery_to_outbox_p99_ms"),
    ("    seen in the outbox → first try started p50 / p99 ms", "delivery_outbox_to_try_p50_ms|"
     "delivery_outbox_to_try_p99_ms"),
    ("  first try started → received p50 / p99 ms", "delivery_send_p50_ms|delivery_send_p99_ms"),
    ("last delivery after phase B s / phase C wall s", "last_delivery_after_phase_b_s|phase_c_s"),
    ("terminal-event deliveries after phase B (in phase C)", "deliveries_after_phase_b"),
    ("task.completed exactly once / missing / extra ids", "deliveries_completed_exactly_once|"
     "deliveries_completed_missing|deliveries_completed_extra_ids"),
    ("not verified / unknown task / state ≠ type / created_at ≠ transition",
     "deliveries_not_verified|deliveries_unknown_task|deliveries_state_not_type|"
     "deliveries_created_at_not_transition"),
    ("outbox: messages / delivered / pending / failed / retried", "outbox_messages|"
     "outbox_delivered|outbox_pending|outbox_failed|outbox_retried"),
    ("delivery body mean bytes / warm-up deliveries", "delivery_body_bytes_mean|"
     "deliveries_warm_up"),
    ("hookline CPU s phase C / ms per task", "hookline_cpu_c_s|hookline_cpu_c_ms_per_task"),
    ("receiver process CPU s A / B / C", "receiver_cpu_a_s|receiver_cpu_b_s|receiver_cpu_c_s"),
    ("driver CPU s C", "driver_cpu_c_s"),
)  # fmt: skip


def fmt(value: float) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "—"
    if abs(value) >= 100 or value == int(value):
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def report(result: Result, title: str) -> str:
    f = result.figures
    lines = [f"## {title}", "", f"layout: {result.layout}", ""]
    lines += ["| figure | value |", "| --- | --- |"]
    rows = ROWS + WEBHOOK_ROWS if "deliveries_received" in f else ROWS
    for label, keys in rows:
        if not keys:
            lines.append(f"| **{label}** | |")
            continue
        values = [fmt(f[k]) if k in f else "—" for k in keys.split("|")]
        lines.append(f"| {label} | {' / '.join(values)} |")
    lines += ["", "answers by status: " + answers_line(f)]
    lines += ["", "settings in force: " + ", ".join(f"{k}={v}" for k, v in result.settings.items())]
    lines += ["", "HOOKLINE_* given: " + ", ".join(f"{k}={v}" for k, v in result.env.items())]
    if result.log_findings:
        found = "; ".join(f"{k} ×{v}" for k, v in result.log_findings.items())
        lines += ["", f"hookline logs: {found}"]
    else:
        lines += ["", "hookline logs: no warnings, errors or tracebacks"]
    for note in result.notes:
        lines += ["", f"> {note}"]
    if result.profile_dir:
        lines += ["", f"profile: {result.profile_dir}", "", "```", result.profile_summary, "```"]
    return "\n".join(lines)


def answers_line(f: Mapping[str, float]) -> str:
    def by(prefix: str) -> str:
        parts = [f"{k[len(prefix) :]}×{fmt(v)}" for k, v in f.items() if k.startswith(prefix)]
        return ", ".join(parts) or "none"

    return f"POST /v1/tasks {by('create_status_')}; webhooks {by('webhook_status_')}"


GOAL_KEYS: Final = (
    "starts_per_s",
    "all_waiting_after_last_ack_s",
    "completions_per_s",
    "callback_to_completed_p50_ms",
    "callback_to_completed_p99_ms",
    "pss_per_waiting_task_kib",
    "hookline_cpu_ms_per_task",
)


def handle_signals() -> None:
    """SIGINT and SIGTERM unwind through the ``finally`` blocks that stop the children (SIGINT
    may arrive ignored, as in a shell's background job, so it is set explicitly)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def run(quick: bool) -> dict[str, float]:
    """One run at the default settings (N = 2,000; ``--quick``: 300), for ``bench/run.py``; each
    phase bounded (defaults that throttle the run show as missed goals, not as a timeout)."""
    handle_signals()
    opts = Options(
        n=N_QUICK if quick else N_FULL,
        stall_s=10.0,
        phase_timeout_s=RUN_PHASE_TIMEOUT_S[quick],
    )
    result = run_once(opts)
    print(report(result, "bench_e2e"), flush=True)
    return {k: round(float(v), 3) for k, v in result.figures.items()}


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--quick", action="store_true", help=f"N = {N_QUICK} (a smoke run)")
    p.add_argument("--n", type=int, help=f"tasks (default {N_FULL})")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight (default 32)")
    p.add_argument("--set", action="append", default=[], metavar="HOOKLINE_KEY=VALUE",
                   help="override any HOOKLINE_* setting (repeatable)")  # fmt: skip
    p.add_argument("--api-procs", type=int, default=0,
                   help="run A × `serve --roles api` (each on its own port) instead of one "
                   "all-roles process")  # fmt: skip
    p.add_argument("--worker-procs", type=int, default=1,
                   help="with --api-procs: W × `serve --roles dispatcher,reaper`")  # fmt: skip
    p.add_argument("--client", choices=("raw", "httpx"), default="raw",
                   help="the driver's HTTP client (raw asyncio sockets by default)")  # fmt: skip
    p.add_argument("--warmup", type=int, default=20, help="warm-up tasks before measuring")
    p.add_argument("--upload-size", type=parse_size, default=(1024, 768), metavar="WxH")
    p.add_argument("--stall-s", type=float, default=15.0,
                   help="give a wait up when nothing moved for this long")  # fmt: skip
    p.add_argument("--timeout", type=float, default=600.0, help="the most a phase may take")
    p.add_argument(
        "--webhooks",
        action="store_true",
        help="outbound webhooks on: a loopback receiver registered for the bench user",
    )
    p.add_argument("--receiver", choices=("process", "driver"), default="process",
                   help="with --webhooks: the receiver in its own process (default) or in the "
                   "driver's")  # fmt: skip
    p.add_argument("--profile", action="store_true", help="sample hookline with py-spy")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = p.parse_args(argv)
    opts = Options(
        n=args.n or (N_QUICK if args.quick else N_FULL),
        concurrency=args.concurrency,
        sets=parse_sets(args.set),
        api_procs=args.api_procs,
        worker_procs=args.worker_procs,
        client=args.client,
        warmup=args.warmup,
        stall_s=args.stall_s,
        phase_timeout_s=args.timeout,
        upload_size=args.upload_size,
        webhooks=args.webhooks,
        receiver=args.receiver,
        profile=args.profile,
        keep=args.keep,
    )
    handle_signals()
    result = run_once(opts)
    print(report(result, f"bench_e2e, N = {opts.n}, concurrency {opts.concurrency}"))
    if args.json:
        print(json.dumps(result.figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
