"""The simulator's engine: a slow, faulty AI provider behind Replicate's predictions contract.

``Simulator`` holds the predictions and runs each one as an asyncio task *inside the simulator*
that sleeps the sampled latency (the simulator is the slow provider, so waiting here is the
point), renders real PNGs, serves them from expiring signed file URLs and sends Standard Webhooks
signed webhooks with retries, with the faults of ``SimConfig`` applied. ``Prediction`` is one
prediction as Replicate would store it, ``SimStats`` the counters.

No HTTP server here: the engine refuses with ``SimError`` (a status and Replicate's problem
fields), which the routes in ``callbacks/simulator/app.py`` render. Its HTTP client only sends
webhooks, and only to ``SimConfig.webhook_hosts`` (checked when a prediction is created). Input
images given as URLs are fetched by the injected ``fetch_input`` (hookline gives it its SSRF-safe
fetcher, service/providers.py); without one only data URIs are accepted.

It is one module of ~500 lines because it is one thing: the life of a simulated prediction, from
creation through latency, faults, outputs and webhook retries to data removal, all of it reading
and writing the same ``Prediction`` records on one clock and one seeded random stream per
prediction; cut apart, each piece would reach back into the others' state.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import math
import random
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import httpx
import structlog

from callbacks.simulator.config import SimConfig
from callbacks.simulator.images import InputImageError, output_size, render_png
from statemachine import clock as wall

__all__ = [
    "DEFAULT_EVENTS",
    "EVENTS",
    "TERMINAL",
    "FetchInput",
    "Prediction",
    "PredictionRequest",
    "SimError",
    "SimStats",
    "Simulator",
    "Status",
    "WebhookEvent",
    "sign_webhook",
]

log = structlog.get_logger(__name__)

Status = Literal["starting", "processing", "succeeded", "failed", "canceled", "aborted"]
TERMINAL: frozenset[Status] = frozenset({"succeeded", "failed", "canceled", "aborted"})
WebhookEvent = Literal["start", "output", "logs", "completed"]
EVENTS: frozenset[WebhookEvent] = frozenset({"start", "output", "logs", "completed"})
DEFAULT_EVENTS = frozenset({"output", "completed"})  # Replicate's behaviour without a filter
# "logs" is accepted in a filter but never sent: the simulator's logs are not streamed.
FAILURES = (
    "CUDA out of memory. Tried to allocate 2.00 GiB (simulated)",
    "NSFW content detected. Try running it again, or try a different prompt. (simulated)",
    "Prediction interrupted; please retry (code: PA) (simulated)",
)
IMAGE_KEYS = ("image", "input_image")  # the input keys an input image is read from

# Fetches an input image URL: its bytes, or ``InputImageError`` with a message that does not
# echo the URL (a signed URL's token must not reach a prediction's error).
FetchInput = Callable[[str], Awaitable[bytes]]


class SimError(Exception):
    """A refusal in Replicate's problem-JSON style (``{"title", "detail", "status"}``), with the
    HTTP status and headers a real provider would answer it with."""

    def __init__(
        self, status: int, title: str, detail: str, *, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail
        self.headers = dict(headers or {})


@dataclass(slots=True)
class SimStats:
    """Counters for tests and benchmarks (``GET /v1/_sim/stats``)."""

    predictions_created: int = 0
    predictions_rejected: int = 0  # 429: beyond max_in_flight
    generations_completed: int = 0  # succeeded: what a real provider bills
    predictions_failed: int = 0
    predictions_canceled: int = 0
    webhooks_sent: int = 0  # HTTP attempts, retries and duplicates included
    webhooks_delivered: int = 0  # attempts answered 2xx
    webhooks_failed: int = 0  # attempts with a connection error or a non-2xx answer
    webhooks_abandoned: int = 0  # deliveries given up after their last attempt
    webhooks_lost: int = 0  # deliveries never sent (fault)
    webhooks_duplicated: int = 0  # deliveries sent twice (fault)
    webhooks_bad_signature: int = 0  # attempts signed with a wrong secret (fault)
    webhooks_stale: int = 0  # stale "processing" webhooks sent after a terminal one (fault)
    files_served: int = 0
    files_5xx: int = 0  # output fetches answered 503 (fault)


@dataclass(slots=True, eq=False)
class Prediction:
    """One prediction, as Replicate would store it, plus the simulator's bookkeeping."""

    id: str
    serial: int  # creation order: the seed of its random fate
    model: str
    version: str
    input: dict[str, Any]
    webhook: str | None
    events: frozenset[str]
    base_url: str
    created_at: str
    status: Status = "starting"
    output: list[str] | None = None
    error: str | None = None
    logs: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    data_removed: bool = False
    started_at: str | None = None
    completed_at: str | None = None
    stale: dict[str, Any] | None = None  # the "processing" snapshot, for reordered webhooks
    files: list[bytes] = field(default_factory=list)
    file_failures: list[int] = field(default_factory=list)  # consecutive 503s per file
    file_rng: random.Random | None = None
    task: asyncio.Task[None] | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def to_json(self) -> dict[str, Any]:
        get = f"{self.base_url}/v1/predictions/{self.id}"
        return {
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "input": self.input,
            "logs": self.logs,
            "output": self.output,
            "data_removed": self.data_removed,
            "error": self.error,
            "status": self.status,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "completed_at": self.completed_at,
            "urls": {"get": get, "cancel": f"{get}/cancel", "web": get},
            "metrics": dict(self.metrics),
        }


def _iso_now() -> str:
    return datetime.fromtimestamp(wall.now(), UTC).isoformat(timespec="microseconds")[:-6] + "Z"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def sign_webhook(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """A Standard Webhooks ``v1`` signature header value over ``{id}.{timestamp}.{body}``."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode("ascii")


@dataclass(frozen=True, slots=True)
class PredictionRequest:
    """A validated create request: what a new prediction runs and where it reports."""

    model: str
    version: str
    input: dict[str, Any]
    webhook: str | None = None
    events: frozenset[str] = DEFAULT_EVENTS


class Simulator:
    """The simulator's state: predictions, background tasks, counters. One per app."""

    def __init__(
        self,
        config: SimConfig,
        *,
        http: httpx.AsyncClient | None = None,
        fetch_input: FetchInput | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._fetch_input = fetch_input
        self.stats = SimStats()
        self._latency = config.latency_model
        self._clock = clock
        self._owns_http = http is None
        self._http = http if http is not None else httpx.AsyncClient()
        self._predictions: dict[str, Prediction] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._retention: deque[tuple[float, Prediction]] = deque()
        self._file_key = secrets.token_bytes(32)
        self._serial = 0
        self._in_flight = 0
        self._closed = False

    # -- the API the routes use --------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Predictions not yet in a terminal state."""
        return self._in_flight

    @property
    def pending_tasks(self) -> int:
        """Background tasks (predictions, webhook deliveries) not yet finished."""
        return sum(not task.done() for task in self._tasks)

    def admit(self) -> None:
        """Refuse a new prediction while shutting down (503) or at ``max_in_flight`` (429)."""
        if self._closed:
            raise SimError(503, "Unavailable", "The simulator is shutting down.")
        self._purge()
        limit = self.config.max_in_flight
        if limit is not None and self._in_flight >= limit:
            self.stats.predictions_rejected += 1
            wait = self.config.retry_after_s
            raise SimError(
                429,
                "Too Many Requests",
                f"Request was throttled. Expected available in {wait} second.",
                headers={"Retry-After": str(wait)},
            )

    def create(self, request: PredictionRequest, *, base_url: str) -> Prediction:
        """Start a prediction (after ``admit``, which this repeats); its URLs begin with
        ``base_url``. A webhook outside ``webhook_hosts``, or a URL input without a fetcher, is
        refused (422) before anything is stored or sent."""
        self.admit()
        self._check_reach(request)
        self._serial += 1
        prediction = Prediction(
            id=_prediction_id(),
            serial=self._serial,
            model=request.model,
            version=request.version,
            input=request.input,
            webhook=request.webhook,
            events=request.events,
            base_url=base_url,
            created_at=_iso_now(),
        )
        self._predictions[prediction.id] = prediction
        self._in_flight += 1
        self.stats.predictions_created += 1
        prediction.task = self._spawn(self._run(prediction))
        return prediction

    def _check_reach(self, request: PredictionRequest) -> None:
        """Refuse a prediction that would make the simulator call a host it may not."""
        if request.webhook is not None and not self.config.allows_webhook(request.webhook):
            raise SimError(
                422,
                "Input validation failed",
                f"webhook host {_host_of(request.webhook)!r} is not one this simulator may "
                "call: only its own hookline (HOOKLINE_PUBLIC_URL) and the hosts in "
                "HOOKLINE_SIM_WEBHOOK_HOSTS are.",
            )
        if self._fetch_input is None:
            for key in IMAGE_KEYS:
                source = request.input.get(key)
                if isinstance(source, str) and not source.startswith("data:"):
                    raise SimError(
                        422,
                        "Input validation failed",
                        f"input.{key} must be a data URI: this simulator fetches no URLs.",
                    )

    def get(self, prediction_id: str) -> Prediction:
        self._purge()
        prediction = self._predictions.get(prediction_id)
        if prediction is None:
            raise SimError(404, "Not found", "Not found.")
        return prediction

    def cancel(self, prediction_id: str) -> Prediction:
        """Cancel a running prediction; a finished one is returned unchanged."""
        prediction = self.get(prediction_id)
        if not prediction.terminal:
            if prediction.task is not None:
                prediction.task.cancel()
            self._complete(prediction, "canceled")
        return prediction

    def file(self, prediction_id: str, name: str, exp: str | None, sig: str | None) -> bytes:
        """The bytes behind a signed output URL, or the error a real file host would give."""
        self._purge()
        if not (exp and sig and exp.isascii() and exp.isdigit() and name.endswith(".png")):
            raise SimError(403, "Forbidden", "Missing or malformed signature.")
        good = self._file_sig(prediction_id, name, int(exp))
        if not hmac.compare_digest(sig.encode(), good.encode()):
            raise SimError(403, "Forbidden", "Signature does not match.")
        if self._clock() >= int(exp):
            raise SimError(403, "Forbidden", "Request has expired.")
        prediction = self._predictions.get(prediction_id)
        index = name.removesuffix(".png")
        if prediction is None or not (index.isascii() and index.isdigit()):
            raise SimError(404, "Not found", "Not found.")
        if int(index) >= len(prediction.files):
            raise SimError(404, "Not found", "Not found.")
        n = int(index)
        rng = prediction.file_rng or random.Random()
        failures = prediction.file_failures
        if failures[n] < self.config.output_5xx_max_consecutive and (
            rng.random() < self.config.output_5xx
        ):
            failures[n] += 1
            self.stats.files_5xx += 1
            raise SimError(503, "Service Unavailable", "Try again.", headers={"Retry-After": "1"})
        failures[n] = 0
        self.stats.files_served += 1
        return prediction.files[n]

    def snapshot(self) -> dict[str, int]:
        """The counters plus the current load."""
        return {**asdict(self.stats), "in_flight": self._in_flight}

    async def close(self) -> None:
        """Cancel running predictions and pending webhooks, close an owned HTTP client.
        Idempotent; the host app calls it from its lifespan when the simulator is mounted."""
        if self._closed:
            return
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._owns_http:
            await self._http.aclose()

    # -- a prediction's life -----------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _rng(self, prediction: Prediction, purpose: str) -> random.Random:
        """A generator per prediction and purpose, so a seed fixes each prediction's fate
        whatever the interleaving of concurrent predictions."""
        if self.config.seed is None:
            return random.Random()
        return random.Random(f"{self.config.seed}:{prediction.serial}:{purpose}")

    async def _sleep(self, simulated_s: float) -> None:
        if simulated_s > 0 and self.config.time_scale > 0:
            await asyncio.sleep(simulated_s * self.config.time_scale)

    async def _run(self, prediction: Prediction) -> None:
        try:
            await self._generate(prediction)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a simulator bug must still end the prediction
            log.exception("sim.prediction_crashed", prediction_id=prediction.id)
            if not prediction.terminal:
                self._complete(prediction, "failed", error=f"internal simulator error: {exc!r}")

    async def _generate(self, prediction: Prediction) -> None:
        rng = self._rng(prediction, "run")
        prediction.status = "processing"
        prediction.started_at = _iso_now()
        prediction.logs = "Starting prediction (simulated)\n"
        prediction.stale = prediction.to_json()
        if prediction.webhook and "start" in prediction.events:
            self._spawn(self._deliver(prediction, prediction.stale, event="start"))
        try:
            source = await self._load_input(prediction.input)
        except InputImageError as exc:
            self._complete(prediction, "failed", error=str(exc))
            return
        latency_s = self._latency.sample(rng)
        await self._sleep(latency_s)
        if rng.random() < self.config.failure_rate:
            self._complete(prediction, "failed", error=rng.choice(FAILURES))
            return
        count = int(prediction.input.get("num_outputs", 1))
        prompt = str(prediction.input["prompt"])
        size = output_size(prediction.input)
        try:
            files = await asyncio.to_thread(_render_all, prompt, source, size, count)
        except InputImageError as exc:
            self._complete(prediction, "failed", error=str(exc))
            return
        expires = math.ceil(self._clock() + self.config.output_url_ttl_s)
        prediction.files, prediction.file_failures = files, [0] * count
        prediction.file_rng = self._rng(prediction, "files")
        prediction.output = [self._file_url(prediction, f"{n}.png", expires) for n in range(count)]
        prediction.metrics = {"predict_time": latency_s, "image_count": count}
        prediction.logs += (
            f"Generated {count} image(s) of {size[0]}x{size[1]} in {latency_s:.1f}s\n"
        )
        if prediction.webhook and "output" in prediction.events:
            # Replicate announces new output while still "processing", then completes
            self._spawn(self._deliver(prediction, prediction.to_json(), event="output"))
        self._complete(prediction, "succeeded")

    def _complete(
        self, prediction: Prediction, status: Status, *, error: str | None = None
    ) -> None:
        """Enter a terminal state (synchronously: no race with cancel) and send its webhook."""
        prediction.status = status
        prediction.error = error
        prediction.completed_at = _iso_now()
        self._in_flight -= 1
        if status == "succeeded":
            self.stats.generations_completed += 1
        elif status == "failed":
            self.stats.predictions_failed += 1
        else:
            self.stats.predictions_canceled += 1
        self._retention.append((self._clock() + self.config.data_retention_s, prediction))
        if prediction.webhook and "completed" in prediction.events:
            self._spawn(self._deliver(prediction, prediction.to_json(), event="completed"))

    def _purge(self) -> None:
        """Replicate deletes inputs and outputs about an hour after completion."""
        now = self._clock()
        while self._retention and self._retention[0][0] <= now:
            _, prediction = self._retention.popleft()
            prediction.data_removed = True
            prediction.input, prediction.output, prediction.files = {}, None, []

    async def _load_input(self, model_input: Mapping[str, Any]) -> bytes | None:
        """The input image's bytes from a data URI or a URL fetched by ``fetch_input``."""
        source = model_input.get(IMAGE_KEYS[0]) or model_input.get(IMAGE_KEYS[1])
        if source is None:
            return None
        if source.startswith("data:"):
            header, _, payload = source.partition(",")
            if not header.endswith(";base64"):
                raise InputImageError("input image data URI must be base64-encoded")
            try:
                return base64.b64decode(payload, validate=True)
            except binascii.Error as exc:
                raise InputImageError("input image data URI is not valid base64") from exc
        shown = source.split("?", 1)[0]  # never echo a signed URL's token
        if self._fetch_input is None:  # refused at creation; kept for the engine's own safety
            raise InputImageError(f"could not fetch input image {shown}: no fetcher")
        try:
            data = await self._fetch_input(source)
        except InputImageError as exc:
            raise InputImageError(f"could not fetch input image {shown}: {exc}") from exc
        if len(data) > self.config.max_input_bytes:
            limit = self.config.max_input_bytes
            raise InputImageError(f"input image {shown} is over {limit} bytes")
        return data

    # -- output files --------------------------------------------------------------------------

    def _file_sig(self, prediction_id: str, name: str, exp: int) -> str:
        message = f"{prediction_id}/{name}/{exp}".encode()
        return _b64(hmac.new(self._file_key, message, hashlib.sha256).digest())

    def _file_url(self, prediction: Prediction, name: str, exp: int) -> str:
        sig = self._file_sig(prediction.id, name, exp)
        return f"{prediction.base_url}/v1/files/{prediction.id}/{name}?exp={exp}&sig={sig}"

    # -- webhooks ------------------------------------------------------------------------------

    async def _deliver(
        self, prediction: Prediction, payload: dict[str, Any], *, event: WebhookEvent
    ) -> None:
        """One delivery with its faults. Only the terminal ("completed") one is retried, and it
        may be followed by a stale "processing" webhook (reordering)."""
        assert prediction.webhook is not None
        cfg = self.config
        terminal = event == "completed"
        rng = self._rng(prediction, f"webhook:{event}")
        if rng.random() < cfg.webhook_loss:
            self.stats.webhooks_lost += 1
        else:
            await self._sleep(rng.uniform(0.0, cfg.webhook_delay_s))
            body = json.dumps(payload, separators=(",", ":")).encode()
            msg_id = "msg_" + secrets.token_hex(12)
            copies = 1
            if rng.random() < cfg.webhook_duplicate:
                copies = 2
                self.stats.webhooks_duplicated += 1
            attempts = cfg.webhook_attempts if terminal else 1  # intermediate: never retried
            for _ in range(copies):
                await self._send(prediction.webhook, msg_id, body, attempts, rng)
        if terminal and prediction.stale is not None and rng.random() < cfg.webhook_reorder:
            self.stats.webhooks_stale += 1
            await self._sleep(rng.uniform(0.0, cfg.webhook_delay_s))
            stale = json.dumps(prediction.stale, separators=(",", ":")).encode()
            await self._send(prediction.webhook, "msg_" + secrets.token_hex(12), stale, 1, rng)

    async def _send(
        self, url: str, msg_id: str, body: bytes, attempts: int, rng: random.Random
    ) -> bool:
        """POST with exponential backoff (simulated seconds) until a 2xx or out of attempts."""
        for attempt in range(attempts):
            if attempt:
                await self._sleep(self.config.webhook_backoff_s * 2 ** (attempt - 1))
            if await self._post(url, msg_id, body, rng):
                return True
        self.stats.webhooks_abandoned += 1
        return False

    async def _post(self, url: str, msg_id: str, body: bytes, rng: random.Random) -> bool:
        key = self.config.webhook_key
        if rng.random() < self.config.webhook_bad_signature:
            key = secrets.token_bytes(len(key))
            self.stats.webhooks_bad_signature += 1
        timestamp = int(wall.now())  # fresh per attempt, like Replicate (Svix)
        headers = {
            "content-type": "application/json",
            "user-agent": "hookline-simulator/1 (Replicate-compatible)",
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign_webhook(key, msg_id, timestamp, body),
        }
        self.stats.webhooks_sent += 1
        try:
            response = await self._http.post(
                url,
                content=body,
                headers=headers,
                timeout=self.config.webhook_timeout_s,
                follow_redirects=False,
            )
        except httpx.HTTPError as exc:
            log.info("sim.webhook_failed", url=url, webhook_id=msg_id, error=repr(exc))
            self.stats.webhooks_failed += 1
            return False
        if response.is_success:
            self.stats.webhooks_delivered += 1
            return True
        log.info("sim.webhook_refused", url=url, webhook_id=msg_id, status=response.status_code)
        self.stats.webhooks_failed += 1
        return False


def _render_all(
    prompt: str, source: bytes | None, size: tuple[int, int], count: int
) -> list[bytes]:
    return [render_png(prompt=prompt, input_image=source, size=size, index=n) for n in range(count)]


def _host_of(url: str) -> str:
    try:
        return httpx.URL(url).host
    except (httpx.InvalidURL, ValueError):
        return "?"


def _prediction_id() -> str:
    """Replicate-like: 26 lowercase base32 characters."""
    return base64.b32encode(secrets.token_bytes(16)).decode("ascii").lower()[:26]
