"""HTTP plumbing shared by the adapters: one request function that translates httpx errors and
status codes into the types of callbacks/errors.py, plus small parsing helpers. The client the
requests go out on is callbacks/transport.py's (``new_client``).

    httpx.TimeoutException, other transport errors    -> RetryableProviderError
    httpx.InvalidURL, httpx.UnsupportedProtocol        -> PermanentProviderError (configuration)
    5xx, 408                                           -> RetryableProviderError
    429                                                -> ProviderRateLimited(retry_after_s)
    other 4xx (and 3xx: redirects are never followed)  -> PermanentProviderError
    2xx whose body is not JSON                         -> RetryableProviderError

Every translated error carries ``details`` with the status, the method, the URL without its query
(callback URLs carry per-task tokens) and the start of the provider's answer.

What goes into a provider URL is checked here too, before any request: a model name becomes path
segments of the submit (and, for fal, the status) route, and a job id from a provider's answer or a
webhook goes into status, result and cancel paths. Each adapter gives its own model grammar built
from ``path_segments``; every job id must match ``JOB_ID`` (``checked_job_id``). Neither lets
through ``..``, an empty segment, a query or fragment, a percent-escape, a backslash, control
characters or anything outside ASCII (no unicode look-alike dots); segments are percent-encoded
when the path is built all the same (``url_path``).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import math
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from contextvars import ContextVar
from datetime import UTC
from typing import Any, Final
from urllib.parse import quote

import httpx
import orjson

from callbacks.errors import (
    InvalidJobId,
    InvalidModel,
    PermanentProviderError,
    ProviderError,
    ProviderRateLimited,
    RetryableProviderError,
)
from callbacks.provider import Submission
from callbacks.transport import DirectAnswer, OutboundClient
from statemachine import clock

_SNIPPET_CHARS = 500
_REQUEST_ID_CHARS = 128
CONNECT_TIMEOUT_S = 10.0  # a call with its own timeout still connects within this

# A failure whose text says the input itself is wrong (or was refused by a safety filter) will
# fail the same way on a retry; anything else (OOM, timeouts, crashed workers) may not.
_INPUT_ERROR = re.compile(
    r"validation|invalid|must be|not supported|unsupported|unprocessable|nsfw|safety|"
    r"content.?policy|moderat|sensitive",
    re.IGNORECASE,
)


# -- what may go into a provider URL -----------------------------------------------------------

MODEL_MAX_CHARS: Final = 200
# One path segment of a model name: ASCII letters and digits, then also ``.``, ``_`` and ``-``
# (the characters the vendors' model names use). Starting with a letter or digit, a segment can
# never be ``.`` or ``..``; ``..`` inside one is refused as well (``path_segments``).
SEGMENT: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# A provider job id: Replicate's prediction ids (base32), fal's request ids and BFL's ids (UUIDs)
# all fit; no dots at all, so never a dot segment.
JOB_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


def path_segments(
    model: object,
    *,
    provider: str,
    segment: re.Pattern[str] = SEGMENT,
    min_segments: int = 1,
    max_segments: int = 1,
) -> tuple[str, ...]:
    """The ``/``-separated segments of ``model``, each matching ``segment`` in full, between
    ``min_segments`` and ``max_segments`` of them; else ``InvalidModel``. ``re.fullmatch`` with
    explicit ASCII ranges: a trailing newline or a non-ASCII character never matches."""
    if not isinstance(model, str) or not model:
        raise InvalidModel(f"{provider}: a model name is required", details={"provider": provider})
    shown = model[:MODEL_MAX_CHARS]
    if len(model) > MODEL_MAX_CHARS or ".." in model:
        raise InvalidModel(
            f"{provider}: model {shown!r} is not a valid model name",
            details={"provider": provider},
        )
    parts = tuple(model.split("/"))
    if not min_segments <= len(parts) <= max_segments or not all(
        segment.fullmatch(part) for part in parts
    ):
        raise InvalidModel(
            f"{provider}: model {shown!r} is not a valid model name",
            details={"provider": provider},
        )
    return parts


def model_name(model: object, *, provider: str, segment: re.Pattern[str], max_chars: int) -> str:
    """``model`` if it is at most ``max_chars`` long and one path segment matching ``segment``,
    else ``InvalidModel`` (the grammar of an adapter whose model is one segment)."""
    if isinstance(model, str) and len(model) > max_chars:
        raise InvalidModel(
            f"{provider}: model {model[:max_chars]!r}… is too long",
            details={"provider": provider},
        )
    path_segments(model, provider=provider, segment=segment)
    assert isinstance(model, str)
    return model


def url_path(*segments: str) -> str:
    """``/a/b/c`` from already checked segments, each percent-encoded (a no-op for the grammar's
    characters; a second line of defence should a grammar ever widen)."""
    return "".join("/" + quote(part, safe="") for part in segments)


def checked_job_id(job_id: object, *, provider: str) -> str:
    """``job_id`` if it matches ``JOB_ID`` in full, else ``InvalidJobId`` (nothing is sent)."""
    if isinstance(job_id, str) and JOB_ID.fullmatch(job_id):
        return job_id
    shown = job_id[:80] if isinstance(job_id, str) else type(job_id).__name__
    raise InvalidJobId(
        f"{provider}: job id {shown!r} is not a valid job id", details={"provider": provider}
    )


def is_input_error(text: str | None) -> bool:
    """Whether a provider's failure text names a problem a retry cannot fix (see the pattern)."""
    return bool(text) and _INPUT_ERROR.search(text or "") is not None


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delay-seconds or an HTTP date (relative to
    ``now``). None when absent or unparseable; never negative."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def _url_without_query(url: httpx.URL) -> str:
    return str(url.copy_with(query=None, fragment=None))


def _provider_message(response: httpx.Response) -> str:
    """The provider's own words from an error body (``detail``, ``title``, ``error``)."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, Mapping):
        for key in ("detail", "title", "error", "message"):
            if body.get(key):
                return str(body[key])[:200]
    return str(body)[:200]


def status_error(response: httpx.Response, *, provider: str, now: float) -> ProviderError:
    """The error for a non-2xx response."""
    status = response.status_code
    details = {
        "provider": provider,
        "status": status,
        "method": response.request.method,
        "url": _url_without_query(response.request.url),
        "body": response.text[:_SNIPPET_CHARS],
    }
    if request_id := response.headers.get("x-request-id"):
        details["request_id"] = request_id[:_REQUEST_ID_CHARS]
    message = f"{provider}: HTTP {status}: {_provider_message(response)}"
    if status == 429:
        retry_after_s = parse_retry_after(response.headers.get("retry-after"), now)
        details["retry_after_s"] = retry_after_s
        return ProviderRateLimited(message, retry_after_s=retry_after_s, details=details)
    if status >= 500 or status == 408:
        return RetryableProviderError(message, details=details)
    return PermanentProviderError(message, details=details)


async def request_json(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    provider: str,
    headers: Mapping[str, str] | None = None,
    json: Any = None,
    params: Mapping[str, str] | None = None,
) -> Any:
    """Send one request and return its parsed JSON body (None for an empty body).

    Raises only ``ProviderError`` subclasses, each chained to the httpx error behind it.
    """
    answer, _ = await request_answer(
        client, method, url, provider=provider, headers=headers, json=json, params=params
    )
    return answer


# The HTTP statuses of the answers to the requests made inside ``answered_statuses()`` in this
# context (None: nobody is listening). Every adapter's requests go through ``request_answer``.
_STATUSES: ContextVar[list[int] | None] = ContextVar("provider_statuses", default=None)


@contextlib.contextmanager
def answered_statuses() -> Iterator[list[int]]:
    """The statuses of the provider answers ``request_answer`` gets inside the block, in order
    (a submit's timeline note: the adapters return only a job id)."""
    statuses: list[int] = []
    token = _STATUSES.set(statuses)
    try:
        yield statuses
    finally:
        _STATUSES.reset(token)


async def request_answer(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    provider: str,
    headers: Mapping[str, str] | None = None,
    json: Any = None,
    params: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
) -> tuple[Any, Mapping[str, str]]:
    """``request_json`` that also gives the answer's headers (a synchronous provider's request
    id), and with ``timeout_s`` its own timeout instead of the client's (connect at most
    ``CONNECT_TIMEOUT_S``). On ``new_client``'s client the request goes by
    ``OutboundClient.exchange``; on any other httpx client, by httpx."""
    timeout = client.timeout
    if timeout_s is not None:
        timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, CONNECT_TIMEOUT_S))
    # The whole exchange is bounded too: the transport bounds connecting and each read, not
    # sending (a peer that stops reading a data-URI body) nor an answer that drips in.
    whole_s = _whole_request_s(timeout)
    body: bytes | None = None
    if json is not None:  # orjson: a data-URI input makes a body of hundreds of KB
        body = orjson.dumps(json)
        headers = {**(headers or {}), "Content-Type": "application/json"}
    try:
        if params:
            url = str(httpx.URL(url, params=params))
        async with asyncio.timeout(whole_s):
            answer: DirectAnswer | _HttpxAnswer
            if isinstance(client, OutboundClient):
                answer = await client.exchange(
                    method, url, headers=headers or {}, content=body, timeouts=timeout, decode=True
                )
            else:
                answer = await _httpx_answer(client, method, url, headers, body, timeout)
            del body
            try:
                listening = _STATUSES.get()
                if listening is not None:
                    listening.append(answer.status_code)
                raw = await answer.aread()
            finally:
                await answer.aclose()
            if not 200 <= answer.status_code < 300:
                refusal = _read_response(answer, raw, httpx.Request(method, url))
                _raise_for_status(refusal, provider)
            answer_headers = answer.headers
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
        raise PermanentProviderError(
            f"{provider}: bad request URL: {exc}", details={"provider": provider}
        ) from exc
    except httpx.TimeoutException as exc:
        within = f"no answer within {timeout_s:g} s" if timeout_s is not None else "timeout"
        raise RetryableProviderError(
            f"{provider}: {within}: {type(exc).__name__}", details={"provider": provider}
        ) from exc
    except TimeoutError as exc:
        raise RetryableProviderError(
            f"{provider}: the exchange took over {whole_s:g} s", details={"provider": provider}
        ) from exc
    except httpx.HTTPError as exc:
        raise RetryableProviderError(
            f"{provider}: connection failed: {type(exc).__name__}: {exc}",
            details={"provider": provider},
        ) from exc
    if not raw:
        return None, answer_headers
    try:
        return parse_json(raw), answer_headers
    except ValueError as exc:
        snippet = raw[:_SNIPPET_CHARS].decode("utf-8", "replace")
        raise RetryableProviderError(
            f"{provider}: response is not JSON", details={"provider": provider, "body": snippet}
        ) from exc


def _raise_for_status(response: httpx.Response, provider: str) -> None:
    """The translated error of a non-2xx answer, chained to httpx's ``HTTPStatusError``."""
    try:
        response.raise_for_status()
    except httpx.HTTPStatusError as exc:
        raise status_error(response, provider=provider, now=clock.now()) from exc


class _HttpxAnswer:
    """An answer sent by httpx (a client not made by ``new_client``), read as a
    ``DirectAnswer`` is: the body decoded as httpx decodes it."""

    def __init__(
        self, response: httpx.Response, stream: contextlib.AbstractAsyncContextManager[Any]
    ):
        self._response = response
        self._stream = stream
        self.status_code = response.status_code
        self.headers: Mapping[str, str] = response.headers

    async def aread(self) -> bytes:
        return b"".join([part async for part in self._response.aiter_bytes()])

    async def aclose(self) -> None:
        await self._stream.__aexit__(None, None, None)

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        return self._response.headers.raw


def _read_response(
    answer: DirectAnswer | _HttpxAnswer, body: bytes, request: httpx.Request
) -> httpx.Response:
    """``answer`` with its ``body`` read (and decoded: no ``Content-Encoding`` left) as an
    ``httpx.Response``, the one a refusal's error is built from either way."""
    dropped = (b"content-encoding", b"content-length")
    kept = [(k, v) for k, v in answer.raw_headers if k.lower() not in dropped]
    return httpx.Response(answer.status_code, headers=kept, content=body, request=request)


async def _httpx_answer(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    headers: Mapping[str, str] | None,
    body: bytes | None,
    timeouts: httpx.Timeout,
) -> _HttpxAnswer:
    # Streamed, so the body read is ours alone: a response holding its content sits in the
    # same kind of reference cycle as its request (see ``_sent_once``).
    content = None
    if body is not None:
        headers = {**(headers or {}), "Content-Length": str(len(body))}
        content = _sent_once([body])
    stream = client.stream(method, url, headers=headers, content=content, timeout=timeouts)
    response = await stream.__aenter__()
    return _HttpxAnswer(response, stream)


def _whole_request_s(timeout: httpx.Timeout) -> float | None:
    """How long a whole exchange may take: connecting, sending and reading each within its own
    limit (None: unbounded, as the client was told)."""
    connecting = max(timeout.connect or 0.0, timeout.pool or 0.0)  # a pooled one, or a new one
    parts = (timeout.connect, timeout.pool, timeout.write, timeout.read)
    if all(p is None for p in parts):
        return None
    return connecting + (timeout.write or 0.0) + (timeout.read or 0.0)


async def _sent_once(parts: list[bytes]) -> AsyncIterator[bytes]:
    """A request body that is let go of once sent. httpx's and httpcore's request objects hold
    each other (a reference cycle, freed only when the cyclic GC runs, often after they have
    aged into its oldest generation): a body they kept would linger with them, hundreds of KB
    for each data-URI submit. Sent once only: provider clients never follow redirects."""
    while parts:
        yield parts.pop()


def error_body(exc: ProviderError) -> Any:
    """The parsed JSON body of a translated HTTP error (the snippet ``status_error`` kept in
    ``details["body"]``), or None: no body, or one that does not parse (cut short, not JSON)."""
    details = exc.details if isinstance(exc.details, Mapping) else {}
    try:
        return parse_json(str(details.get("body") or "").encode())
    except (ValueError, RecursionError):
        return None


def parse_json(body: bytes) -> Any:
    """A JSON body parsed with orjson (``ValueError`` when it is not JSON, nesting over 1,024
    levels included): provider bodies echo their inputs, a data URI makes them hundreds of KB."""
    return orjson.loads(body)


def output_urls(value: Any) -> tuple[str, ...]:
    """Output URLs from a provider's result: a URL, a list of URLs, or a list of ``{"url"}``
    objects (fal). Anything that is not an http(s) or data URL is left out."""
    items = value if isinstance(value, list) else [value]
    urls: list[str] = []
    for item in items:
        url = item.get("url") if isinstance(item, Mapping) else item
        if isinstance(url, str) and url.startswith(("https://", "http://", "data:")):
            urls.append(url)
    return tuple(urls)


def expect_object(data: Any, *, provider: str, what: str) -> dict[str, Any]:
    """``data`` as a JSON object, or a retryable error: a 2xx with another shape is the provider
    misbehaving, which a later call may not repeat."""
    if not isinstance(data, dict):
        raise RetryableProviderError(
            f"{provider}: {what} is not a JSON object", details={"provider": provider}
        )
    return data


def error_status(exc: ProviderError) -> int | None:
    """The HTTP status behind a translated error, when there was one."""
    details = exc.details
    if isinstance(details, Mapping) and isinstance(details.get("status"), int):
        return int(details["status"])
    return None


# Keys of ``Submission.params`` that steer where the adapter puts the input images; never sent.
IMAGE_KEY_PARAM = "image_key"  # the first input URL goes under this input key
IMAGES_KEY_PARAM = "images_key"  # when given, every input URL goes, as a list, under this key


def model_input(
    submission: Submission,
    *,
    image_key: str,
    count_key: str | None,
    negative_key: str | None = "negative_prompt",
) -> dict[str, Any]:
    """A model's input from a submission: the params, then (winning over them) the prompt, the
    output count under ``count_key``, the negative prompt and the input image URL(s)."""
    params = dict(submission.params)
    first_key = str(params.pop(IMAGE_KEY_PARAM, image_key))
    list_key = params.pop(IMAGES_KEY_PARAM, None)
    body: dict[str, Any] = {**params, "prompt": submission.prompt}
    if count_key is not None:
        body[count_key] = submission.num_outputs
    if negative_key is not None and submission.negative_prompt is not None:
        body[negative_key] = submission.negative_prompt
    if submission.inputs:
        if list_key is not None:
            body[str(list_key)] = list(submission.inputs)
        else:
            body[first_key] = submission.inputs[0]
    return body
