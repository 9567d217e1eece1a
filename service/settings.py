"""Configuration from HOOKLINE_* environment variables (and .env), with embedded defaults."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from callbacks import bfl, dashscope, fal, hunyuan, kling, openai, replicate, seedream
from statemachine.decide import Deadlines

ProviderName = Literal[
    "sim", "replicate", "fal", "bfl", "openai", "dashscope", "kling", "hunyuan", "seedream"
]

# The model the "sim" provider is asked for when nothing names one (the simulator runs any).
SIM_MODEL: Final = "hookline/sim"

# The lifecycle timing settings default to the machine's own defaults.
_DEADLINES: Final = Deadlines()


def split_csv(value: str) -> tuple[str, ...]:
    """The items of a comma-separated setting, stripped, empty ones dropped, in order."""
    return tuple(item for item in (part.strip() for part in value.split(",")) if item)


class ProviderTiming(BaseModel):
    """Timing of one provider (key ``provider``) or one of its models (key ``provider:model``).
    ``expected_latency_s`` alone sets the AI deadline to twice that latency."""

    model_config = ConfigDict(extra="forbid")
    expected_latency_s: float | None = Field(default=None, gt=0)
    ai_deadline_s: float | None = Field(default=None, gt=0)
    ai_hard_cap_s: float | None = Field(default=None, gt=0)
    max_attempts: int | None = Field(default=None, ge=1)
    poll_interval_s: float | None = Field(default=None, gt=0)
    poll_max_interval_s: float | None = Field(default=None, gt=0)


class ProviderQuotaSetting(BaseModel):
    """One provider's request limits (``HOOKLINE_PROVIDER_QUOTAS``), replacing the adapter's
    published defaults: submits and polls per second (0: no limit) and jobs in flight (0: the
    process's ``provider_concurrency``)."""

    model_config = ConfigDict(extra="forbid")
    submits_per_s: float = Field(default=0.0, ge=0)
    polls_per_s: float = Field(default=0.0, ge=0)
    concurrency: int = Field(default=0, ge=0)


class Settings(BaseSettings):
    """Every knob of hookline. Names are the documented environment variables without HOOKLINE_."""

    model_config = SettingsConfigDict(
        env_prefix="HOOKLINE_", env_file=".env", extra="ignore", case_sensitive=False
    )

    # where things live
    store_url: str = "sqlite:///var/hookline.db"
    blob_url: str = "file://var/blobs"
    public_url: str = "http://127.0.0.1:8000"
    host: str = "127.0.0.1"
    port: int = 8000
    secret_key: SecretStr | None = None  # signs file URLs; generated under var/ when unset
    var_dir: Path = Path("var")
    roles: str = "api,dispatcher,reaper"  # comma-separated
    store_timeout_s: float = 5.0  # MongoDB server selection: how long a request waits for it

    # S3 / MinIO
    s3_endpoint: str | None = None
    s3_access_key: SecretStr | None = None
    s3_secret_key: SecretStr | None = None
    s3_secure: bool = True
    s3_region: str | None = None
    s3_public_endpoint: str | None = None

    # providers
    provider: ProviderName = "sim"
    replicate_api_token: SecretStr | None = None
    replicate_base_url: str = replicate.DEFAULT_BASE_URL
    replicate_model: str = "black-forest-labs/flux-schnell"
    replicate_webhook_secret: SecretStr | None = None
    fal_key: SecretStr | None = None
    fal_base_url: str = fal.DEFAULT_BASE_URL
    fal_model: str = "fal-ai/flux/dev"
    fal_jwks_url: str = fal.DEFAULT_JWKS_URL
    # the fal account's user id: a delivery signed for another fal account is refused (unset:
    # the id is not checked, and hookline warns at start-up)
    fal_user_id: str | None = None
    bfl_api_key: SecretStr | None = None
    bfl_base_url: str = bfl.DEFAULT_BASE_URL
    bfl_model: str = "flux-pro-1.1"
    # OpenAI: the Responses API in background mode with the image_generation tool; its webhooks
    # are configured once per project and arrive at /v1/callbacks/openai
    openai_api_key: SecretStr | None = None
    openai_base_url: str = openai.DEFAULT_BASE_URL
    openai_model: str = openai.DEFAULT_MODEL  # the image tool's model
    openai_responses_model: str = openai.DEFAULT_RESPONSES_MODEL  # the model that runs the tool
    openai_webhook_secret: SecretStr | None = None  # whsec_…
    # Alibaba DashScope (Wan), polled; the key is per region, as the base URL is
    dashscope_api_key: SecretStr | None = None
    dashscope_base_url: str = dashscope.DEFAULT_BASE_URL
    dashscope_model: str = dashscope.DEFAULT_MODEL
    # Kling: JWT from the access and secret keys; its callback is a trigger
    kling_access_key: SecretStr | None = None
    kling_secret_key: SecretStr | None = None
    kling_base_url: str = kling.DEFAULT_BASE_URL
    kling_model: str = kling.DEFAULT_MODEL
    # Tencent Hunyuan: TC3-signed submit and query, polled
    hunyuan_secret_id: SecretStr | None = None
    hunyuan_secret_key: SecretStr | None = None
    hunyuan_base_url: str = hunyuan.DEFAULT_BASE_URL
    hunyuan_region: str = hunyuan.DEFAULT_REGION
    # Volcengine Ark Seedream: synchronous
    seedream_api_key: SecretStr | None = None
    seedream_base_url: str = seedream.DEFAULT_BASE_URL
    seedream_model: str = seedream.DEFAULT_MODEL
    output_hosts: str | None = None  # comma-separated; None = the provider's own defaults
    input_hosts: str = ""  # comma-separated hosts input image URLs may name
    provider_concurrency: int = 64  # jobs in flight per provider; beyond it tasks stay pending
    # jobs in flight per user and provider; 0 = a fair share: a quarter of provider_concurrency
    # (at least 1), so one user's backlog cannot take every slot
    user_concurrency: int = Field(default=0, ge=0)
    styles_path: Path | None = None

    # the simulator: a development tool, mounted under /sim only when asked for (``serve --demo``
    # or HOOKLINE_SIMULATOR=true); its API token is random per start unless set here, and its
    # webhooks go only to this hookline's public URL and the hosts in sim_webhook_hosts
    simulator: bool = False
    sim_api_token: SecretStr | None = None
    sim_webhook_hosts: str = ""  # comma-separated host or host:port
    sim_latency: str = "uniform:1:3"  # fixed:S | uniform:A:B | lognormal:MU:SIGMA | seed
    sim_time_scale: float = 1.0  # multiplies every simulated latency
    sim_failure_rate: float = 0.0
    sim_webhook_loss: float = 0.0
    sim_webhook_duplicate: float = 0.0
    sim_webhook_delay_s: float = 0.0
    sim_webhook_bad_signature: float = 0.0
    sim_output_5xx: float = 0.0
    sim_seed: int | None = None

    # lifecycle timing
    ai_deadline_s: float = _DEADLINES.ai_deadline_s
    ai_hard_cap_s: float = _DEADLINES.ai_hard_cap_s
    lease_s: float = _DEADLINES.lease_s
    handoff_s: float = _DEADLINES.handoff_s
    reaper_interval_s: float = 5.0
    max_attempts: int = _DEADLINES.max_attempts
    retry_backoff_s: float = _DEADLINES.retry_backoff_s
    # a step whose worker dies (its lease expires unreleased) this many times fails the task
    # with a refund (``worker_lost``) instead of being run again: no poison loops
    max_lost_leases: int = Field(default=3, ge=1)
    # steps (input preparation and submit, watermarking) running at once in one process; more
    # offers wait as task ids in a backlog of at most step_backlog, beyond it in the store (the
    # reaper finds them by their deadlines). 128: a step mostly waits (on the provider, the
    # store, a thread), and with 32 a burst of webhooks queued for seconds (bench/RESULTS.md).
    # Downloads and decodes share the media budget; between them each step holds its image
    step_concurrency: int = Field(default=128, ge=1, le=10_000)
    step_backlog: int = Field(default=10_000, ge=0, le=1_000_000)
    # Per provider or provider:model, as JSON, e.g.
    # {"replicate": {"ai_deadline_s": 300}, "fal:fal-ai/flux/dev": {"expected_latency_s": 20}}
    provider_timings: dict[str, ProviderTiming] = Field(default_factory=dict)
    # The poll schedule of providers whose outcomes must be asked for (poll-only, trigger): the
    # first poll at the expected latency (``provider_timings``' expected_latency_s, else
    # poll_first_s), then poll_interval_s doubling with jitter up to poll_max_interval_s.
    poll_first_s: float = Field(default=20.0, gt=0)
    poll_interval_s: float = Field(default=5.0, gt=0)
    poll_max_interval_s: float = Field(default=60.0, gt=0)
    # Per provider, as JSON, replacing the adapter's published limits, e.g.
    # {"dashscope": {"submits_per_s": 2, "polls_per_s": 10, "concurrency": 2}}
    provider_quotas: dict[str, ProviderQuotaSetting] = Field(default_factory=dict)
    # synchronous provider calls (Seedream) one process makes at once per provider: the one
    # place a worker waits on the AI, holding a step
    sync_calls: int = Field(default=8, ge=1, le=1_000)
    # how stored inputs reach providers that take data URIs: "auto" (by signed URL when it is
    # public https, else inline), "always" (by URL), "never" (inline)
    inputs_by_url: Literal["auto", "always", "never"] = "auto"

    # HTTP edges
    max_body_bytes: int = 1_000_000  # JSON bodies
    max_upload_bytes: int = 20_000_000
    # 4096²: twice the largest provider input on each side; JPEGs above it are decoded at 1/2 or
    # 1/4 of their size (service/media/images.py), other formats are refused
    max_image_pixels: int = 16_777_216
    # bytes that concurrent image fetches and decodes may hold at once (shared by the process)
    media_memory_budget_bytes: int = Field(default=256_000_000, gt=0)
    upload_decodes_per_user: int = Field(default=2, ge=1)  # concurrent upload decodes per user
    max_json_depth: int = Field(default=32, ge=1)  # nesting of JSON bodies; deeper answers 400
    max_inputs: int = 4
    max_prompt_chars: int = 2000
    # requests per API key: a second, and at once (rate 0: no limit). One backend key may serve
    # all of a product's users, so a burst of 2,000 creates passes; a user's own limits
    # (``users create --rate --burst``) replace these for that user's keys
    rate_limit_per_s: float = Field(default=200.0, ge=0)
    rate_limit_burst: int = Field(default=2500, ge=1)
    # failed authentications per client address (a real key is never locked out by them)
    auth_failure_rate_per_s: float = 1.0
    auth_failure_burst: int = 20
    metrics_token: SecretStr | None = None
    cors_origins: str = ""  # comma-separated; empty = CORS off
    file_url_ttl_s: int = 3600
    # how long a task's watch link (its GET and event stream without a key) stays valid
    watch_ttl_s: int = Field(default=86_400, ge=60, le=30 * 86_400)
    # live-progress streams (GET /v1/tasks/{id}/events) open at once in one process: per task
    # (a watch link handed to an app's end users, each with a few tabs) and in all
    sse_per_task: int = Field(default=32, ge=1, le=100_000)
    sse_max_streams: int = Field(default=10_000, ge=1, le=1_000_000)

    # retention: feed events and webhook delivery records older than this are pruned in bounded
    # batches (never a feed event a persistent watcher has not passed)
    feed_retention_s: float = Field(default=7 * 86_400.0, gt=0)
    deliveries_retention_s: float = Field(default=7 * 86_400.0, gt=0)
    prune_batch: int = Field(default=1_000, ge=1)
    # a task's timeline (GET /v1/tasks/{id}/timeline) keeps its newest this many notes
    timeline_max_notes: int = Field(default=200, ge=1, le=10_000)

    # outbound webhooks (service/outbound/): destinations are public https hosts, plus these
    # (comma-separated host or host:port), which may be http, loopback or private
    webhook_hosts: str = ""
    webhook_retry_base_s: float = Field(default=5.0, gt=0)  # the gap before the second try
    webhook_retry_horizon_s: float = Field(default=86_400.0, gt=0)  # then the message fails
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=60)  # per request
    webhook_concurrency: int = Field(default=32, ge=1, le=1_000)  # requests in flight
    webhook_lease_s: float = Field(default=120.0, gt=0)  # a claimed message's lease
    webhook_poll_s: float = Field(default=0.5, gt=0, le=60)  # how often due retries are looked for
    webhook_secret_overlap_s: float = Field(default=86_400.0, ge=0)  # old secret signs too
    webhook_max_endpoints: int = Field(default=10, ge=1, le=1_000)  # per user
    # unsettled messages per user: beyond, new ones are dropped (and counted) so no user can
    # grow the outbox without bound
    webhook_max_pending: int = Field(default=10_000, ge=1, le=10_000_000)
    # live sends per destination URL and process: a slow or dead receiver holds this many
    # of the webhook_concurrency slots (half, by default), never all of them
    webhook_per_destination: int = Field(default=16, ge=1, le=1_000)
    webhook_retention_s: float = Field(default=7 * 86_400.0, gt=0)  # settled messages kept

    # watermark
    watermark_text: str = "hookline"
    watermark_logo: Path | None = None
    watermark_position: Literal[
        "top-left", "top-right", "bottom-left", "bottom-right", "center"
    ] = "bottom-right"
    watermark_opacity: float = Field(default=0.5, ge=0.0, le=1.0)
    watermark_scale: float = Field(default=0.2, gt=0.0, le=1.0)
    watermark_margin: float = Field(default=0.03, ge=0.0, le=0.5)
    watermark_tile: bool = False
    output_format: Literal["JPEG", "PNG", "WEBP"] = "JPEG"
    output_quality: int = Field(default=90, ge=1, le=100)

    log_level: str = "info"
    # auto: console lines on a terminal, JSON lines anywhere else (a pipe, a file, a collector)
    log_format: Literal["auto", "console", "json"] = "auto"

    @model_validator(mode="after")
    def _lease_outlasts_a_request(self) -> Settings:
        # a message's lease must outlive the request sending it, or a second deliverer would
        # claim and send it while the first still waits for the answer
        if self.webhook_lease_s <= 2 * self.webhook_timeout_s:
            raise ValueError("webhook_lease_s must be over twice webhook_timeout_s")
        return self

    def deadlines(self) -> Deadlines:
        return Deadlines(
            handoff_s=self.handoff_s,
            lease_s=self.lease_s,
            ai_deadline_s=self.ai_deadline_s,
            ai_hard_cap_s=self.ai_hard_cap_s,
            retry_backoff_s=self.retry_backoff_s,
            max_attempts=self.max_attempts,
        )

    def deadlines_for(
        self, provider: str, model: str, base: Deadlines | None = None, *, polled: bool = False
    ) -> Deadlines:
        """``base`` (default: these settings' timings) refined by ``provider_timings``: the
        provider's entry, then the model's. A ``polled`` provider (its outcomes are asked for)
        gets the poll schedule, its first poll at the expected latency."""
        deadlines = base or self.deadlines()
        if polled:
            deadlines = dataclasses.replace(
                deadlines,
                first_poll_s=self.poll_first_s,
                poll_interval_s=self.poll_interval_s,
                poll_max_interval_s=self.poll_max_interval_s,
            )
        for key in (provider, f"{provider}:{model}"):
            timing = self.provider_timings.get(key)
            if timing is None:
                continue
            changes = timing.model_dump(exclude_none=True)
            expected = changes.pop("expected_latency_s", None)
            if expected is not None and "ai_deadline_s" not in changes:
                changes["ai_deadline_s"] = 2 * expected
            if expected is not None and polled:
                changes["first_poll_s"] = expected
            if not polled:
                changes.pop("poll_interval_s", None)
                changes.pop("poll_max_interval_s", None)
            deadlines = dataclasses.replace(deadlines, **changes)
        return deadlines

    def default_model(self, provider: str) -> str:
        """The model for ``provider`` when neither the request nor its style names one: its
        ``*_model`` setting; ``SIM_MODEL`` for "sim" (and any name without such a setting)."""
        models = {
            "replicate": self.replicate_model,
            "fal": self.fal_model,
            "bfl": self.bfl_model,
            "openai": self.openai_model,
            "dashscope": self.dashscope_model,
            "kling": self.kling_model,
            "hunyuan": hunyuan.MODEL,
            "seedream": self.seedream_model,
        }
        return models.get(provider, SIM_MODEL)

    def role_set(self) -> frozenset[str]:
        """The background loops this process runs (``roles``)."""
        return frozenset(split_csv(self.roles))

    def input_host_set(self) -> frozenset[str]:
        """Hosts input image URLs may be fetched from (``input_hosts``); empty: none."""
        return frozenset(split_csv(self.input_hosts))

    def output_host_set(self) -> frozenset[str] | None:
        """Hosts provider outputs may be fetched from (``output_hosts``), or ``None`` when it is
        unset: then each provider's own defaults apply (service/providers.py)."""
        if self.output_hosts is None:
            return None
        return frozenset(split_csv(self.output_hosts))

    def webhook_host_set(self) -> frozenset[str]:
        """Hosts outbound webhooks may go to besides public https ones (``webhook_hosts``)."""
        return frozenset(split_csv(self.webhook_hosts))

    def sim_webhook_host_set(self) -> frozenset[str]:
        """Hosts besides this hookline the simulator may post webhooks to."""
        return frozenset(split_csv(self.sim_webhook_hosts))

    def cors_origin_list(self) -> list[str]:
        """Origins allowed by CORS (``cors_origins``), in order; empty: CORS is off."""
        return list(split_csv(self.cors_origins))
