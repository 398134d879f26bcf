"""Issue #19 items 3 and 6: the HTTP judge client and the judge server under hostile peers.

Every network test runs on 127.0.0.1 with small, bounded servers and clients (each socket has a
timeout, each loop a count), so a regression fails in seconds instead of hanging.
"""
import contextlib
import json
import logging
import random
import socket
import threading
import time

import pytest

from rewards.judge import HTTPJudge, JudgeError, JudgeParseError, parse_verdicts, redact

SECRET = "sk-test-0123456789abcdefSECRET"

# ---------------------------------------------------------------------------------------------
# parse_verdicts is linear: random and adversarial 100 KB replies
# ---------------------------------------------------------------------------------------------

SIZE = 100_000
ADVERSARIAL = {
    "newlines": "\n" * SIZE,  # the case: 4 KB of these took 32.8 s before
    "space-newline": " \n" * (SIZE // 2),
    "spaces": " " * SIZE,
    "markdown-prefix": "- **" * (SIZE // 4),
    "prefix-lines": "- ** \n" * (SIZE // 6),
    "digits": "1" * SIZE,  # int() of a 100,000-digit index raised ValueError before
    "digit-colon-lines": "1:\n" * (SIZE // 3),
    "open-brackets": "[" * SIZE,  # raw_decode: RecursionError
    "unclosed-lists": "[1, " * (SIZE // 4),
    "bracket-words": '["yes", ' * (SIZE // 8),
    "element-words": "element " * (SIZE // 8),
    "near-miss": "1: ye\n" * (SIZE // 6),
}


def _timed_parse(text: str, n: int = 3) -> float:
    start = time.perf_counter()
    with contextlib.suppress(JudgeParseError):
        parse_verdicts(text, n)
    return time.perf_counter() - start


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_parser_is_fast_on_adversarial_replies(name):
    assert _timed_parse(ADVERSARIAL[name]) < 0.5, name


def test_parser_is_fast_on_random_replies():
    rng = random.Random(19)
    alphabet = "\n\n\n   \t-*_`#>:.)(=[]{},\"'0123456789yesnocontradictelementsupported"
    for _ in range(20):  # bounded: 20 replies of 100 KB
        text = "".join(rng.choices(alphabet, k=SIZE))
        assert _timed_parse(text, n=rng.randint(1, 50)) < 0.5


def test_parser_finds_verdicts_inside_100kb_of_noise():
    noise = "\n \n- **" * 10_000
    text = noise + "\n1: yes\n2: no\n- **3**: contradicted\n" + noise
    start = time.perf_counter()
    assert parse_verdicts(text, 3) == ["supported", "unsupported", "contradicted"]
    assert time.perf_counter() - start < 0.5


# ---------------------------------------------------------------------------------------------
# Raw-socket servers that misbehave
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def raw_server(serve_connection, max_connections: int = 8):
    """Accept up to `max_connections` connections on 127.0.0.1 and hand each (socket, stop event,
    request bytes) to `serve_connection` in a daemon thread; yields the base URL."""
    stop = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)

    def read_request(conn) -> bytes:
        data = b""
        conn.settimeout(2.0)
        while b"\r\n\r\n" not in data and len(data) < 65536:
            chunk = conn.recv(4096)
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body

    def one(conn):
        with conn, contextlib.suppress(OSError):
            serve_connection(conn, stop, read_request(conn))

    def accept():
        for _ in range(max_connections):
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                except OSError:  # the listener was closed: the test is over
                    return
                threading.Thread(target=one, args=(conn,), daemon=True).start()
                break

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    finally:
        stop.set()
        listener.close()


def chat_body(content: str) -> bytes:
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                    "finish_reason": "stop"}]}).encode()


def response(status: str, body: bytes, extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{extra}Connection: close\r\n\r\n").encode() + body


def judge_for(base_url: str, **options) -> HTTPJudge:
    return HTTPJudge(base_url, model="judge", **{"timeout": 0.6, "max_retries": 0, "backoff": 0.01,
                                                 "api_key": SECRET, **options})


# ---------------------------------------------------------------------------------------------
# Whole-request deadline
# ---------------------------------------------------------------------------------------------


def trickle_headers(conn, stop, request):
    for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000:  # 1 byte per 50 ms, never done
        if stop.wait(0.05):
            return
        conn.sendall(bytes([byte]))


def trickle_body(conn, stop, request):
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
    for _ in range(1000):  # each byte well within any per-read socket timeout
        if stop.wait(0.05):
            return
        conn.sendall(b" ")


@pytest.mark.parametrize("serve_connection", [trickle_headers, trickle_body])
def test_http_judge_deadline_covers_the_whole_request(serve_connection):
    with raw_server(serve_connection) as base_url:
        judge = judge_for(base_url, timeout=0.6, max_retries=1)
        start = time.monotonic()
        with pytest.raises(JudgeError) as info:
            judge.judge("a caption", ["an element"])
        elapsed = time.monotonic() - start
    assert (info.value.kind, info.value.attempts) == ("timeout", 2)
    assert "timeout=0.6 s" in str(info.value)
    assert elapsed < 3.0  # 2 attempts x 0.6 s + backoff; before: held for 50 s per attempt


# ---------------------------------------------------------------------------------------------
# Response size cap
# ---------------------------------------------------------------------------------------------


def endless_body(conn, stop, request):
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n")
    chunk = b"x" * 65536
    for _ in range(10_000):  # up to 655 MB if nobody stops reading
        if stop.is_set():
            return
        conn.sendall(chunk)


def huge_declared(conn, stop, request):
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n")
    stop.wait(5.0)


@pytest.mark.parametrize("serve_connection, message", [
    (endless_body, "exceeds max_response_bytes=65536"),
    (huge_declared, "declares Content-Length 10000000000 > max_response_bytes=65536"),
])
def test_http_judge_caps_the_response_size(serve_connection, message):
    with raw_server(serve_connection) as base_url:
        judge = judge_for(base_url, timeout=5.0, max_retries=2, max_response_bytes=65536)
        start = time.monotonic()
        with pytest.raises(JudgeError) as info:
            judge.judge("a caption", ["an element"])
    assert message in str(info.value)
    assert (info.value.kind, info.value.attempts) == ("bad_response", 1)  # not retried
    assert time.monotonic() - start < 2.0


def test_http_judge_reads_a_reply_up_to_the_cap():
    body = chat_body("1: yes")

    def ok(conn, stop, request):
        conn.sendall(response("200 OK", body))

    with raw_server(ok) as base_url:
        assert judge_for(base_url, max_response_bytes=len(body)).judge("c", ["e"]) == ["supported"]


def test_http_judge_default_cap_is_documented():
    judge = HTTPJudge("http://127.0.0.1:1/v1", model="m")
    assert judge.max_response_bytes == 2**20 and "max_response_bytes" in HTTPJudge.__doc__
    with pytest.raises(ValueError, match="max_response_bytes >= 1"):
        HTTPJudge("http://127.0.0.1:1/v1", model="m", max_response_bytes=0)


# ---------------------------------------------------------------------------------------------
# The API key never appears in errors or logs
# ---------------------------------------------------------------------------------------------


def _echo(status: str, wrap):
    def serve_connection(conn, stop, request):
        head = request.split(b"\r\n\r\n", 1)[0].decode()
        auth = next(line for line in head.split("\r\n") if line.lower().startswith("authorization:"))
        conn.sendall(response(status, wrap(auth)))
    return serve_connection


@pytest.mark.parametrize("status, wrap, kind", [
    ("401 Unauthorized", lambda auth: json.dumps({"error": f"bad header {auth}"}).encode(), "http_error"),
    ("503 Busy", lambda auth: f"overloaded; you sent {auth}".encode(), "http_error"),
    # the key cut off by the 200-character excerpt: its start must not leak either
    ("500 Oops", lambda auth: ("x" * (200 - 30) + auth).encode(), "http_error"),
    ("200 OK", lambda auth: f"<html>{auth}</html>".encode(), "bad_response"),
    ("200 OK", lambda auth: ("y" * 150 + auth).encode(), "bad_response"),
    ("200 OK", lambda auth: chat_body(f"I refuse. You sent {auth}"), "unparseable"),
])
def test_http_judge_never_shows_the_api_key(status, wrap, kind, caplog):
    with raw_server(_echo(status, wrap)) as base_url, caplog.at_level(logging.DEBUG):
        with pytest.raises(JudgeError) as info:
            judge_for(base_url, timeout=5.0, max_retries=1).judge("a caption", ["an element"])
    error = info.value
    assert error.kind == kind and "[redacted]" in str(error)
    for text in (str(error), repr(error), repr(error.args), caplog.text):
        assert SECRET not in text and SECRET[:8] not in text, text


def test_redact_hides_whole_and_cut_off_secrets():
    assert redact(f"a {SECRET} b {SECRET}", SECRET) == "a [redacted] b [redacted]"
    assert redact("tail " + SECRET[:10], SECRET) == "tail [redacted]"
    assert redact("no secret here", SECRET) == "no secret here"
    assert redact("anything", None) == "anything"
