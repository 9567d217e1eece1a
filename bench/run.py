"""Run the benchmarks and write bench/RESULTS.md: ``python -m bench.run [--quick] [--only A,B]``.

Each benchmark module (``bench/NAME.py`` with ``run(quick) -> dict[str, float]``) runs in a child
process, three times (``--quick``: once), inside its own time budget: a run still going when the
budget is spent is interrupted (SIGINT, then SIGKILL to its process group) and the figures of the
runs that finished are kept; no further run starts if the last one would not fit. A module that is
missing, fails or times out is noted and skipped — the run goes on. Figures are the median of the
runs, each shown next to its goal (``GOALS``, from the issues) with a met/missed mark. Nothing here
asserts a time.

RESULTS.md is written in marked sections (``<!-- generated:NAME:begin/end -->``); anything outside
them, such as hand-written notes, is kept as it is.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "RESULTS.md"
TOTAL_BUDGET_S = {False: 25 * 60.0, True: 7 * 60.0}
GRACE_S = 15.0  # after SIGINT, before SIGKILL


@dataclass(frozen=True, slots=True)
class Spec:
    """A benchmark module, its title and its budget (seconds, full and --quick)."""

    name: str
    title: str
    budget_s: float
    quick_budget_s: float
    repeats: int = 3

    def budget(self, quick: bool) -> float:
        return self.quick_budget_s if quick else self.budget_s


BENCHES: tuple[Spec, ...] = (
    Spec("bench_store", "SQLite store: CAS transitions, creation, the overdue query", 120, 15),
    Spec("bench_http", "HTTP: POST /v1/tasks, webhook ingest, webhook→completed", 120, 60),
    Spec("bench_images", "Images: watermark + store, upload decoding", 45, 10),
    Spec("bench_reaper", "Reaper: idle pass, 10,000 overdue tasks", 110, 10),
    Spec("bench_waiting", "What a waiting task costs", 110, 25),
    Spec("bench_polling", "Poll-only providers: waiting, the reaper, the poll quota", 180, 45, 1),
    Spec("bench_sse", "Live progress stream (SSE)", 60, 20),
    Spec("mongo_ops", "MongoDB round trips per task", 15, 5),
    Spec("plots", "Task creation vs client concurrency", 50, 20, repeats=1),
    Spec("seed_compare", "The seed's architecture vs hookline", 420, 90, repeats=1),
    Spec("bench_hostile", "Hostile inputs: bombs, refused requests, large uploads", 90, 35),
    Spec("bench_e2e", "End to end on the real path: starts, webhooks, image work", 150, 75, 1),
)


@dataclass(frozen=True, slots=True)
class Goal:
    """A target for one figure: ``value op target`` (``%`` targets are fractions)."""

    op: Literal["≥", "≤"]
    target: float
    unit: str = ""
    note: str = ""

    def met(self, value: float) -> bool:
        if math.isnan(value):
            return False
        return value >= self.target if self.op == "≥" else value <= self.target

    def describe(self) -> str:
        target = self.target * 100 if self.unit == "%" else self.target
        text = f"{self.op} {number(target)} {self.unit}".strip()
        return f"{text} ({self.note})" if self.note else text


# Goals from the issues, keyed by benchmark and by the metric names the modules return.
GOALS: dict[str, dict[str, Goal]] = {
    "bench_http": {
        "create_rps": Goal("≥", 2000, "tasks/s", "POST /v1/tasks"),
        "create_p99_ms": Goal("≤", 50, "ms"),
        "webhook_rps": Goal("≥", 3000, "deliveries/s", "webhook ingest"),
        "webhook_p99_ms": Goal("≤", 30, "ms"),
        "overhead_p50_ms": Goal("≤", 20, "ms", "webhook → completed"),
    },
    "bench_store": {"cas_transitions_per_s": Goal("≥", 20_000, "/s")},
    "bench_images": {
        "watermark_store_1024_images_per_s_2_threads": Goal("≥", 40, "images/s"),
    },
    "bench_reaper": {
        "idle_pass_ms_median": Goal("≤", 5, "ms", "nothing overdue"),
        "overdue_all_handled_s": Goal("≤", 5, "s", "for 10,000 overdue"),
    },
    "bench_waiting": {
        "process_rss_growth_mb": Goal("≤", 50, "MB", "for 100,000 waiting tasks"),
    },
    "bench_polling": {
        "mem_poll_rss_growth_mb": Goal("≤", 50, "MB", "for 100,000 waiting poll-only tasks"),
        "mem_poll_vs_webhook_stored_bytes_ratio": Goal("≤", 1.1, "", "poll-only / webhook task"),
        "mem_poll_vs_webhook_rss_growth_ratio": Goal("≤", 1.1, "", "poll-only / webhook task"),
        "mem_poll_threads_growth": Goal("≤", 0, "threads"),
        "mem_poll_sockets_growth": Goal("≤", 0, "sockets"),
        "reaper_idle_pass_ms_median": Goal("≤", 5, "ms", "nothing due"),
        "reaper_due_all_handled_s": Goal("≤", 5, "s", "for 10,000 due polls"),
        "quota_max_polls_in_1s_window": Goal("≤", 50, "polls", "50/s, burst 1: any [t, t + 1 s)"),
        "quota_max_polls_in_wall_clock_second": Goal("≤", 50, "polls"),
    },
    "bench_sse": {
        "kb_per_client": Goal("≤", 50, "KB", "server memory per client"),
        "fanout_p99_ms": Goal("≤", 100, "ms", "transition → client"),
    },
    "mongo_ops": {
        "no_event_log.success.total": Goal("≤", 8, "round trips", "per successful task"),
    },
    "plots": {
        "create_rps_c64": Goal("≥", 2000, "tasks/s"),
        "create_p99_ms_c64": Goal("≤", 50, "ms"),
    },
    "bench_hostile": {
        "bomb_rss_growth_mb": Goal("≤", 50, "MB", "fetching 16 GiB bombs"),
        "bomb_pss_growth_mb": Goal("≤", 50, "MB"),
        "normal_task_after_bombs_completed": Goal("≥", 1, "", "the process survived"),
    },
    "bench_e2e": {
        "starts_per_s": Goal("≥", 2500, "tasks/s", "POST /v1/tasks acked, 32 concurrent"),
        "all_waiting_after_last_ack_s": Goal("≤", 2, "s", "all submitted and ai_processing"),
        "completions_per_s": Goal("≥", 1000, "tasks/s", "download, watermark, store included"),
        "callback_to_completed_p50_ms": Goal("≤", 50, "ms"),
        "callback_to_completed_p99_ms": Goal("≤", 250, "ms"),
        "pss_per_waiting_task_kib": Goal("≤", 4, "KiB", "hookline PSS growth"),
        "hookline_cpu_ms_per_task": Goal("≤", 3, "ms", "hookline CPU, both phases"),
        "tasks_not_completed": Goal("≤", 0, "tasks"),
        "outputs_not_stored": Goal("≤", 0, "outputs", "every output watermarked and stored"),
    },
    "seed_compare": {
        "no_loss.hookline.first_try_success_rate": Goal("≥", 0.999, "%"),
        "no_loss.hookline.final_success_rate": Goal("≥", 1.0, "%"),
        "no_loss.hookline.delay_mean_s": Goal("≤", 1.0, "s"),
        "no_loss.hookline.delay_p95_s": Goal("≤", 1.0, "s"),
        "no_loss.hookline.wasted_calls": Goal("≤", 0, "calls"),
        "webhook_loss_5pct.hookline.final_success_rate": Goal("≥", 1.0, "%"),
        "webhook_loss_5pct.hookline.wasted_calls": Goal("≤", 0, "calls"),
        # issue 15: providers without signed webhooks (the poll schedule sets poll-only delays)
        "poll_only.hookline.first_try_success_rate": Goal("≥", 0.999, "%"),
        "poll_only.hookline.final_success_rate": Goal("≥", 1.0, "%"),
        "poll_only.hookline.wasted_calls": Goal("≤", 0, "calls"),
        "trigger.hookline.first_try_success_rate": Goal("≥", 0.999, "%"),
        "trigger.hookline.final_success_rate": Goal("≥", 1.0, "%"),
        "trigger.hookline.delay_mean_s": Goal("≤", 1.0, "s"),
        "trigger.hookline.delay_p95_s": Goal("≤", 1.0, "s"),
        "trigger.hookline.wasted_calls": Goal("≤", 0, "calls"),
    },
}


@dataclass(slots=True)
class Outcome:
    """What became of one benchmark: the median figures of its finished runs, and notes."""

    spec: Spec
    figures: dict[str, float] = field(default_factory=dict)
    runs: list[float] = field(default_factory=list)  # seconds per finished run
    notes: list[str] = field(default_factory=list)


def number(value: float) -> str:
    if math.isnan(value):
        return "—"
    size = abs(value)
    if size >= 1000 or value == int(value):
        return f"{value:,.0f}"
    if size >= 100:
        return f"{value:.0f}"
    if size >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


# --- running -------------------------------------------------------------------------------------


def run_child(name: str, quick: bool, timeout_s: float, log: Path) -> dict[str, float] | str:
    """One run of ``bench.NAME`` in its own process group: its figures, or why there are none."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as out:
        out_path = Path(out.name)
    cmd = [sys.executable, "-m", "bench.run", "--child", name, "--out", str(out_path)]
    cmd += ["--quick"] if quick else []
    with log.open("ab") as sink:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            stop_group(proc)
            return f"interrupted at its budget ({timeout_s:.0f} s)"
    try:
        if code != 0:
            return f"failed (exit {code}): {last_error(log)}"
        figures: dict[str, float] = json.loads(out_path.read_text())
        return figures
    finally:
        out_path.unlink(missing_ok=True)


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT the child's process group (its ``finally`` blocks stop its servers), then kill."""
    for sig, wait_s in ((signal.SIGINT, GRACE_S), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def last_error(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output"


def run_bench(spec: Spec, quick: bool, budget_s: float, logs: Path) -> Outcome:
    """Up to ``repeats`` runs within ``budget_s``; the median of each figure."""
    outcome = Outcome(spec)
    if importlib.util.find_spec(f"bench.{spec.name}") is None:
        outcome.notes.append(f"skipped: bench/{spec.name}.py does not exist (yet)")
        return outcome
    repeats = 1 if quick else spec.repeats
    started = time.monotonic()
    results: list[dict[str, float]] = []
    log = logs / f"{spec.name}.log"
    for attempt in range(repeats):
        remaining = budget_s - (time.monotonic() - started)
        if attempt and outcome.runs and outcome.runs[-1] > remaining:
            outcome.notes.append(f"{attempt} of {repeats} runs: the next would not fit the budget")
            break
        print(f"[bench.run] {spec.name} run {attempt + 1}/{repeats} (≤ {remaining:.0f} s)")
        t0 = time.monotonic()
        result = run_child(spec.name, quick, max(1.0, remaining), log)
        if isinstance(result, str):
            outcome.notes.append(f"run {attempt + 1}: {result} (log: {log})")
            break
        outcome.runs.append(time.monotonic() - t0)
        results.append(result)
    outcome.figures = median_figures(results)
    return outcome


def median_figures(results: Sequence[Mapping[str, float]]) -> dict[str, float]:
    if not results:
        return {}
    names = list(results[0])
    return {n: statistics.median(r[n] for r in results if n in r) for n in names}


def child(name: str, quick: bool, out: Path) -> int:
    module = importlib.import_module(f"bench.{name}")
    figures = {k: float(v) for k, v in module.run(quick).items()}
    out.write_text(json.dumps(figures))
    return 0


# --- RESULTS.md ----------------------------------------------------------------------------------


def begin(name: str) -> str:
    return f"<!-- generated:{name}:begin -->"


def end(name: str) -> str:
    return f"<!-- generated:{name}:end -->"


PREAMBLE = """# hookline benchmark results

Sections between `generated` markers are rewritten by `python -m bench.run` (and the seed section
by `python -m bench.seed_compare`); write notes outside them and they stay.
"""


def write_sections(sections: Mapping[str, str], path: Path = RESULTS) -> None:
    """Replace each named section between its markers, appending sections not yet present."""
    text = path.read_text() if path.exists() else PREAMBLE
    for name, body in sections.items():
        block = f"{begin(name)}\n{body.rstrip()}\n{end(name)}"
        pattern = re.compile(re.escape(begin(name)) + r".*?" + re.escape(end(name)), re.DOTALL)
        found = pattern.search(text)
        first = text.find("<!-- generated:")
        if found:
            text = text[: found.start()] + block + text[found.end() :]
        elif name == "header" and first >= 0:  # the machine and command come first
            text = text[:first] + block + "\n\n" + text[first:]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def machine() -> list[str]:
    meminfo = Path("/proc/meminfo")
    memory = "unknown"
    if meminfo.exists():
        match = re.search(r"MemTotal:\s+(\d+) kB", meminfo.read_text())
        memory = f"{int(match.group(1)) / 1024**2:.1f} GiB" if match else memory
    return [
        f"- cores: {os.cpu_count()}; memory: {memory}",
        f"- Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
        f"{platform.platform()}",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
    ]


def header_section(command: str, outcomes: Sequence[Outcome], quick: bool, took_s: float) -> str:
    lines = ["## Machine and command", "", *machine(), f"- command: `{command}`"]
    lines += [
        f"- {'one run per benchmark (--quick: smaller sizes)' if quick else 'median of 3 runs'}"
        f"; total {took_s:.0f} s. The machine is shared with other test runs: figures are noisy.",
        "",
        "## Goals at a glance (this run)",
        "",
        "| benchmark | figure | value | goal | |",
        "| --- | --- | --- | --- | --- |",
    ]
    for outcome in outcomes:
        goals = GOALS.get(outcome.spec.name, {})
        for metric, goal in goals.items():
            if metric in outcome.figures:
                value = outcome.figures[metric]
                lines.append(
                    f"| {outcome.spec.name} | `{metric}` | {show(value, goal)} | "
                    f"{goal.describe()} | {mark(goal, value)} |"
                )
        if not outcome.figures:
            lines.append(f"| {outcome.spec.name} | — | — | — | {'; '.join(outcome.notes)} |")
    return "\n".join(lines)


def show(value: float, goal: Goal | None) -> str:
    if goal is not None and goal.unit == "%":
        return f"{value * 100:.1f} %"
    return number(value)


def mark(goal: Goal | None, value: float) -> str:
    if goal is None:
        return ""
    return "✅ met" if goal.met(value) else "❌ missed"


def runs_line(outcome: Outcome, quick: bool) -> str:
    spec = outcome.spec
    timing = ", ".join(f"{s:.0f} s" for s in outcome.runs) or "none finished"
    line = (
        f"_Runs: {len(outcome.runs)} ({timing}); budget {spec.budget(quick):.0f} s; "
        f"`python -m bench.{spec.name}{' --quick' if quick else ''}` runs it alone._"
    )
    return "\n\n".join([line, *[f"> {n}" for n in outcome.notes]])


def bench_section(outcome: Outcome, quick: bool) -> str:
    goals = GOALS.get(outcome.spec.name, {})
    lines = [f"## {outcome.spec.title} (`{outcome.spec.name}`)", "", runs_line(outcome, quick), ""]
    if outcome.figures:
        lines += ["| figure | value | goal | |", "| --- | --- | --- | --- |"]
        for metric, value in outcome.figures.items():
            goal = goals.get(metric)
            target = goal.describe() if goal else ""
            lines.append(f"| `{metric}` | {show(value, goal)} | {target} | {mark(goal, value)} |")
    if outcome.spec.name == "plots":
        lines += ["", "![throughput vs concurrency](throughput_vs_concurrency.png)"]
    return "\n".join(lines)


def seed_section(figures: Mapping[str, float], command: str, runs: str = "") -> str:
    from bench import seed_compare

    lines = ["## The seed's architecture vs hookline (`seed_compare`)", ""]
    if runs:
        lines += [runs, ""]
    lines += [f"_Command: `{command}`._", ""]
    lines += [seed_compare.markdown(dict(figures), dict(GOALS["seed_compare"]))]
    lines += ["![delay distribution](delay_distribution.png)"]
    return "\n".join(lines)


def sections(
    outcomes: Sequence[Outcome], quick: bool, command: str, took_s: float
) -> dict[str, str]:
    result = {"header": header_section(command, outcomes, quick, took_s)}
    for outcome in outcomes:
        if outcome.spec.name == "seed_compare":
            runs = runs_line(outcome, quick)
            if outcome.figures:
                result["seed_compare"] = seed_section(outcome.figures, command, runs)
            else:
                result["seed_compare"] = f"## {outcome.spec.title}\n\n{runs}"
        else:
            result[outcome.spec.name] = bench_section(outcome, quick)
    return result


# --- main ----------------------------------------------------------------------------------------


def selected(only: str | None) -> list[Spec]:
    if not only:
        return list(BENCHES)
    wanted = [n.strip() for n in only.split(",") if n.strip()]
    known = {s.name: s for s in BENCHES}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise SystemExit(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(known)}")
    return [known[n] for n in wanted]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="one run each, smaller sizes")
    p.add_argument("--only", help="comma-separated benchmark names, e.g. bench_store,seed_compare")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child, args.quick, args.out)
    specs = selected(args.only)
    command = "python -m bench.run" + " ".join(["", *(argv if argv is not None else sys.argv[1:])])
    total = TOTAL_BUDGET_S[args.quick]
    scale = min(1.0, total / sum(s.budget(args.quick) for s in specs))
    started = time.monotonic()
    outcomes = []
    logs = Path(tempfile.mkdtemp(prefix="hookline-bench-logs-"))  # kept: notes point into it
    print(f"[bench.run] budget {total:.0f} s in all; child output in {logs}")
    for spec in specs:
        budget = spec.budget(args.quick) * scale
        outcome = run_bench(spec, args.quick, budget, logs)
        outcomes.append(outcome)
        for note in outcome.notes:
            print(f"[bench.run] {spec.name}: {note}")
    took = time.monotonic() - started
    write_sections(sections(outcomes, args.quick, command.strip(), took))
    print(f"[bench.run] wrote {RESULTS} in {took:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
