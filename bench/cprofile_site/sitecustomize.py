"""A deterministic profile of ``hookline serve``'s event-loop thread under bench_e2e:

    BENCH_SITE_DIR=bench/cprofile_site BENCH_CPROFILE_OUT=/tmp/loop.prof \
        python -m bench.bench_e2e ...
    python -m pstats /tmp/loop.prof.<pid>      # one file per serve process

Python runs this file at start-up in every process the bench starts (``BENCH_SITE_DIR`` is put
first on their ``PYTHONPATH``); it acts only in a ``serve`` process, and only with
``BENCH_CPROFILE_OUT`` set. cProfile follows the thread that enabled it, the main one, which
runs the event loop; its stats are written every 3 s (the bench stops hookline with a signal,
so there is no exit to write them at). cProfile slows Python code about threefold and C code
not at all: read shares, not times, and never next to a run without it. Not part of hookline.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

OUT = os.environ.get("BENCH_CPROFILE_OUT")  # one file per process: OUT.<pid>

if OUT and "serve" in sys.argv:
    import cProfile

    _profile = cProfile.Profile()

    def _write(*_: object) -> None:  # on the main thread: signal handlers run there
        _profile.disable()
        _profile.dump_stats(f"{OUT}.{os.getpid()}")
        _profile.enable()

    def _tick() -> None:
        while True:
            time.sleep(3)
            os.kill(os.getpid(), signal.SIGUSR2)

    signal.signal(signal.SIGUSR2, _write)
    threading.Thread(target=_tick, daemon=True, name="cprofile-writer").start()
    _profile.enable()
