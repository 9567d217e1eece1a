"""HTTP plumbing shared by the adapters: one request function that translates httpx errors and
status codes into the types of callbacks/errors.py, plus small parsing helpers.

    httpx.TimeoutException, other transport errors    -> RetryableProviderError
    httpx.InvalidURL, httpx.UnsupportedProtocol        -> PermanentProviderError (configuration)
    5xx, 408                                           -> RetryableProviderError
    429                                                -> ProviderRateLimited(retry_after_s)
    other 4xx (and 3xx: redirects are never followed)  -> PermanentProviderError
    2xx whose body is not JSON                         -> RetryableProviderError

Every translated error carries ``details`` with the status, the method, the URL without its query
(callback URLs carry per-task tokens) and the start of the provider's answer.
"""

from __future__ import annotations

import email.utils
import math
import re
from collections.abc import Mapping
from datetime import UTC
from typing import Any

import httpx

from callbacks.errors import (
    PermanentProviderError,
    ProviderError,
    ProviderRateLimited,
    RetryableProviderError,
)
from callbacks.provider import Submission
from statemachine import clock

_SNIPPET_CHARS = 500

# A failure whose text says the input itself is wrong (or was refused by a safety filter) will
# fail the same way on a retry; anything else (OOM, timeouts, crashed workers) may not.
_INPUT_ERROR = re.compile(
    r"validation|invalid|must be|not supported|unsupported|unprocessable|nsfw|safety|"
    r"content.?policy|moderat|sensitive",
    re.IGNORECASE,
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
    try:
        response = await client.request(method, url, headers=headers, json=json, params=params)
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
        raise PermanentProviderError(
            f"{provider}: bad request URL: {exc}", details={"provider": provider}
        ) from exc
    except httpx.TimeoutException as exc:
        raise RetryableProviderError(
            f"{provider}: timeout: {type(exc).__name__}", details={"provider": provider}
        ) from exc
    except httpx.HTTPError as exc:
        raise RetryableProviderError(
            f"{provider}: connection failed: {type(exc).__name__}: {exc}",
            details={"provider": provider},
        ) from exc
    try:
        response.raise_for_status()
    except httpx.HTTPStatusError as exc:
        raise status_error(response, provider=provider, now=clock.now()) from exc
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError as exc:
        raise RetryableProviderError(
            f"{provider}: response is not JSON",
            details={"provider": provider, "body": response.text[:_SNIPPET_CHARS]},
        ) from exc


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
