"""``hookline users create --rate --burst`` and ``users limits`` on a real SQLite file: limits are
checked before anything is written (a bad value exits 2 and creates no user), stored with the
user, shown in the output, and an omitted one is the process's default."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from service.cli import main
from service.http.auth import hash_key
from service.settings import Settings
from statemachine.sqlite_store import SqliteStore
from statemachine.store import User

DEFAULT_RATE = Settings.model_fields["rate_limit_per_s"].default
DEFAULT_BURST = Settings.model_fields["rate_limit_burst"].default


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The database the CLI uses (HOOKLINE_STORE_URL), with no .env or other settings around."""
    monkeypatch.chdir(tmp_path)
    for name in ("HOOKLINE_RATE_LIMIT_PER_S", "HOOKLINE_RATE_LIMIT_BURST"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "hookline.db"
    monkeypatch.setenv("HOOKLINE_STORE_URL", f"sqlite:///{path}")
    monkeypatch.setenv("HOOKLINE_VAR_DIR", str(tmp_path / "var"))
    return path


def stored(path: Path, name: str | None = None, *, key: str | None = None) -> User | None:
    """The user named ``name`` (or holding ``key``) as the database has it now."""

    async def read() -> User | None:
        store = SqliteStore(path)
        await store.open()
        try:
            if key is not None:
                return await store.user_by_key_hash(hash_key(key))
            assert name is not None
            return await store.get_user(name)
        finally:
            await store.close()

    return asyncio.run(read())


@pytest.mark.parametrize(
    ("flags", "complaint"),
    [
        (["--rate", "-1"], "not a rate"),
        (["--rate", "nan"], "not a rate"),
        (["--rate", "inf"], "not a rate"),
        (["--rate", "fast"], "not a rate"),
        (["--burst", "0"], "not a burst"),
        (["--burst", "2.5"], "not a burst"),
        (["--rate", "5", "--burst", "-3"], "not a burst"),
    ],
)
def test_a_bad_rate_or_burst_exits_2_and_creates_no_user(
    db: Path, capsys: pytest.CaptureFixture[str], flags: list[str], complaint: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["users", "create", "alice", "--credits", "5", *flags])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert complaint in err and ("--rate" in err or "--burst" in err), err
    assert stored(db, "alice") is None


def test_users_create_stores_the_limits_given_and_prints_them(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["users", "create", "alice", "--credits", "5", "--rate", "1.5", "--burst", "3"]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert "rate limit: 1.5/s, burst 3 per API key" in lines
    alice = stored(db, "alice")
    assert alice is not None and (alice.rate_limit_per_s, alice.rate_limit_burst) == (1.5, 3)
    assert alice.balance == 5
    assert stored(db, key=lines[-1]) == alice  # the key is still the last line: scripts read it


def test_an_omitted_rate_or_burst_is_the_process_default(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["users", "create", "bursty", "--burst", "10"]) == 0
    assert f"rate limit: {DEFAULT_RATE:g}/s (default), burst 10 per API key" in (
        capsys.readouterr().out
    )
    assert main(["users", "create", "steady", "--rate", "2"]) == 0
    assert f"rate limit: 2/s, burst {DEFAULT_BURST} (default) per API key" in (
        capsys.readouterr().out
    )
    assert main(["users", "create", "plain"]) == 0
    out = capsys.readouterr().out
    assert f"rate limit: {DEFAULT_RATE:g}/s (default), burst {DEFAULT_BURST} (default)" in out
    assert main(["users", "create", "free", "--rate", "0"]) == 0
    assert "rate limit: none (rate 0/s)" in capsys.readouterr().out
    limits = {}
    for name in ("bursty", "steady", "plain", "free"):
        user = stored(db, name)
        assert user is not None
        limits[name] = (user.rate_limit_per_s, user.rate_limit_burst)
    assert limits == {
        "bursty": (None, 10),
        "steady": (2.0, None),
        "plain": (None, None),
        "free": (0.0, None),
    }


def test_users_limits_replaces_a_users_limits(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["users", "create", "alice", "--rate", "1", "--burst", "3"]) == 0
    assert main(["users", "limits", "alice", "--rate", "20", "--burst", "40"]) == 0
    assert "alice: rate limit: 20/s, burst 40 per API key" in capsys.readouterr().out
    alice = stored(db, "alice")
    assert alice is not None and (alice.rate_limit_per_s, alice.rate_limit_burst) == (20.0, 40)
    assert main(["users", "limits", "alice"]) == 0  # neither given: back to the defaults
    alice = stored(db, "alice")
    assert alice is not None and (alice.rate_limit_per_s, alice.rate_limit_burst) == (None, None)
    with pytest.raises(SystemExit) as exit_:
        main(["users", "limits", "alice", "--burst", "0"])
    assert exit_.value.code == 2
    assert main(["users", "limits", "nobody", "--rate", "1"]) == 1
    assert "user_not_found" in capsys.readouterr().err
