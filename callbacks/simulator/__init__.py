"""A fake AI provider speaking Replicate's predictions contract, with configurable latency and
faults. ``create_simulator_app`` builds the ASGI app, ``run_simulator`` serves it standalone."""

from callbacks.simulator.app import (
    Prediction,
    SimStats,
    Simulator,
    create_simulator_app,
    run_simulator,
)
from callbacks.simulator.config import SimConfig, parse_latency

__all__ = [
    "Prediction",
    "SimConfig",
    "SimStats",
    "Simulator",
    "create_simulator_app",
    "parse_latency",
    "run_simulator",
]
