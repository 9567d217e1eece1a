"""The providers a process can use, built from settings around one shared HTTP client, and the
built-in simulator's configuration.

The simulator is a development tool (issue 13): it runs only when the operator asks
(``hookline serve --demo`` or ``HOOKLINE_SIMULATOR=true``; ``hookline simulator`` standalone), with
a random API token per start unless ``HOOKLINE_SIM_API_TOKEN`` sets one, posting webhooks only to
this hookline (the host:port of ``HOOKLINE_PUBLIC_URL``) and ``HOOKLINE_SIM_WEBHOOK_HOSTS``, and
fetching URL inputs only through the SSRF-safe fetcher, allowed hookline's own hosts (its public
URL, its S3 blob host) and ``HOOKLINE_INPUT_HOSTS``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import fields

import httpx
from pydantic import SecretStr

from callbacks.bfl import BflProvider
from callbacks.dashscope import DashScopeProvider
from callbacks.fal import FalProvider
from callbacks.hunyuan import HunyuanProvider
from callbacks.kling import KlingProvider
from callbacks.openai import OpenAiProvider
from callbacks.provider import Provider, Quota
from callbacks.replicate import ReplicateProvider
from callbacks.seedream import SeedreamProvider
from callbacks.simulator import FetchInput, InputImageError
from callbacks.simulator.config import (
    DEFAULT_REORDER_WITH_DELAY,
    SimConfig,
    generate_api_token,
)
from service.blobs.s3 import split_endpoint
from service.media.fetch import FetchError, SafeFetcher
from service.settings import Settings
from service.steps.pacing import Pacing

# Providers whose webhooks are configured once per account or project, not per request: they
# arrive at ``/v1/callbacks/<provider>`` without a task in the URL, authenticated by their
# signature alone, and name a job that is mapped to its task through the stored job id.
PROJECT_WEBHOOKS: frozenset[str] = frozenset({"openai"})

# The built-in simulator speaks Replicate's contract under ``/sim/v1``.
SIM_PATH = "/sim/v1"
SIM_INPUT_FETCH_TIMEOUT_S = 30.0


class SimulatorOff(ValueError):
    """The "sim" provider is the default but the simulator is not switched on."""


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
    # OpenAI answers with the image itself: nothing to download.
    # DashScope: its result buckets on Alibaba OSS (Beijing, Singapore, Ulanqab), as seen in
    # answers. Kling: cdn.klingai.com as seen in answers, h1.inkwai.com in its docs. Hunyuan's
    # and Seedream's result hosts (Tencent COS, Volcengine TOS pre-signed URLs) are not
    # documented: set HOOKLINE_OUTPUT_HOSTS from a real answer.
    "dashscope": (
        "dashscope-result-bj.oss-cn-beijing.aliyuncs.com",
        "dashscope-result-sgp.oss-ap-southeast-1.aliyuncs.com",
        "dashscope-result-wlcb.oss-cn-wulanchabu.aliyuncs.com",
    ),
    "kling": ("cdn.klingai.com", "h1.inkwai.com"),
    "seedream": ("ark-content-generation-v2-cn-beijing.tos-cn-beijing.volces.com",),
}


def require_simulator(settings: Settings) -> None:
    """``SimulatorOff`` when the default provider is "sim" but the simulator is off: saying so at
    start-up beats accepting tasks that can only fail."""
    if settings.provider == "sim" and not settings.simulator:
        raise SimulatorOff(
            'HOOKLINE_PROVIDER is "sim" (the default), but the simulator is off: it is a '
            "development tool, run only when asked. Start it with `hookline serve --demo` (what "
            "`make run` does) or HOOKLINE_SIMULATOR=true, or set HOOKLINE_PROVIDER to replicate, "
            "fal or bfl with that provider's credentials."
        )


def with_sim_token(settings: Settings) -> Settings:
    """``settings`` with the simulator's API token fixed for this start: ``sim_api_token`` when
    set, else a fresh random one, so the simulator and the "sim" provider agree on it."""
    if settings.sim_api_token is not None:
        return settings
    return settings.model_copy(update={"sim_api_token": SecretStr(generate_api_token())})


def _host_port(url: str) -> str:
    """``host:port`` of ``url`` as allow-lists write it (``[v6]:port``; default ports filled)."""
    parsed = httpx.URL(url)
    host = parsed.raw_host.decode("ascii").lower()
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def sim_webhook_hosts(settings: Settings) -> frozenset[str]:
    """Where the simulator may post webhooks: its own hookline and ``sim_webhook_hosts``."""
    return frozenset({_host_port(settings.public_url), *settings.sim_webhook_host_set()})


def sim_input_hosts(settings: Settings) -> frozenset[str]:
    """Hosts the simulator may fetch URL inputs from, whatever they resolve to: hookline's own
    signed URLs (its public URL; with S3 blobs, the host presigned URLs name) and
    ``input_hosts``. Any other host must be public https, as for hookline's own fetches."""
    hosts = {_host_port(settings.public_url), *settings.input_host_set()}
    endpoint = settings.s3_public_endpoint or settings.s3_endpoint
    if settings.blob_url.startswith("s3://") and endpoint:
        hosts.add(split_endpoint(endpoint, default_secure=settings.s3_secure)[0])
    return frozenset(hosts)


def sim_input_fetcher(settings: Settings) -> SafeFetcher:
    """The SSRF-safe fetcher behind the simulator's URL inputs (its own HTTP client: close it
    with ``aclose``)."""
    return SafeFetcher(
        None,
        allow_hosts=sim_input_hosts(settings),
        max_bytes=settings.max_upload_bytes,
        timeout_s=SIM_INPUT_FETCH_TIMEOUT_S,
    )


def fetch_input_through(fetcher: SafeFetcher) -> FetchInput:
    """The simulator's ``fetch_input`` over ``fetcher``: a refused or failed fetch becomes the
    ``InputImageError`` that fails the prediction (its message names the host, not the URL)."""

    async def fetch_input(url: str) -> bytes:
        try:
            return (await fetcher.fetch(url)).data
        except FetchError as exc:
            raise InputImageError(f"{exc.message} ({exc.code})") from exc

    return fetch_input


def sim_config(settings: Settings, **overrides: object) -> SimConfig:
    """The simulator's behaviour from the ``sim_*`` settings; ``overrides`` set any other
    SimConfig field (``TypeError`` for a name SimConfig does not have). A configured webhook
    delay also makes a share of the predictions send a stale webhook after the terminal one.
    The API token is ``sim_api_token`` (random when unset: see ``with_sim_token``); webhooks
    may go to ``sim_webhook_hosts(settings)``."""
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
        "webhook_hosts": sim_webhook_hosts(settings),
    }
    if settings.sim_api_token is not None:
        values["api_token"] = settings.sim_api_token.get_secret_value()
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
    sim_token: str | None = None,
) -> dict[str, Provider]:
    """One provider per configured name (replicate with a token, fal with a key, bfl with a key)
    plus, when ``sim_base_url`` is given (the simulator is mounted, usually at
    ``sim_base_url_for(settings)``), ``"sim"``: a ReplicateProvider pointed at it, sending the
    simulator's token (``sim_token``, else ``settings.sim_api_token``; ``ValueError`` when
    neither is known). Its webhook secret is ``sim_secret`` when the caller knows it, else
    fetched from the simulator's ``/webhooks/default/secret`` on first use."""
    providers: dict[str, Provider] = {}
    if sim_base_url is not None:
        if sim_token is None and settings.sim_api_token is not None:
            sim_token = settings.sim_api_token.get_secret_value()
        if sim_token is None:
            raise ValueError("the sim provider needs the simulator's API token")
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
            user_id=settings.fal_user_id,
        )
    if settings.bfl_api_key is not None:
        providers["bfl"] = BflProvider(
            http, api_key=settings.bfl_api_key.get_secret_value(), base_url=settings.bfl_base_url
        )
    if settings.openai_api_key is not None:
        secret = settings.openai_webhook_secret
        providers["openai"] = OpenAiProvider(
            http,
            api_key=settings.openai_api_key.get_secret_value(),
            webhook_secret=secret.get_secret_value() if secret is not None else None,
            base_url=settings.openai_base_url,
            responses_model=settings.openai_responses_model,
        )
    if settings.dashscope_api_key is not None:
        providers["dashscope"] = DashScopeProvider(
            http,
            api_key=settings.dashscope_api_key.get_secret_value(),
            base_url=settings.dashscope_base_url,
        )
    if settings.kling_access_key is not None and settings.kling_secret_key is not None:
        providers["kling"] = KlingProvider(
            http,
            access_key=settings.kling_access_key.get_secret_value(),
            secret_key=settings.kling_secret_key.get_secret_value(),
            base_url=settings.kling_base_url,
        )
    if settings.hunyuan_secret_id is not None and settings.hunyuan_secret_key is not None:
        providers["hunyuan"] = HunyuanProvider(
            http,
            secret_id=settings.hunyuan_secret_id.get_secret_value(),
            secret_key=settings.hunyuan_secret_key.get_secret_value(),
            base_url=settings.hunyuan_base_url,
            region=settings.hunyuan_region,
        )
    if settings.seedream_api_key is not None:
        providers["seedream"] = SeedreamProvider(
            http,
            api_key=settings.seedream_api_key.get_secret_value(),
            base_url=settings.seedream_base_url,
        )
    return providers


def build_pacing(
    settings: Settings, providers: Mapping[str, Provider], *, now: Callable[[], float]
) -> Pacing:
    """The process's pacing: each adapter's published quota unless ``provider_quotas`` replaces
    it, the in-flight cap from ``provider_concurrency``."""
    overrides = {
        name: Quota(q.submits_per_s, q.polls_per_s, q.concurrency)
        for name, q in settings.provider_quotas.items()
    }
    return Pacing(
        providers, overrides=overrides, concurrency=settings.provider_concurrency, now=now
    )


def default_output_hosts(name: str, *, sim_base_url: str | None = None) -> tuple[str, ...]:
    """Hosts a provider's outputs may be fetched from. The simulator serves its outputs itself,
    so ``"sim"`` gives the ``host:port`` of ``sim_base_url`` (nothing when it is not given)."""
    if name == "sim":
        if sim_base_url is None:
            return ()
        url = httpx.URL(sim_base_url)
        return (f"{url.host}:{url.port}" if url.port else url.host,)
    return _OUTPUT_HOSTS.get(name, ())
