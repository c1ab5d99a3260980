"""HTTP requests that keep credentials at home and cannot hang or flood a run (standard library only).

``fetch(req, timeout=..., max_bytes=...)`` sends one ``urllib`` request and returns ``(status, body)``:

- **Credentials stay with the configured origin.** Redirects are followed only within the origin
  of the request (same scheme, host and port). A redirect to any other origin is *refused*
  (:class:`CrossOriginRedirectError`, never retried): following it without the ``Authorization``
  header would silently ask a server the user did not name, so the user is told instead.
- **One overall deadline** per request: connecting, the TLS handshake, the headers and the body
  together must finish within ``timeout`` seconds. A server that sends one byte every few seconds is
  cut off at the deadline (a timer shuts the socket down), not after ``timeout`` per read.
- **A reply-size cap**: a ``Content-Length`` over ``max_bytes`` is refused before reading, and the
  body is read in chunks and refused once it passes ``max_bytes``.

``redact_url(url)`` drops a ``user:password@`` part, for every URL that is printed or stored.

Tests: ``python -m pytest -q tests/test_security_http.py`` (stub servers on 127.0.0.1).
"""
from __future__ import annotations

import http.client
import math
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from .base import TeacherRequestError, TeacherUnavailableError

DEFAULT_TIMEOUT_S = 60.0                 # overall, per request
DEFAULT_MAX_REPLY_BYTES = 8 << 20        # 8 MiB of JSON is far more than any chat reply
MAX_TIMEOUT_S = 24 * 3600.0
MAX_REPLY_BYTES_LIMIT = 1 << 30
_CHUNK = 1 << 16
ERROR_BODY_BYTES = 4096                  # what is read of an HTTP error's body, for its message


class CrossOriginRedirectError(TeacherRequestError):
    """The server redirected to another origin; refused so that credentials stay with the configured one."""


class ReplyTooLargeError(TeacherRequestError):
    """The reply is larger than the configured cap (``--max-reply-bytes``)."""


class RequestDeadlineError(TeacherUnavailableError):
    """The request did not finish within its overall deadline."""


def redact_url(url: str) -> str:
    """``url`` without the password (and user name) of a ``user:password@host`` part."""
    if not isinstance(url, str):
        return url
    return re.sub(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s]*@", r"\1***@", url)


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of ``url``, the port defaulted from the scheme."""
    p = urllib.parse.urlsplit(url)
    scheme = (p.scheme or "").lower()
    try:
        port = p.port
    except ValueError:
        port = None
    if port is None:
        port = {"http": 80, "https": 443}.get(scheme)
    return scheme, (p.hostname or "").lower(), port


def check_limits(timeout: float, max_bytes: int, what: str = "request") -> tuple[float, int]:
    """``timeout`` (seconds, finite, > 0) and ``max_bytes`` (>= 1) checked against sane bounds."""
    try:
        t = float(timeout)
    except (TypeError, ValueError):
        raise ValueError(f"{what} timeout must be a number of seconds, got {timeout!r}") from None
    if not math.isfinite(t) or t <= 0 or t > MAX_TIMEOUT_S:
        raise ValueError(f"{what} timeout {timeout!r} s: must be finite, > 0 and <= {MAX_TIMEOUT_S:g}")
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or not 1 <= max_bytes <= MAX_REPLY_BYTES_LIMIT:
        raise ValueError(f"{what} max reply bytes {max_bytes!r}: must be an integer in 1..{MAX_REPLY_BYTES_LIMIT}")
    return t, max_bytes


class _Deadline:
    """Shuts every socket of one request down when its deadline passes."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.expired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def remaining(self) -> float:
        return max(0.001, self.end - time.monotonic())

    def register(self, sock) -> None:
        with self._lock:
            self._socks.append(sock)
            expired = self.expired
        if expired:
            self._shutdown(sock)

    @staticmethod
    def _shutdown(sock) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _fire(self) -> None:
        with self._lock:
            self.expired = True
            socks = list(self._socks)
        for s in socks:
            self._shutdown(s)

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()
        return False


def _connection_class(base, deadline: _Deadline):
    class _Conn(base):
        def connect(self):
            self.timeout = min(self.timeout, deadline.remaining()) if self.timeout else deadline.remaining()
            create = self._create_connection

            def create_and_register(*a, **kw):
                sock = create(*a, **kw)
                deadline.register(sock)
                return sock
            self._create_connection = create_and_register
            try:
                super().connect()
            finally:
                self._create_connection = create
            deadline.register(self.sock)
    return _Conn


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self._conn = _connection_class(http.client.HTTPConnection, deadline)

    def http_open(self, req):
        return self.do_open(self._conn, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self._conn = _connection_class(http.client.HTTPSConnection, deadline)

    def https_open(self, req):
        return self.do_open(self._conn, req, context=self._context)


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect within the request's origin; refuses one to another origin."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if origin(newurl) != origin(req.full_url):
            raise CrossOriginRedirectError(
                f"{redact_url(req.full_url)}: HTTP {code} redirect to another origin "
                f"({redact_url(newurl)}) refused, so the credentials are not sent there; "
                f"configure the final URL directly if that server is trusted")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def read_capped(resp, max_bytes: int, where: str) -> bytes:
    """The body of ``resp``, read in chunks; :class:`ReplyTooLargeError` past ``max_bytes``."""
    length = resp.headers.get("Content-Length") if getattr(resp, "headers", None) else None
    if length is not None and length.strip().isdigit() and int(length) > max_bytes:
        raise ReplyTooLargeError(f"{where}: reply of {int(length)} bytes (Content-Length) is over the "
                                 f"{max_bytes}-byte cap; raise --max-reply-bytes if it is expected")
    parts, total = [], 0
    read = getattr(resp, "read1", None) or resp.read
    while True:
        chunk = read(_CHUNK)
        if not chunk:
            break
        total += len(chunk)
        if total > max_bytes:
            raise ReplyTooLargeError(f"{where}: reply is over the {max_bytes}-byte cap (read {total} bytes); "
                                     f"raise --max-reply-bytes if it is expected")
        parts.append(chunk)
    return b"".join(parts)


def fetch(req: urllib.request.Request, timeout: float = DEFAULT_TIMEOUT_S,
          max_bytes: int = DEFAULT_MAX_REPLY_BYTES) -> tuple[int, bytes]:
    """Send ``req`` with an overall deadline, a size cap and same-origin redirects; ``(status, body)``.

    HTTP errors raise ``urllib.error.HTTPError`` (the first KiBs of its body in ``.body_prefix``); a passed
    deadline raises :class:`RequestDeadlineError`; other network failures raise their ``OSError``."""
    timeout, max_bytes = check_limits(timeout, max_bytes)
    where = redact_url(req.full_url)
    with _Deadline(timeout) as dl:
        opener = urllib.request.build_opener(_HTTPHandler(dl), _HTTPSHandler(dl), _SameOriginRedirects())
        try:
            with opener.open(req, timeout=timeout) as resp:
                body = read_capped(resp, max_bytes, where)
                status = resp.status
        except urllib.error.HTTPError as e:
            try:                                  # the error body, read now: under the deadline, capped
                e.body_prefix = e.read(ERROR_BODY_BYTES) or b""
            except (OSError, http.client.HTTPException, ValueError, AttributeError):
                e.body_prefix = b""
            raise
        except (OSError, http.client.HTTPException) as e:
            if dl.expired:
                raise RequestDeadlineError(f"{where}: no complete reply within the {timeout:g} s deadline "
                                           f"(--teacher-timeout)") from None
            if isinstance(e, http.client.HTTPException):
                raise ConnectionError(f"{type(e).__name__}: {e}") from None
            raise
    if dl.expired:
        raise RequestDeadlineError(f"{where}: no complete reply within the {timeout:g} s deadline "
                                   f"(--teacher-timeout)")
    return status, body
