"""SECURITY.md names, for every defence, the test that proves it: those tests and files exist (a
renamed or deleted test must not leave the page claiming a proof that is gone)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = (ROOT / "SECURITY.md").read_text()


def test_every_file_the_page_names_exists() -> None:
    paths = set(re.findall(r"`((?:tests|service|callbacks|statemachine|bench)/[\w/.]+\.py)", PAGE))
    assert paths, "the page names no files"
    missing = sorted(p for p in paths if not (ROOT / p).is_file())
    assert missing == []


def test_every_test_the_page_names_exists() -> None:
    names = set(re.findall(r"\b(test_[a-z0-9_]+)\b", PAGE))
    sources = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    defined = set(re.findall(r"def (test_[a-z0-9_]+)", sources))
    modules = {p.stem for p in (ROOT / "tests").rglob("test_*.py")}
    missing = sorted(n for n in names if n not in defined and n not in modules)
    assert missing == []
