"""Fixtures of the chaos tests: N and the seed from the environment, clusters that never leak."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from tests.chaos.harness import ChaosCluster

DEFAULT_N = 200  # keeps `make test` within its budget; `make chaos` sets HOOKLINE_CHAOS_N=1000


class ClusterFactory(Protocol):
    def __call__(self, root: Path, **kwargs: Any) -> ChaosCluster: ...


@pytest.fixture
def chaos_n() -> int:
    """How many tasks a chaos test submits (``HOOKLINE_CHAOS_N``)."""
    return int(os.environ.get("HOOKLINE_CHAOS_N", DEFAULT_N))


@pytest.fixture
def chaos_seed() -> int:
    """``HOOKLINE_CHAOS_SEED`` to replay a run, else a fresh seed (printed by the test)."""
    raw = os.environ.get("HOOKLINE_CHAOS_SEED")
    return int(raw) if raw else random.SystemRandom().randrange(2**31)


@pytest.fixture
def chaos_cluster() -> Iterator[ClusterFactory]:
    """Build clusters; every child process of every cluster is stopped at teardown."""
    clusters: list[ChaosCluster] = []

    def make(root: Path, **kwargs: Any) -> ChaosCluster:
        cluster = ChaosCluster(root, **kwargs)
        clusters.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in clusters:
            cluster.close()
