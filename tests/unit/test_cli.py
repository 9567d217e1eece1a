"""``hookline serve``'s process tuning (service/cli.py)."""

from __future__ import annotations

import platform

import pytest

from service.cli import M_ARENA_MAX, MALLOC_ARENAS, tune_malloc


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
