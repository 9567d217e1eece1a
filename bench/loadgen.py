"""A small HTTP/1.1 load generator for the benchmarks: pre-built raw requests over keep-alive
connections, one asyncio process (uvloop when installed), per-request latency.

    python -m bench.loadgen --host 127.0.0.1 --port 8000 --concurrency 64 REQUESTS_FILE

``REQUESTS_FILE`` holds raw requests (head and body, exactly as sent) separated by NUL bytes (the
same file ``wrk`` reads through ``bench/bench_http.py``'s Lua script). Each request is sent once, by
whichever connection is free. Prints one JSON object: ``{"requests", "errors", "statuses",
"elapsed_s", "rps", "p50_ms", "p90_ms", "p99_ms", "max_ms"}``.

httpx would measure itself: its per-request cost is several times the server's. This client does
the least a client can (write bytes, read a head, read Content-Length bytes) so that on a small
machine the CPU goes to the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

SEPARATOR = b"\0"


def load_requests(path: Path) -> list[bytes]:
    return [r for r in path.read_bytes().split(SEPARATOR) if r]


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (``q`` in 0–100)."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values)) - 1))
    return sorted_values[rank]


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one response; return its status. Bodies are framed by Content-Length (all the
    benchmarked routes answer that way)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
            break
    if length:
        await reader.readexactly(length)
    return status


async def run(host: str, port: int, requests: list[bytes], concurrency: int) -> dict[str, Any]:
    """Send every request once over ``concurrency`` connections; the summary."""
    queue = iter(requests)
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    errors = 0

    async def connection() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for raw in queue:
                started = time.perf_counter()
                try:
                    writer.write(raw)
                    status = await _read_response(reader)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    errors += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
                    continue
                latencies.append(time.perf_counter() - started)
                statuses[status] += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    ms = [x * 1000 for x in latencies]
    return {
        "requests": len(latencies),
        "errors": errors,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "elapsed_s": round(elapsed, 3),
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(ms, 50), 2),
        "p90_ms": round(percentile(ms, 90), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "max_ms": round(ms[-1], 2) if ms else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("requests_file", type=Path)
    args = p.parse_args(argv)
    requests = load_requests(args.requests_file)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvicorn[standard] brings uvloop
        pass
    result = asyncio.run(run(args.host, args.port, requests, args.concurrency))
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
