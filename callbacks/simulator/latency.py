"""Latency models of the simulated provider: how long one generation takes, in simulated seconds.

Every model samples from an injected ``random.Random`` so a seeded simulator is reproducible.
``parse_latency`` turns the spec strings of ``HOOKLINE_SIM_LATENCY`` into a model:

    fixed:S               always S seconds
    uniform:A:B           uniformly in [A, B]
    lognormal:MU:SIGMA    exp(N(MU, SIGMA)) seconds (MU and SIGMA of the log of seconds)
    seed                  the mix the seed write-up measured: 60 % in [10, 40), 25 % in [40, 60),
                          15 % in [60, 120]
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Protocol


class LatencyModel(Protocol):
    """A distribution of generation times in (unscaled) seconds."""

    def sample(self, rng: random.Random) -> float:
        """One latency in seconds, never negative."""
        ...


@dataclass(frozen=True, slots=True)
class Fixed:
    seconds: float

    def sample(self, rng: random.Random) -> float:
        return self.seconds


@dataclass(frozen=True, slots=True)
class Uniform:
    low_s: float
    high_s: float

    def sample(self, rng: random.Random) -> float:
        return rng.uniform(self.low_s, self.high_s)


@dataclass(frozen=True, slots=True)
class LogNormal:
    mu: float
    sigma: float

    def sample(self, rng: random.Random) -> float:
        return rng.lognormvariate(self.mu, self.sigma)


@dataclass(frozen=True, slots=True)
class Band:
    """``weight`` of the samples fall uniformly in [low_s, high_s) (closed if ``closed``)."""

    weight: float
    low_s: float
    high_s: float
    closed: bool = False


@dataclass(frozen=True, slots=True)
class Mixture:
    """Pick a band by weight, then a uniform time inside it."""

    bands: tuple[Band, ...]

    def sample(self, rng: random.Random) -> float:
        pick = rng.random() * sum(b.weight for b in self.bands)
        for band in self.bands:
            if pick < band.weight:
                break
            pick -= band.weight
        if band.closed:
            return rng.uniform(band.low_s, band.high_s)
        # random() is in [0, 1), so the upper bound of a half-open band is never reached
        return band.low_s + (band.high_s - band.low_s) * rng.random()


# The seed write-up: 60 % finish under 40 s (none under 10 s), 25 % in 40-60 s, 15 % over 60 s.
SEED_MIX = Mixture(
    bands=(
        Band(0.60, 10.0, 40.0),
        Band(0.25, 40.0, 60.0),
        Band(0.15, 60.0, 120.0, closed=True),
    )
)

_SPEC_HELP = "expected fixed:S, uniform:A:B, lognormal:MU:SIGMA or seed"


def parse_latency(spec: str) -> LatencyModel:
    """Parse a latency spec; raise ``ValueError`` naming the spec and the expected forms."""
    kind, *args = spec.strip().lower().split(":")
    try:
        numbers = [float(a) for a in args]
    except ValueError:
        raise ValueError(f"bad latency spec {spec!r}: arguments must be numbers") from None
    if any(not math.isfinite(n) for n in numbers):
        raise ValueError(f"bad latency spec {spec!r}: arguments must be finite")
    match kind, numbers:
        case "fixed", [seconds] if seconds >= 0:
            return Fixed(seconds)
        case "uniform", [low, high] if 0 <= low <= high:
            return Uniform(low, high)
        case "lognormal", [mu, sigma] if sigma >= 0:
            return LogNormal(mu, sigma)
        case "seed", []:
            return SEED_MIX
        case (("fixed" | "uniform" | "lognormal" | "seed"), _):
            raise ValueError(
                f"bad latency spec {spec!r}: wrong arguments for {kind!r} "
                f"(seconds must be >= 0, A <= B, SIGMA >= 0); {_SPEC_HELP}"
            )
    raise ValueError(f"bad latency spec {spec!r}: unknown model {kind!r}; {_SPEC_HELP}")
