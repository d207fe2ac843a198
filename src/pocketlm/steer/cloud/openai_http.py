"""The HTTP side of the OpenAI-compatible cloud: one bounded POST per completion, every failure one clear line.

Thin on purpose: `OpenAICloud` (openai_cloud.py) holds the steering logic; this module only sends JSON,
counts payload bytes and round-trip time, and turns connection errors, HTTP errors, timeouts and malformed answers into
`OpenAICloudError` naming the URL.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time

from ...errors import PocketLMError
from ..downlink.certify import NotCertifiable as StepNotCertifiable

log = logging.getLogger(__name__)


class OpenAICloudError(PocketLMError):
    """The OpenAI-compatible server could not be reached, refused a request, or answered without log-probs."""


class NotCertifiable(OpenAICloudError, StepNotCertifiable):
    """`exact()` cannot give a sound exact score for an id (the server re-tokenizes the candidate differently,
    its echoed log-probs do not line up with its step log-probs, or too many ids were asked), or `full()` was
    asked: the engine (certify.py) takes the best known token and counts the step as uncertified."""


class LogprobsCapped(OpenAICloudError):
    """The server refused `logprobs=K`; `limit` is the largest K its message names (None if it names none)."""

    def __init__(self, message: str, limit: int | None):
        super().__init__(message)
        self.limit = limit


_CAP = re.compile(r"(?:max|maximum|limit|allowed)[^0-9]{0,40}?(\d+)", re.IGNORECASE)


class Transport:
    """JSON over HTTP to `base` (`http(s)://HOST:PORT`, with or without `/v1`). Thread-safe; counts
    `bytes_up` / `bytes_down` (JSON bodies, not HTTP headers), `requests` and `seconds` (round trips)."""

    def __init__(self, base: str, api_key: str | None, *, timeout: float, connect_timeout: float):
        import httpx  # the `serve` extra

        self._errors = (httpx.TimeoutException, httpx.HTTPError)
        self._stale = httpx.RemoteProtocolError  # a kept-alive connection the server closed meanwhile
        base = base.rstrip("/")
        self.base = base.removesuffix("/v1")
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, connect=connect_timeout),
                                    limits=httpx.Limits(max_connections=64), trust_env=False)
        self._lock = threading.Lock()
        self.bytes_up = self.bytes_down = self.requests = self.retries = 0
        self.seconds = 0.0  # summed round trips (concurrent requests overlap)

    def _count(self, up: int, down: int, seconds: float) -> None:
        with self._lock:
            self.bytes_up += up
            self.bytes_down += down
            self.requests += 1
            self.seconds += seconds

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        url = self.base + path
        data = json.dumps(body, separators=(",", ":")).encode() if body is not None else b""
        t0 = time.perf_counter()
        try:
            headers = {"Content-Type": "application/json"} if data else None
            try:
                r = self._client.request(method, url, content=data or None, headers=headers)
            except self._stale:  # the server closed an idle kept-alive connection as we reused it: once more,
                # on a fresh one (every request here is idempotent: greedy scoring, no server state)
                self.retries += 1
                r = self._client.request(method, url, content=data or None, headers=headers)
        except self._errors[0]:
            raise OpenAICloudError(f"the OpenAI-compatible server at {url} did not answer within "
                                   f"{self.timeout:g} s") from None
        except self._errors[1] as e:
            raise OpenAICloudError(f"cannot reach an OpenAI-compatible server at {url}: "
                                   f"{type(e).__name__}: {e}") from None
        self._count(len(data), len(r.content), time.perf_counter() - t0)
        if r.status_code >= 400:
            text = " ".join(r.text.split())[:300]
            if r.status_code == 401:
                raise OpenAICloudError(f"{url} answered HTTP 401: missing or wrong API key "
                                       "(--cloud-token or POCKETLM_OPENAI_KEY)")
            if r.status_code in (400, 422) and "logprob" in text.lower() and body and body.get("logprobs"):
                m = _CAP.search(text)
                raise LogprobsCapped(f"{url} refused logprobs={body['logprobs']}: {text}",
                                     int(m.group(1)) if m else None)
            raise OpenAICloudError(f"{url} answered HTTP {r.status_code}: {text}")
        try:
            doc = r.json()
        except ValueError:
            raise OpenAICloudError(f"{url} answered with malformed JSON: {r.text[:120]!r}") from None
        if not isinstance(doc, dict):
            raise OpenAICloudError(f"{url} answered with JSON that is not an object: {r.text[:120]!r}")
        return doc

    def close(self) -> None:
        self._client.close()
