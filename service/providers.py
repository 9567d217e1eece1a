"""The providers a process can use, built from settings around one shared HTTP client."""

from __future__ import annotations

from dataclasses import fields

import httpx

from callbacks.bfl import BflProvider
from callbacks.fal import FalProvider
from callbacks.provider import Provider
from callbacks.replicate import ReplicateProvider
from callbacks.simulator.config import DEFAULT_API_TOKEN, DEFAULT_REORDER_WITH_DELAY, SimConfig
from service.settings import Settings

# The built-in simulator speaks Replicate's contract under ``/sim/v1`` and accepts the token
# SimConfig accepts by default.
SIM_API_TOKEN = DEFAULT_API_TOKEN
SIM_PATH = "/sim/v1"

# Hosts each provider serves outputs from (used when HOOKLINE_OUTPUT_HOSTS is unset).
# Replicate: replicate.delivery (PROVIDERS.md); older outputs used subdomains such as
# pbxt.replicate.delivery. fal: fal.media and its versioned subdomains (v2, v3, v3b) as seen in
# fal answers. BFL: PROVIDERS.md names none; these are the delivery hosts seen in BFL answers
# (regional delivery-*.bfl.ai and the Azure blob host of older results); the list may be
# incomplete, so set HOOKLINE_OUTPUT_HOSTS if BFL answers with another host.
_OUTPUT_HOSTS: dict[str, tuple[str, ...]] = {
    "replicate": ("replicate.delivery", "pbxt.replicate.delivery"),
    "fal": ("fal.media", "v2.fal.media", "v3.fal.media", "v3b.fal.media"),
    "bfl": (
        "delivery-eu1.bfl.ai",
        "delivery-us1.bfl.ai",
        "delivery-eu.bfl.ai",
        "delivery-us.bfl.ai",
        "bfldeliverysc.blob.core.windows.net",
    ),
}


def sim_config(settings: Settings, **overrides: object) -> SimConfig:
    """The simulator's behaviour from the ``sim_*`` settings; ``overrides`` set any other
    SimConfig field (``TypeError`` for a name SimConfig does not have). A configured webhook
    delay also makes a share of the predictions send a stale webhook after the terminal one."""
    values: dict[str, object] = {
        "latency": settings.sim_latency,
        "time_scale": settings.sim_time_scale,
        "failure_rate": settings.sim_failure_rate,
        "webhook_loss": settings.sim_webhook_loss,
        "webhook_duplicate": settings.sim_webhook_duplicate,
        "webhook_delay_s": settings.sim_webhook_delay_s,
        "webhook_reorder": DEFAULT_REORDER_WITH_DELAY if settings.sim_webhook_delay_s else 0.0,
        "webhook_bad_signature": settings.sim_webhook_bad_signature,
        "output_5xx": settings.sim_output_5xx,
        "seed": settings.sim_seed,
    }
    unknown = set(overrides) - {f.name for f in fields(SimConfig)}
    if unknown:
        raise TypeError(f"unknown SimConfig fields: {sorted(unknown)}")
    values.update(overrides)
    return SimConfig(**values)  # type: ignore[arg-type]


def sim_base_url_for(settings: Settings) -> str:
    """Where the app mounts the simulator: ``{public_url}/sim/v1``."""
    return settings.public_url.rstrip("/") + SIM_PATH


def build_providers(
    settings: Settings,
    http: httpx.AsyncClient,
    *,
    sim_base_url: str | None = None,
    sim_secret: str | None = None,
    sim_token: str = SIM_API_TOKEN,
) -> dict[str, Provider]:
    """One provider per configured name (replicate with a token, fal with a key, bfl with a key)
    plus, when ``sim_base_url`` is given (the simulator is mounted, usually at
    ``sim_base_url_for(settings)``), ``"sim"``: a ReplicateProvider pointed at it. Its webhook
    secret is ``sim_secret`` when the caller knows it, else fetched from the simulator's
    ``/webhooks/default/secret`` on first use."""
    providers: dict[str, Provider] = {}
    if sim_base_url is not None:
        providers["sim"] = ReplicateProvider(
            http, api_token=sim_token, base_url=sim_base_url, webhook_secret=sim_secret, name="sim"
        )
    if settings.replicate_api_token is not None:
        secret = settings.replicate_webhook_secret
        providers["replicate"] = ReplicateProvider(
            http,
            api_token=settings.replicate_api_token.get_secret_value(),
            base_url=settings.replicate_base_url,
            webhook_secret=secret.get_secret_value() if secret is not None else None,
        )
    if settings.fal_key is not None:
        providers["fal"] = FalProvider(
            http,
            key=settings.fal_key.get_secret_value(),
            base_url=settings.fal_base_url,
            jwks_url=settings.fal_jwks_url,
        )
    if settings.bfl_api_key is not None:
        providers["bfl"] = BflProvider(
            http, api_key=settings.bfl_api_key.get_secret_value(), base_url=settings.bfl_base_url
        )
    return providers


def default_output_hosts(name: str, *, sim_base_url: str | None = None) -> tuple[str, ...]:
    """Hosts a provider's outputs may be fetched from. The simulator serves its outputs itself,
    so ``"sim"`` gives the ``host:port`` of ``sim_base_url`` (nothing when it is not given)."""
    if name == "sim":
        if sim_base_url is None:
            return ()
        url = httpx.URL(sim_base_url)
        return (f"{url.host}:{url.port}" if url.port else url.host,)
    return _OUTPUT_HOSTS.get(name, ())
