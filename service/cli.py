"""The ``hookline`` command: serve, simulator, reaper, users, credits, submit."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import math
import os
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

from service.http.auth import KEY_CACHE_TTL_S, hash_key, new_api_key
from service.settings import Settings
from statemachine import clock
from statemachine.errors import HooklineError
from statemachine.store import TaskStore, User

T = TypeVar("T")
USER_NAME = re.compile(r"[A-Za-z0-9_\-]{1,64}")
DEMO_USER = "demo"
DEMO_CREDITS = 1000
GC_GEN0_THRESHOLD = 20_000
M_ARENA_MAX: Final = -8  # glibc's mallopt parameter (malloc.h)
MALLOC_ARENAS: Final = 2


def _with_store(settings: Settings, action: Callable[[TaskStore], Awaitable[T]]) -> T:
    from service.runtime import build_store

    async def run() -> T:
        store, _feed = build_store(settings)
        await store.open()
        try:
            return await action(store)
        finally:
            await store.close()

    return asyncio.run(run())


def rate_arg(text: str) -> float:
    """``--rate``: requests a second, a finite number >= 0 (0: no limit)."""
    try:
        rate = float(text)
    except ValueError:
        rate = math.nan
    if not math.isfinite(rate) or rate < 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a rate: give requests a second, a finite number >= 0 (0: no limit)"
        )
    return rate


def burst_arg(text: str) -> int:
    """``--burst``: requests at once, an integer >= 1."""
    try:
        burst = int(text)
    except ValueError:
        burst = 0
    if burst < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a burst: give requests at once, an integer >= 1"
        )
    return burst


def describe_limits(settings: Settings, user: User) -> str:
    """The request limits of ``user``'s keys, as one line; "(default)" marks the process's."""
    rate, burst = user.rate_limit_per_s, user.rate_limit_burst
    rate_text = f"{settings.rate_limit_per_s:g}/s (default)" if rate is None else f"{rate:g}/s"
    burst_text = f"{settings.rate_limit_burst} (default)" if burst is None else str(burst)
    if (settings.rate_limit_per_s if rate is None else rate) <= 0:
        return f"rate limit: none (rate {rate_text})"
    return f"rate limit: {rate_text}, burst {burst_text} per API key"


def cmd_users_create(settings: Settings, args: argparse.Namespace) -> int:
    if not USER_NAME.fullmatch(args.name):
        print("error: a user name is 1-64 of A-Z a-z 0-9 _ -", file=sys.stderr)
        return 2
    if args.credits < 0:
        print("error: --credits must be >= 0", file=sys.stderr)
        return 2
    key = new_api_key()

    async def create(store: TaskStore) -> User:
        return await store.create_user(
            args.name,
            args.credits,
            is_admin=args.admin,
            key_hash=hash_key(key),
            now=clock.now(),
            rate_limit_per_s=args.rate,
            rate_limit_burst=args.burst,
        )

    user = _with_store(settings, create)
    role = "admin" if args.admin else "user"
    print(f"created {role} {args.name} with {args.credits} credits")
    print(describe_limits(settings, user))
    print("API key:")
    print(key)
    return 0


def cmd_users_limits(settings: Settings, args: argparse.Namespace) -> int:
    async def change(store: TaskStore) -> User:
        return await store.set_user_limits(
            args.name, rate_limit_per_s=args.rate, rate_limit_burst=args.burst
        )

    user = _with_store(settings, change)
    print(f"{user.name}: {describe_limits(settings, user)}")
    print(f"(running servers apply them within {KEY_CACHE_TTL_S:g} s: they cache keys that long)")
    return 0


def cmd_credits_grant(settings: Settings, args: argparse.Namespace) -> int:
    if args.amount <= 0:
        print("error: the amount must be > 0", file=sys.stderr)
        return 2

    async def grant(store: TaskStore) -> int:
        return await store.grant(args.name, args.amount, clock.now())

    balance = _with_store(settings, grant)
    print(f"granted {args.amount} credits to {args.name}; balance {balance}")
    return 0


def ensure_demo_user(settings: Settings) -> str:
    """The demo user's API key, kept in var/demo.key so `make run` shows the same key each time."""
    key_file = settings.var_dir / "demo.key"
    settings.var_dir.mkdir(parents=True, exist_ok=True)

    async def ensure(store: TaskStore) -> str:
        if key_file.exists():
            key = key_file.read_text().strip()
            if await store.user_by_key_hash(hash_key(key)) is not None:
                return key
        key = new_api_key()
        if await store.get_user(DEMO_USER) is None:
            await store.create_user(
                DEMO_USER, DEMO_CREDITS, is_admin=True, key_hash=hash_key(key), now=clock.now()
            )
        else:
            await store.add_api_key(DEMO_USER, hash_key(key), clock.now())
        key_file.write_text(key + "\n")
        return key

    return _with_store(settings, ensure)


def demo_banner(settings: Settings, key: str) -> str:
    base = f"http://{settings.host}:{settings.port}"
    return f"""
hookline is starting on {base} (store {settings.store_url}, provider {settings.provider})

  dashboard:   {base}/   (API key below)
  API key:     {key}      (user "{DEMO_USER}", admin; saved in {settings.var_dir}/demo.key)
  simulator:   {base}/sim/v1   (a development tool, on because of --demo; its API token is
               random per start unless HOOKLINE_SIM_API_TOKEN sets one)

  try it (any JPEG/PNG/WebP as photo.jpg):
    export KEY={key}
    curl -s -X POST {base}/v1/uploads -H "Authorization: Bearer $KEY" \\
         -H "Content-Type: image/jpeg" --data-binary @photo.jpg
    curl -s -X POST {base}/v1/tasks -H "Authorization: Bearer $KEY" \\
         -H "Content-Type: application/json" \\
         -d '{{"inputs": [{{"upload": "<key>"}}], "prompt": "a lighthouse", "style": "anime"}}'
    curl -s {base}/v1/tasks/<id> -H "Authorization: Bearer $KEY"
"""


def tune_gc() -> None:
    """How ``hookline serve`` runs Python's cyclic GC: start-up objects are frozen out of it and
    young collections run less often, which removes most pauses from the tail latency
    (bench/RESULTS.md: p99 at 64 connections fell from ~50 ms to ~18 ms)."""
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 100)


def tune_malloc(libc: Any = None) -> bool:
    """How ``hookline serve`` has the C library allocate: in at most ``MALLOC_ARENAS`` arenas.
    glibc gives a thread that finds the arenas busy an arena of its own, up to eight per core,
    and memory freed in one stays with it: the database thread, the log writer and the worker
    pool each kept the high-water mark of what they had held (a burst's input files, decoded
    images). With two, PSS per waiting task in bench_e2e fell from 6.9-9.5 to 3.3-6.5 KiB, at
    no more CPU per task (bench/RESULTS.md). Called before any thread starts; an operator's own
    limit (``MALLOC_ARENA_MAX``, or ``glibc.malloc.arena_max`` in ``GLIBC_TUNABLES``) wins; a C
    library without ``mallopt`` (musl, macOS) changes nothing. True when the limit was set."""
    if "MALLOC_ARENA_MAX" in os.environ or "arena_max" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = (libc if libc is not None else ctypes.CDLL(None)).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_ARENA_MAX, MALLOC_ARENAS))


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    tune_malloc()  # first: before anything starts a thread
    import uvicorn

    from service.http.app import create_app
    from service.logging import configure_logging
    from service.providers import SimulatorOff

    updates: dict[str, object] = {}
    if args.host:
        updates["host"] = args.host
    if args.port is not None:
        updates["port"] = args.port
    if args.roles:
        updates["roles"] = args.roles
    if args.demo:
        updates["simulator"] = True  # the demo runs on the built-in simulator
    settings = settings.model_copy(update=updates)
    if args.demo:
        print(demo_banner(settings, ensure_demo_user(settings)), flush=True)
    try:
        app = create_app(settings)
    except SimulatorOff as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format, cache=True, queued=True)
    tune_gc()
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    return 0


def cmd_reaper(settings: Settings, args: argparse.Namespace) -> int:
    args.roles = "reaper"
    args.demo = False
    return cmd_serve(settings, args)


def cmd_simulator(settings: Settings, args: argparse.Namespace) -> int:
    """The simulator alone, with the same locks as the mounted one: its token (printed when
    random), webhooks to HOOKLINE_PUBLIC_URL and HOOKLINE_SIM_WEBHOOK_HOSTS only, URL inputs
    through the SSRF-safe fetcher."""
    from callbacks.simulator import run_simulator
    from service.providers import fetch_input_through, sim_config, sim_input_fetcher

    config = sim_config(settings)
    base = f"http://{args.host}:{args.port}/v1"
    hosts = ", ".join(sorted(config.webhook_hosts))
    print(f"simulator on {base}; webhooks only to {hosts}", flush=True)
    if settings.sim_api_token is None:
        print(f"API token (random, this start only): {config.api_token}", flush=True)
    else:
        print("API token: HOOKLINE_SIM_API_TOKEN", flush=True)
    fetch_input = fetch_input_through(sim_input_fetcher(settings))
    run_simulator(config, args.host, args.port, fetch_input=fetch_input)
    return 0


def cmd_submit(settings: Settings, args: argparse.Namespace) -> int:
    from pathlib import Path

    from service.client import submit

    return submit(
        Path(args.image),
        args.prompt,
        style=args.style,
        url=args.url or settings.public_url,
        key=args.key,
        wait=args.wait,
    )


def _limit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--rate",
        type=rate_arg,
        help="requests a second per API key, 0: no limit (default: HOOKLINE_RATE_LIMIT_PER_S)",
    )
    p.add_argument(
        "--burst",
        type=burst_arg,
        help="requests at once per API key (default: HOOKLINE_RATE_LIMIT_BURST)",
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hookline", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the service (API, dispatcher, reaper)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--roles", help="comma-separated: api,dispatcher,reaper")
    serve.add_argument(
        "--demo",
        action="store_true",
        help="run the built-in provider simulator, ensure a demo user and print a guide",
    )
    serve.set_defaults(func=cmd_serve)

    reaper = sub.add_parser("reaper", help="run only the reaper")
    reaper.add_argument("--host")
    reaper.add_argument("--port", type=int, default=0)
    reaper.set_defaults(func=cmd_reaper)

    sim = sub.add_parser("simulator", help="run the provider simulator alone")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=9000)
    sim.set_defaults(func=cmd_simulator)

    users = sub.add_parser("users", help="manage users").add_subparsers(
        dest="action", required=True
    )
    create = users.add_parser("create", help="create a user; prints the API key last")
    create.add_argument("name")
    create.add_argument("--credits", type=int, default=0)
    create.add_argument("--admin", action="store_true")
    _limit_arguments(create)
    create.set_defaults(func=cmd_users_create)
    limits = users.add_parser(
        "limits",
        help="set a user's request limits per API key; an omitted one becomes the default",
    )
    limits.add_argument("name")
    _limit_arguments(limits)
    limits.set_defaults(func=cmd_users_limits)

    credits = sub.add_parser("credits", help="manage credits").add_subparsers(
        dest="action", required=True
    )
    grant = credits.add_parser("grant", help="grant credits to a user")
    grant.add_argument("name")
    grant.add_argument("amount", type=int)
    grant.set_defaults(func=cmd_credits_grant)

    submit = sub.add_parser("submit", help="upload an image and create a task")
    submit.add_argument("image", help="a JPEG, PNG or WebP file")
    submit.add_argument("--prompt", required=True)
    submit.add_argument("--style")
    submit.add_argument("--url", help="hookline's base URL (default: HOOKLINE_PUBLIC_URL)")
    submit.add_argument("--key", help="API key (default: HOOKLINE_API_KEY)")
    submit.add_argument("--wait", action="store_true", help="follow the task live to its end")
    submit.set_defaults(func=cmd_submit)

    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code: int = args.func(Settings(), args)
    except HooklineError as exc:
        print(f"error: {exc.message} ({exc.code})", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
