"""The benchmark figures (matplotlib, Agg backend): ``python -m bench.plots [--quick]`` measures
and draws the throughput curve; the delay plot is drawn by bench/seed_compare.py.

- ``bench/delay_distribution.png``: the delay beyond the AI's own time, per task, as a CDF on a
  log scale, for the seed's architecture and hookline, with and without webhook loss.
- ``bench/throughput_vs_concurrency.png``: ``POST /v1/tasks`` throughput and p99 latency against
  1, 4, 16 and 64 client connections on ``hookline serve --roles api`` (the server and fixtures of
  bench/bench_http.py, the load generator bench/loadgen.py).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after use(): the backend is chosen first

HERE = Path(__file__).resolve().parent
DELAY_PNG = HERE / "delay_distribution.png"
THROUGHPUT_PNG = HERE / "throughput_vs_concurrency.png"
CONCURRENCY = (1, 4, 16, 64)
STYLE = {
    "seed": {"color": "#c0392b", "label": "seed architecture (model)"},
    "hookline": {"color": "#1f6fb2", "label": "hookline"},
}


SCENARIOS = {"no_loss": "no faults", "webhook_loss_5pct": "5 % of webhooks lost"}


def delay_distribution(
    delays: Mapping[str, Sequence[float]], path: Path, *, time_scale: float, tasks: int
) -> None:
    """CDF of the delays of succeeded tasks over all ``tasks`` (a curve ends at the final success
    rate); keys are ``{scenario}.{arch}`` (``no_loss.seed`` …)."""
    fig, ax = plt.subplots(figsize=(9, 5.2), dpi=120)
    floor = 1e-3  # a delay is plotted at least at 1 ms (log axis)
    for key in sorted(delays, key=lambda k: (not k.startswith("no_loss"), k)):
        values = sorted(max(floor, v) for v in delays[key])
        if not values:
            continue
        scenario, arch = key.rsplit(".", 1)
        style = STYLE.get(arch, {"color": "grey", "label": arch})
        lossy = scenario != "no_loss"
        label = style["label"] + ", " + SCENARIOS.get(scenario, scenario.replace("_", " "))
        ys = [(i + 1) / tasks * 100 for i in range(len(values))]
        ax.step(
            values, ys, where="post", color=style["color"], linestyle="--" if lossy else "-",
            linewidth=1.4 if lossy else 2.2, label=f"{label} ({len(values):,} completed)",
        )  # fmt: skip
    ax.set_xscale("log")
    ax.axvline(1.0, color="#1f6fb2", linestyle=":", linewidth=1)
    ax.text(1.05, 3, "hookline goal ≤ 1 s", color="#1f6fb2", fontsize=8)
    for seconds, text in ((60, "1 min"), (600, "10 min")):
        ax.axvline(seconds, color="grey", linestyle=":", linewidth=0.8)
        ax.text(seconds * 1.05, 3, text, color="grey", fontsize=8)
    ax.set_xlabel("delay beyond the AI's own generation time, real-world seconds (log scale)")
    ax.set_ylabel(f"tasks completed with at most this delay (% of {tasks:,})")
    ax.set_ylim(0, 101)
    ax.set_title(
        "Delay beyond the AI's own time, per task (CDF)\n"
        f"simulated with the seed's latency mix, time × {time_scale:.4g}, converted back",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="center", bbox_to_anchor=(0.45, 0.42), fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def throughput_figure(points: Sequence[Mapping[str, float]], path: Path) -> None:
    """Requests/s (bars) and p99 latency (line) per client concurrency."""
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    labels = [str(int(p["concurrency"])) for p in points]
    bars = ax.bar(labels, [p["rps"] for p in points], color="#1f6fb2", alpha=0.85)
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.axhline(2000, color="#1f6fb2", linestyle=":", linewidth=1)
    ax.text(-0.4, 2030, "goal ≥ 2,000 tasks/s (at 64 clients)", color="#1f6fb2", fontsize=8)
    ax.set_xlabel("concurrent client connections (keep-alive)")
    ax.set_ylabel("POST /v1/tasks per second", color="#1f6fb2")
    ax2 = ax.twinx()
    ax2.plot(labels, [p["p99_ms"] for p in points], color="#c0392b", marker="o", label="p99")
    ax2.plot(labels, [p["p50_ms"] for p in points], color="#e67e22", marker=".", label="p50")
    ax2.axhline(50, color="#c0392b", linestyle=":", linewidth=1)
    ax2.set_ylabel("latency (ms); goal p99 ≤ 50 ms", color="#c0392b")
    ax2.set_ylim(0, max(60.0, 1.6 * max(p["p99_ms"] for p in points)))  # clear of the bar labels
    ax2.legend(loc="upper left", fontsize=8)
    ax.set_title(
        "Task creation vs client concurrency\n"
        "hookline serve --roles api, SQLite, one process; load generator bench/loadgen.py",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _load(port: int, requests: list[bytes], concurrency: int, workdir: Path) -> dict[str, float]:
    separator: bytes = importlib.import_module("bench.loadgen").SEPARATOR
    path = workdir / f"requests-c{concurrency}.bin"
    path.write_bytes(separator.join(requests) + separator)
    cmd = [sys.executable, "-m", "bench.loadgen", "--port", str(port)]
    cmd += ["--concurrency", str(concurrency), str(path)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=HERE.parent).stdout
    path.unlink()
    result: dict[str, float] = json.loads(out)
    return result


def throughput_vs_concurrency(quick: bool) -> dict[str, float]:
    """Measure the curve (each request sent once; a warm-up first) and draw it."""
    # imported by name: bench_http.py is another engineer's module, still changing
    bench_http = importlib.import_module("bench.bench_http")
    per_level = 600 if quick else 3000
    points: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="hookline-bench-curve-") as tmp:
        workdir = Path(tmp)
        key = asyncio.run(bench_http.prepare_store(workdir, 0))
        with bench_http.server(workdir, "api") as port:
            upload = bench_http.upload_one(port, key)
            warm = bench_http.create_requests(port, key, upload, min(500, per_level), "warm")
            _load(port, warm, 16, workdir)
            for c in CONCURRENCY:
                requests = bench_http.create_requests(port, key, upload, per_level, f"c{c}")
                result = _load(port, requests, c, workdir)
                points.append({"concurrency": float(c), **_numbers(result)})
    throughput_figure(points, THROUGHPUT_PNG)
    figures: dict[str, float] = {}
    for p in points:
        c = int(p["concurrency"])
        figures[f"create_rps_c{c}"] = p["rps"]
        figures[f"create_p50_ms_c{c}"] = p["p50_ms"]
        figures[f"create_p99_ms_c{c}"] = p["p99_ms"]
        figures[f"create_errors_c{c}"] = p["errors"] + sum(
            v for k, v in p.items() if k.startswith("status_") and not k.startswith("status_2")
        )
    return figures


def _numbers(result: Mapping[str, object]) -> dict[str, float]:
    numbers = {k: float(v) for k, v in result.items() if isinstance(v, int | float)}
    statuses = result.get("statuses")
    if isinstance(statuses, dict):
        numbers.update({f"status_{k}": float(v) for k, v in statuses.items()})
    return numbers


def run(quick: bool) -> dict[str, float]:
    """The throughput curve as a benchmark (bench/run.py runs it as ``plots``)."""
    return throughput_vs_concurrency(quick)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plots", description=__doc__)
    p.add_argument("--quick", action="store_true", help="600 requests per level")
    args = p.parse_args(argv)
    for name, value in run(args.quick).items():
        print(f"{name}: {value:,.2f}")
    print(f"wrote {THROUGHPUT_PNG}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
