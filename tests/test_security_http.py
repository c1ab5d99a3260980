"""HTTP teacher security and faults: credentials stay with the configured origin, passwords in URLs are
redacted, a dripping or flooding server is cut off (overall deadline, reply-size cap). Stub servers on
127.0.0.1 only."""
from __future__ import annotations

import http.server
import json
import threading
import time

import pytest

from preflexor_core.teachers import OpenAITeacher, TeacherRequestError, TeacherUnavailableError
from preflexor_core.teachers.net import (CrossOriginRedirectError, ReplyTooLargeError, RequestDeadlineError,
                                         redact_url)
from preflexor_core.teachers.spec import teacher_kind

REPLY = json.dumps({"choices": [{"message": {"content": "hello"}}]}).encode()


class _Server:
    """A threaded stub server; ``handler(h)`` answers each request; ``seen`` records (path, headers)."""

    def __init__(self, handler):
        seen = self.seen = []

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _any(self):
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    self.rfile.read(n)
                seen.append((self.path, dict(self.headers)))
                try:
                    handler(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass
            do_GET = do_POST = _any

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers():
    made = []

    def make(handler):
        s = _Server(handler)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


def _ok(h):
    h.send_response(200)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(REPLY)))
    h.end_headers()
    h.wfile.write(REPLY)


def _redirect_to(url, code=302):
    def answer(h):
        h.send_response(code)
        h.send_header("Location", url + "/v1/chat/completions")
        h.send_header("Content-Length", "0")
        h.end_headers()
    return answer


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirect_to_another_origin_is_refused_and_the_key_stays_home(servers, monkeypatch, code):
    monkeypatch.setenv("SEC_TEST_KEY", "sk-secret-123")
    evil = servers(_ok)
    home = servers(_redirect_to(evil.url, code))
    t = OpenAITeacher(home.url, "m", api_key_env="SEC_TEST_KEY", max_retries=2, backoff_base=0.001)
    with pytest.raises(CrossOriginRedirectError) as e:
        t.complete([{"role": "user", "content": "hi"}])
    assert "another origin" in str(e.value) and "\n" not in str(e.value)
    assert len(home.seen) == 1                   # refused at once, not retried
    assert evil.seen == []                       # the other origin got nothing, let alone the key
    assert home.seen[0][1].get("Authorization") == "Bearer sk-secret-123"


def test_redirect_to_another_port_of_the_same_host_is_another_origin(servers, monkeypatch):
    monkeypatch.setenv("SEC_TEST_KEY", "sk-secret-123")
    other = servers(_ok)
    home = servers(_redirect_to(other.url.replace("127.0.0.1", "localhost")))
    with pytest.raises(CrossOriginRedirectError):
        OpenAITeacher(home.url, "m", api_key_env="SEC_TEST_KEY", max_retries=0).complete(
            [{"role": "user", "content": "hi"}])
    assert other.seen == []


def test_redirect_within_the_origin_is_followed(servers, monkeypatch):
    import urllib.request
    from preflexor_core.teachers.net import fetch

    def answer(h):
        if h.path.startswith("/old"):
            h.send_response(302)
            h.send_header("Location", "/v1/models")
            h.send_header("Content-Length", "0")
            h.end_headers()
        else:
            _ok(h)
    s = servers(answer)
    req = urllib.request.Request(s.url + "/old/models", headers={"Authorization": "Bearer k"})
    status, body = fetch(req, timeout=5, max_bytes=10_000)
    assert (status, body) == (200, REPLY)
    assert [p for p, _ in s.seen] == ["/old/models", "/v1/models"]
    assert s.seen[1][1].get("Authorization") == "Bearer k"


def test_password_in_url_is_redacted_everywhere(servers, capsys):
    s = servers(_ok)
    url = s.url.replace("http://", "http://alice:pa55word@") + "/v1"
    t = OpenAITeacher(url, "m", max_retries=0)
    for text in (t.name, repr(t), t.url):
        assert "pa55word" not in text and "alice" not in text
    assert t.complete([{"role": "user", "content": "hi"}]) == "hello"
    # the credentials still go to the configured origin, as HTTP Basic
    assert s.seen[0][1]["Authorization"].startswith("Basic ")
    dead = OpenAITeacher("http://bob:hunter2@127.0.0.1:9/v1", "m", max_retries=0, timeout=2)
    with pytest.raises(TeacherUnavailableError) as e:
        dead.complete([{"role": "user", "content": "hi"}])
    assert "hunter2" not in str(e.value)
    with pytest.raises(ValueError) as e:
        teacher_kind("http://bob:hunter2@host/v1")
    assert "hunter2" not in str(e.value)
    assert redact_url("https://u:p@h:1/x?y=1") == "https://***@h:1/x?y=1"
    assert redact_url("http://h/a@b") == "http://h/a@b"      # an @ in the path is no credential


def test_flags_and_rows_never_hold_the_password(tmp_path):
    from preflexor_core.train.config import TrainConfig
    from preflexor_core.train.resume import flat_options
    cfg = TrainConfig.from_flat(teacher="http://u:topsecret@127.0.0.1:9/v1")
    assert "topsecret" not in json.dumps(flat_options(cfg))


def test_dripping_server_is_cut_at_the_overall_deadline(servers):
    def drip(h):
        h.send_response(200)
        h.send_header("Content-Length", str(len(REPLY)))
        h.end_headers()
        for b in REPLY:
            h.wfile.write(bytes([b]))
            h.wfile.flush()
            time.sleep(0.2)                       # each read is quick; the whole reply never is
    s = servers(drip)
    t = OpenAITeacher(s.url, "m", max_retries=0, timeout=0.8)
    t0 = time.monotonic()
    with pytest.raises(TeacherUnavailableError) as e:
        t.complete([{"role": "user", "content": "hi"}])
    assert time.monotonic() - t0 < 3.0
    assert "deadline" in str(e.value)


def test_dripping_headers_are_cut_too(servers):
    def drip_headers(h):
        for b in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100:
            h.wfile.write(bytes([b]))
            h.wfile.flush()
            time.sleep(0.05)
    s = servers(drip_headers)
    t0 = time.monotonic()
    with pytest.raises(TeacherUnavailableError):
        OpenAITeacher(s.url, "m", max_retries=0, timeout=0.5).complete([{"role": "user", "content": "hi"}])
    assert time.monotonic() - t0 < 3.0


@pytest.mark.parametrize("with_length", [True, False])
def test_reply_over_the_size_cap_is_refused(servers, with_length):
    big = json.dumps({"choices": [{"message": {"content": "x" * 300_000}}]}).encode()

    def flood(h):
        h.send_response(200)
        if with_length:
            h.send_header("Content-Length", str(len(big)))
        else:
            h.send_header("Connection", "close")
        h.end_headers()
        h.wfile.write(big)
    s = servers(flood)
    t = OpenAITeacher(s.url, "m", max_retries=3, max_reply_bytes=100_000)
    with pytest.raises(ReplyTooLargeError) as e:
        t.complete([{"role": "user", "content": "hi"}])
    assert "100000-byte cap" in str(e.value)
    assert len(s.seen) == 1                      # not retried


def test_reply_text_is_capped(servers):
    long = json.dumps({"choices": [{"message": {"content": "y" * 50_000}}]}).encode()

    def answer(h):
        h.send_response(200)
        h.send_header("Content-Length", str(len(long)))
        h.end_headers()
        h.wfile.write(long)
    s = servers(answer)
    out = OpenAITeacher(s.url, "m", max_retries=0).complete([{"role": "user", "content": "hi"}], max_tokens=100)
    assert 0 < len(out) <= 16 * 100 + 1024 and len(out) < 50_000


def test_http_error_body_is_read_under_the_cap(servers):
    def err(h):
        body = b'{"error": {"message": "bad model"}}' + b" " * 1_000_000
        h.send_response(400)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
    s = servers(err)
    with pytest.raises(TeacherRequestError) as e:
        OpenAITeacher(s.url, "m", max_retries=0).complete([{"role": "user", "content": "hi"}])
    assert "bad model" in str(e.value) or "HTTP 400" in str(e.value)


@pytest.mark.parametrize("kw", [{"timeout": float("nan")}, {"timeout": float("inf")}, {"timeout": 0},
                                {"max_reply_bytes": 0}, {"max_reply_bytes": 1 << 40}, {"concurrency": 10**9}])
def test_bad_network_limits_are_refused(kw):
    with pytest.raises(ValueError):
        OpenAITeacher("http://127.0.0.1:9", "m", **kw)


def test_deadline_error_class():
    assert issubclass(RequestDeadlineError, TeacherUnavailableError)


def test_critic_endpoint_check_keeps_the_key_home(servers, monkeypatch):
    from preflexor_core.reasoning.critics import check_endpoint
    monkeypatch.setenv("OPENAI_API_KEY", "sk-critic-secret")
    evil = servers(_ok)

    def redirect(h):
        h.send_response(302)
        h.send_header("Location", evil.url + "/v1/models")
        h.send_header("Content-Length", "0")
        h.end_headers()
    home = servers(redirect)
    with pytest.raises(CrossOriginRedirectError):
        check_endpoint(home.url + "/v1", timeout=2)
    assert evil.seen == []


def test_critic_endpoint_check_has_an_overall_deadline(servers):
    from preflexor_core.reasoning.critics import CriticUnreachableError, check_endpoint

    def drip(h):
        h.send_response(200)
        h.send_header("Content-Length", "100")
        h.end_headers()
        for _ in range(100):
            h.wfile.write(b" ")
            h.wfile.flush()
            time.sleep(0.1)
    s = servers(drip)
    t0 = time.monotonic()
    with pytest.raises(CriticUnreachableError, match="deadline"):
        check_endpoint(s.url + "/v1", timeout=0.5)
    assert time.monotonic() - t0 < 3.0


def test_critic_spec_errors_redact_the_password():
    from preflexor_core.reasoning.critics import make_critic
    with pytest.raises(Exception) as e:
        make_critic("http://bob:hunter2@127.0.0.1:9/v1", check_timeout=1)
    assert "hunter2" not in str(e.value)
    with pytest.raises(ValueError) as e:
        make_critic("ftp://bob:hunter2@host/x")
    assert "hunter2" not in str(e.value)
