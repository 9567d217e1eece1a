"""``hookline serve``'s process tuning (service/cli.py)."""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import pytest

from service.cli import M_ARENA_MAX, MALLOC_ARENAS, tune_malloc
from service.settings import Settings


class _Libc:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1


def test_serve_limits_the_c_librarys_arenas_unless_the_operator_did(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    libc = _Libc()
    assert tune_malloc(libc) and libc.calls == [(M_ARENA_MAX, MALLOC_ARENAS)]
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert not tune_malloc(libc) and len(libc.calls) == 1
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4")
    assert not tune_malloc(libc) and len(libc.calls) == 1
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert not tune_malloc(object())  # no mallopt (macOS): nothing to do, no error
    if platform.libc_ver()[0] == "glibc":
        assert tune_malloc()  # this machine's own C library takes it


def test_serve_limits_the_arenas_before_it_builds_the_app(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``hookline serve`` sets the arena limit before anything that may start a thread: an arena
    made before it stays (here the app refuses to start, after the limit was set)."""
    import service.cli as cli

    calls: list[str] = []
    monkeypatch.setattr(cli, "tune_malloc", lambda: calls.append("tune_malloc") or True)
    monkeypatch.setattr(cli, "tune_gc", lambda: calls.append("tune_gc"))
    settings = Settings(_env_file=None, var_dir=tmp_path)  # type: ignore[call-arg]
    args = argparse.Namespace(host=None, port=None, roles=None, demo=False)
    assert cli.cmd_serve(settings, args) == 2  # the simulator is off: refused before serving
    assert calls == ["tune_malloc"]
