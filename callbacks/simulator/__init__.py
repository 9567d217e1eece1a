"""A fake AI provider speaking Replicate's predictions contract, with configurable latency and
faults: a development tool. ``Simulator`` (engine.py) runs the predictions; ``create_simulator_app``
(app.py) builds the ASGI app around one, ``run_simulator`` serves it standalone."""

from callbacks.simulator.app import create_simulator_app, run_simulator
from callbacks.simulator.config import SimConfig, parse_latency
from callbacks.simulator.engine import FetchInput, Prediction, SimStats, Simulator
from callbacks.simulator.images import InputImageError

__all__ = [
    "FetchInput",
    "InputImageError",
    "Prediction",
    "SimConfig",
    "SimStats",
    "Simulator",
    "create_simulator_app",
    "parse_latency",
    "run_simulator",
]
