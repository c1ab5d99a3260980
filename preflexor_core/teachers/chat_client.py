"""OpenAI-compatible chat-completions client on the standard library only (``urllib`` + ``json``): the
teacher's, the critic's (``reasoning.critics``) and the judge's (``rewards.judge``) one HTTP client.

``OpenAITeacher(base_url, model)``: several requests in flight (thread pool), an overall deadline
per request (``timeout``: connect + headers + body), a reply-size cap (``max_reply_bytes``), a cap on
the reply text (``max_reply_chars``, default 16 characters per requested token), retries with exponential backoff + jitter on 429 / 5xx / connection errors (``Retry-After``
honoured), no retry on 401/403 (:class:`TeacherAuthError`) or 404 (:class:`TeacherNotFoundError`).
``chat_completions_url`` turns ``http://h:p``, ``.../v1`` or a full URL into the endpoint URL.
``teacher.check(timeout)`` asks ``GET .../v1/models`` once with a short timeout: run it at start-up
so an unreachable server is one clear error, not minutes of retries.

Credentials go only to the configured origin: a redirect to another scheme, host or port is refused
(``net.CrossOriginRedirectError``, not retried), never followed with or without the key. A
``user:password@`` in the URL is sent as HTTP Basic credentials (when no API key is set) to that
origin only, and never appears in ``url``, ``name``, ``repr`` or an error message.

References: OpenAI chat-completions wire format,
https://platform.openai.com/docs/api-reference/chat/create .

Tests: ``python -m pytest -q tests/test_teachers.py`` (a fake server on 127.0.0.1).
"""
from __future__ import annotations

import base64
import concurrent.futures as cf
import email.utils
import http.client
import json
import logging
import random
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Sequence

from ..infra import env
from .base import (Messages, TeacherAuthError, TeacherError, TeacherNotFoundError, TeacherRequestError,
                   TeacherUnavailableError, check_messages)
from .net import (DEFAULT_MAX_REPLY_BYTES, DEFAULT_TIMEOUT_S, CrossOriginRedirectError, ReplyTooLargeError,
                  RequestDeadlineError, check_limits, fetch, redact_url)

log = logging.getLogger(__name__)
CHARS_PER_TOKEN_CAP = 16          # a reply longer than this many characters per requested token is cut


def chat_completions_url(base_url: str) -> str:
    """``http://h:p``, ``http://h:p/v1`` or a full ``.../chat/completions`` URL -> the endpoint URL."""
    if not isinstance(base_url, str) or not re.match(r"^https?://[^/\s]+", base_url):
        raise ValueError(f"base_url must be an http(s) URL like http://127.0.0.1:8000/v1, got "
                         f"{redact_url(base_url)!r}")
    url = base_url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if re.search(r"/v\d+$", url):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


def _split_userinfo(url: str) -> tuple[str, str | None]:
    """``url`` without a ``user:password@`` part, and that part as HTTP Basic credentials (or None)."""
    p = urllib.parse.urlsplit(url)
    if "@" not in p.netloc:
        return url, None
    userinfo, host = p.netloc.rsplit("@", 1)
    cred = base64.b64encode(urllib.parse.unquote(userinfo).encode("utf-8")).decode("ascii")
    return urllib.parse.urlunsplit((p.scheme, host, p.path, p.query, p.fragment)), cred


def models_url(base_url: str) -> str:
    """The ``GET .../v1/models`` URL of the server behind ``base_url`` (any form ``chat_completions_url`` takes)."""
    return chat_completions_url(base_url)[: -len("/chat/completions")] + "/models"


def _retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), else None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


class OpenAITeacher:
    """Client for an OpenAI-compatible ``POST /v1/chat/completions`` endpoint (stdlib only).

    ``api_key_env`` names the environment variable holding the key; when it is unset no
    ``Authorization`` header is sent (local servers such as vLLM / llama.cpp need none).
    Retries: up to ``max_retries`` more attempts after the first on 429, 5xx, timeouts and
    connection errors, sleeping ``min(backoff_max, backoff_base * 2**attempt) * U(0.5, 1.5)`` or
    the server's ``Retry-After`` (capped at ``backoff_max``).
    """

    RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = DEFAULT_TIMEOUT_S, max_retries: int = 5, concurrency: int = 8,
                 backoff_base: float = 1.0, backoff_max: float = 60.0,
                 extra_body: dict | None = None, seed: int | None = None,
                 max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES, max_reply_chars: int | None = None):
        if not model:
            raise ValueError("model must name the served model (e.g. 'gpt-4o-mini' or the vLLM model id)")
        if not 1 <= concurrency <= 256:
            raise ValueError(f"concurrency must be in 1..256, got {concurrency}")
        if not 0 <= max_retries <= 100:
            raise ValueError(f"max_retries must be in 0..100, got {max_retries}")
        if max_reply_chars is not None and not 1 <= max_reply_chars <= max_reply_bytes:
            raise ValueError(f"max_reply_chars must be in 1..max_reply_bytes ({max_reply_bytes}), got {max_reply_chars}")
        self.url, self._basic = _split_userinfo(chat_completions_url(base_url))
        self.model = model
        self.api_key_env = api_key_env
        self.timeout, self.max_reply_bytes = check_limits(timeout, max_reply_bytes, "teacher")
        self.max_reply_chars = max_reply_chars
        self.max_retries = int(max_retries)
        self.concurrency = int(concurrency)
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self.extra_body = dict(extra_body or {})
        self.name = f"openai:{model}@{redact_url(self.url)}"
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self.retries = 0  # total retries performed (for logs / tests)
        self._count_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OpenAITeacher(url={redact_url(self.url)!r}, model={self.model!r}, concurrency={self.concurrency})"

    def check(self, timeout: float = 3.0, what: str = "teacher") -> None:
        """One ``GET .../v1/models`` with a short timeout, no retries. Any HTTP reply but 401/403
        means the server is there; refused, unresolvable or silent -> :class:`TeacherUnavailableError`."""
        url = models_url(self.url)
        shown, shown_url = redact_url(self.url), redact_url(url)
        req = urllib.request.Request(url, headers={k: v for k, v in self._headers().items()
                                                   if k != "Content-Type"}, method="GET")
        try:
            fetch(req, timeout=timeout, max_bytes=self.max_reply_bytes)
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise TeacherAuthError(f"{what} endpoint {shown}: authentication failed (HTTP {e.code} from "
                                       f"{shown_url}); set {self.api_key_env} to a valid API key") from None
        except (CrossOriginRedirectError, ReplyTooLargeError) as e:
            raise type(e)(f"{what} endpoint {shown}: {e}") from None
        except (OSError, RequestDeadlineError) as e:
            reason = getattr(e, "reason", e)
            raise TeacherUnavailableError(
                f"{what} endpoint {shown} is unreachable (GET {shown_url}, timeout {timeout:g} s: "
                f"{redact_url(str(reason))}); start the server or fix the URL") from None

    # ---------------------------------------------------------------- one request
    def _headers(self) -> dict:
        h = {"Content-Type": "application/json", "Accept": "application/json"}
        key = env.secret(self.api_key_env)
        if key:
            h["Authorization"] = f"Bearer {key}"
        elif self._basic:
            h["Authorization"] = f"Basic {self._basic}"
        return h

    def _sleep_before_retry(self, attempt: int, retry_after: float | None) -> None:
        if retry_after is not None:
            delay = min(self.backoff_max, retry_after)
        else:
            with self._rng_lock:
                jitter = self._rng.uniform(0.5, 1.5)
            delay = min(self.backoff_max, self.backoff_base * (2 ** attempt)) * jitter
        with self._count_lock:
            self.retries += 1
        time.sleep(delay)

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode("utf-8")
        shown = redact_url(self.url)
        last = "no attempt made"
        for attempt in range(self.max_retries + 1):
            retry_after = None
            req = urllib.request.Request(self.url, data=data, headers=self._headers(), method="POST")
            try:
                _, raw = fetch(req, timeout=self.timeout, max_bytes=self.max_reply_bytes)
                try:
                    return json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise TeacherRequestError(f"{shown}: reply is not JSON ({e}); first bytes: "
                                              f"{raw[:200]!r}") from None
            except urllib.error.HTTPError as e:
                detail = _error_detail(e)
                if e.code in (401, 403):
                    raise TeacherAuthError(f"authentication failed: set {self.api_key_env} "
                                           f"(HTTP {e.code} from {shown}: {detail})") from None
                if e.code == 404:
                    raise TeacherNotFoundError(f"model or endpoint not found: {shown}, "
                                               f"model={self.model} ({detail})") from None
                if e.code not in self.RETRY_STATUS and e.code < 500:
                    raise TeacherRequestError(f"HTTP {e.code} from {shown} (model={self.model}): "
                                              f"{detail}") from None
                last = f"HTTP {e.code}: {detail}"
                retry_after = _retry_after_seconds(e.headers.get("Retry-After") if e.headers else None)
            except TeacherRequestError:
                raise
            except RequestDeadlineError as e:
                last = str(e)
            except (OSError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", e)
                last = f"{type(e).__name__}: {redact_url(str(reason))}"
            if attempt < self.max_retries:
                self._sleep_before_retry(attempt, retry_after)
        raise TeacherUnavailableError(f"{shown} (model={self.model}) failed after "
                                      f"{self.max_retries + 1} attempts; last error: {last}")

    def complete(self, messages: Messages, temperature: float = 0.0, max_tokens: int = 512) -> str:
        body = {"model": self.model, "messages": check_messages(messages),
                "temperature": float(temperature), "max_tokens": int(max_tokens), **self.extra_body}
        reply = self._post(body)
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise TeacherRequestError(f"{redact_url(self.url)}: reply has no choices[0].message.content: "
                                      f"{json.dumps(reply)[:300]}") from None
        text = "" if content is None else str(content)
        cap = self.max_reply_chars or max(1024, CHARS_PER_TOKEN_CAP * int(max_tokens))
        if len(text) > cap:
            log.warning("%s: reply of %d characters cut to %d (asked for %d tokens)", redact_url(self.url),
                        len(text), cap, int(max_tokens))
            text = text[:cap]
        return text

    def complete_many(self, list_of_messages: Sequence[Messages], temperature: float = 0.0,
                      max_tokens: int = 512, return_exceptions: bool = False) -> list:
        """Run up to ``concurrency`` requests at once; results in input order.

        With ``return_exceptions=True`` a failed request gives its :class:`TeacherError` in its
        slot instead of raising (so one bad item does not lose a batch).
        """
        items = list(list_of_messages)
        if not items:
            return []

        def one(msgs):
            try:
                return self.complete(msgs, temperature=temperature, max_tokens=max_tokens)
            except TeacherError as e:
                if return_exceptions:
                    return e
                raise

        if self.concurrency == 1 or len(items) == 1:
            return [one(m) for m in items]
        with cf.ThreadPoolExecutor(max_workers=min(self.concurrency, len(items)),
                                   thread_name_prefix="teacher") as pool:
            return list(pool.map(one, items))


def _error_detail(e: urllib.error.HTTPError) -> str:
    raw = (getattr(e, "body_prefix", b"") or b"")[:500].decode("utf-8", "replace")
    try:
        msg = json.loads(raw).get("error", raw)
        if isinstance(msg, dict):
            msg = msg.get("message", msg)
        return str(msg)[:300] or e.reason
    except (ValueError, AttributeError):
        return raw.strip()[:300] or str(e.reason)
