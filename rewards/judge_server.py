"""A local OpenAI-compatible chat server for the caption judge, backed by a transformers causal LM.

    python -m rewards.judge_server --model tiny --port 0            # random tiny LM, prints its URL
    python -m rewards.judge_server --model /models/Qwen3-4B --port 8000
    python -m rewards.judge_server --model PATH --port 8000 --host 0.0.0.0   # reachable from outside

then `HTTPJudge("http://127.0.0.1:8000/v1", model="tiny")`. Routes:

    POST /v1/chat/completions   {"model", "messages", "max_tokens", "temperature", "top_p"}
                                -> {"id", "object": "chat.completion", "created", "model",
                                    "choices": [{"index", "message", "finish_reason"}], "usage"}
    GET  /v1/models             the one served model
    GET  /health                {"status": "ok"}

It exists to test the HTTP judge end to end and to judge with a small local model; production
serves the judge with vLLM, which speaks the same protocol. `--model tiny` is a randomly
initialised 2-layer Qwen2 with a word-level tokenizer built in code (no download): it answers
fast on CPU, with garbage. A path loads `AutoModelForCausalLM` and its tokenizer from a folder;
the tokenizer's chat template is applied when it has one, else messages are joined as
"role: content" lines. No streaming, n = 1 only, no authentication, so it listens on 127.0.0.1
unless --host says otherwise.

Limits (`ServerLimits`, each a flag: --max-tokens-cap, --request-timeout, ...): one generation at
a time, at most max_queue waiting (more -> 503 + Retry-After); max_tokens above max_tokens_cap
(512) or below 1 -> 400; each request has a deadline (request_timeout) and generation also stops
when its client disconnects; a fixed pool of max_connections worker threads (a connection beyond
it -> 503 at once) and read_timeout for a whole request to arrive. Only `Content-Type:
application/json` bodies (else 415) and only a Host header naming the bound address (else 403),
so a web page open on the same machine cannot drive it; an unknown model name -> 404
(`model_not_found`, as OpenAI answers); a malformed Content-Length -> 400, a missing one -> 411.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import json
import logging
import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass, fields
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from rewards.judge import is_loopback

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_TOKENS = 256  # when a request gives no max_tokens (at most ServerLimits.max_tokens_cap)
RETRY_AFTER_S = 1  # the Retry-After of a 503 "busy"
MAX_BODY_BYTES = 16 * 2**20


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def tiny_judge_config(vocab_size: int, hidden_size: int = 32, num_layers: int = 2) -> dict:
    """Numbers for a tiny random Qwen2 causal LM that generates in milliseconds on a CPU."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 8192,  # the judge prompt with a long caption fits
        "tie_word_embeddings": True,
    }


def _tiny_words() -> list[str]:
    import re

    from rewards.judge import COVERAGE_PROMPT

    text = COVERAGE_PROMPT + " system user assistant yes no contradict " + " ".join(map(str, range(64)))
    return sorted(set(re.findall(r"\w+|[^\w\s]", text.lower())))


class ChatModel:
    """A causal LM plus tokenizer that turns OpenAI chat messages into one reply."""

    def __init__(self, name: str, model: Any, tokenizer: Any):
        self.name, self.model, self.tokenizer = name, model, tokenizer

    @classmethod
    def load(cls, spec: str, seed: int = 0) -> "ChatModel":
        """`spec` is "tiny" (random, built in code) or a local model folder."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if spec == "tiny":
            from transformers import Qwen2Config, Qwen2ForCausalLM

            from rl.models.encoder import build_word_tokenizer

            tokenizer = build_word_tokenizer(_tiny_words())
            torch.manual_seed(seed)  # the same garbage on every start
            config = Qwen2Config(**tiny_judge_config(len(tokenizer)),
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            model = Qwen2ForCausalLM(config)
        else:
            tokenizer = AutoTokenizer.from_pretrained(spec)
            model = AutoModelForCausalLM.from_pretrained(spec)
        return cls(spec, model.eval(), tokenizer)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of the chat: the tokenizer's template if it has one, else "role: content" lines."""
        messages = [{"role": m["role"], "content": _content_text(m.get("content"))} for m in messages]
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
        return self.tokenizer(text)["input_ids"]

    def generate(self, messages: list[dict], max_tokens: int, temperature: float, top_p: float = 1.0,
                 should_stop=None):
        """(reply text, prompt tokens, completion tokens, finish_reason). `should_stop()` is asked
        after every new token (the server's deadline, a client that left). Not thread-safe: the
        server runs one generation at a time."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), bool(should_stop()), dtype=torch.bool)

        ids = self.prompt_ids(messages)
        input_ids = torch.tensor([ids])  # (1, P)
        sample = temperature > 0
        options = {"do_sample": sample, "temperature": temperature, "top_p": top_p} if sample else {
            "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        eos = self.tokenizer.eos_token_id
        if should_stop is not None:
            options["stopping_criteria"] = StoppingCriteriaList([Stop()])
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_tokens,
                eos_token_id=eos,
                pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos,
                **options,
            )
        new = out[0, len(ids):].tolist()  # (T,)
        finish = "stop" if eos is not None and eos in new else "length"
        text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        return text, len(ids), len(new), finish


def _content_text(content: Any) -> str:
    """OpenAI message content: a string, or a list of parts of which the text ones count."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------


class _HTTPError(Exception):
    """An error reply: status, OpenAI-style message, error type and code, extra headers."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 code: str | int | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.code = status if code is None else code
        self.headers = headers or {}


def _busy(message: str) -> _HTTPError:
    return _HTTPError(503, message, "server_busy", headers={"Retry-After": str(RETRY_AFTER_S)})


class _DeadlineReader(io.RawIOBase):
    """A socket's bytes, every recv bounded by one deadline for the whole request (a socket
    timeout alone restarts on every byte, so a client trickling 1 byte/s would hold a thread)."""

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock, self.deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive within read_timeout")
        self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


def _drain(sock: socket.socket, limit: int = 2**20) -> None:
    """Read what the client already sent, so that close() sends FIN rather than RST (an RST can
    discard our reply before the client reads it)."""
    try:
        sock.setblocking(False)
        for _ in range(limit // 65536):
            if not sock.recv(65536):
                break
    except OSError:
        pass


def _client_gone(sock: socket.socket) -> bool:
    """True when the client closed or reset its connection (it is readable and has no data)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class _Handler(BaseHTTPRequestHandler):
    """One request per connection (replies carry "Connection: close")."""

    protocol_version = "HTTP/1.1"
    server: "JudgeServer"

    def setup(self) -> None:
        super().setup()
        limits = self.server.limits
        start = time.monotonic()
        self.read_deadline = start + limits.read_timeout
        self.deadline = start + limits.request_timeout
        self.rfile.close()  # the plain makefile() one: a reader bounded by the deadline instead
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, self.read_deadline))

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            _drain(self.connection)

    def log_message(self, format, *args):  # http.server writes every request to stderr
        logger.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
        body = json.dumps(payload).encode()
        self.close_connection = True
        try:
            self.connection.settimeout(self.server.limits.read_timeout)
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", "Content-Length": str(len(body)),
                                "Connection": "close", **(headers or {})}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client left
            logger.debug("could not send the %d reply: the client left", status)

    def _error(self, e: _HTTPError) -> None:
        self._send(e.status, {"error": {"message": e.message, "type": e.kind, "param": None,
                                        "code": e.code}}, e.headers)

    def _check_host(self) -> None:
        allowed = self.server.allowed_hosts
        host = (self.headers.get("Host") or "").strip().lower()
        if allowed is not None and host not in allowed:
            # A web page on this machine can POST here (DNS rebinding, "simple" requests); its
            # Host is the page's, never our bound address.
            raise _HTTPError(403, f"Host {host or '(none)'!r} is not this server's address; use one "
                                  f"of {sorted(allowed)}", "forbidden")

    def do_GET(self):
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            self._check_host()
            if path == "/health":
                self._send(200, {"status": "ok"})
            elif path in ("/v1/models", "/models"):
                self._send(200, {"object": "list", "data": [
                    {"id": self.server.chat.name, "object": "model", "created": 0, "owned_by": "unified-grpo"}]})
            else:
                raise _HTTPError(404, f"no route GET {path}; try /v1/chat/completions, /v1/models, /health",
                                 "not_found")
        except _HTTPError as e:
            self._error(e)

    def do_POST(self):
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            self._check_host()
            if path not in ("/v1/chat/completions", "/chat/completions"):
                raise _HTTPError(404, f"no route POST {path}; use /v1/chat/completions", "not_found")
            reply = self._complete(self._read_json())
        except _HTTPError as e:
            self._error(e)
            return
        except Exception as e:  # noqa: BLE001 - a model failure must still answer
            logger.exception("generation failed")
            self._error(_HTTPError(500, f"generation failed: {type(e).__name__}: {e}", "server_error"))
            return
        if reply is not None:
            self._send(200, reply)

    def _read_json(self) -> dict:
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            raise _HTTPError(411, "need a Content-Length header (chunked bodies are not accepted)")
        if not raw_length.strip().isdigit():
            raise _HTTPError(400, f"malformed Content-Length header {raw_length[:40]!r}")
        length = int(raw_length)
        if not 0 < length <= MAX_BODY_BYTES:
            raise _HTTPError(413 if length else 400, f"need a JSON body of 1..{MAX_BODY_BYTES} bytes, "
                                                     f"got Content-Length {length}")
        content_type = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if content_type != "application/json":
            # text/plain and form bodies are what a web page may send without asking (no CORS
            # preflight); only JSON is accepted.
            raise _HTTPError(415, f"Content-Type must be application/json, got {content_type or '(none)'!r}")
        try:
            body = self.rfile.read(length)
        except (TimeoutError, OSError):
            raise _HTTPError(408, f"the body did not arrive within read_timeout="
                                  f"{self.server.limits.read_timeout:g} s") from None
        if len(body) != length:
            raise _HTTPError(400, f"body ended after {len(body)} of {length} bytes")
        try:
            request = json.loads(body)
        except ValueError as e:
            raise _HTTPError(400, f"body is not JSON: {e}") from None
        if not isinstance(request, dict):
            raise _HTTPError(400, "body must be a JSON object")
        return request

    def _complete(self, request: dict) -> dict | None:
        chat, limits = self.server.chat, self.server.limits
        model = request.get("model")
        if not isinstance(model, str):
            raise _HTTPError(400, "you must provide a model parameter (a string)")
        if model != chat.name:  # as OpenAI and vLLM do: only the served model's name
            raise _HTTPError(404, f"The model `{model[:100]}` does not exist; this server serves "
                                  f"`{chat.name}` (GET /v1/models)", code="model_not_found")
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and "role" in m for m in messages
        ):
            raise _HTTPError(400, "'messages' must be a non-empty list of {'role', 'content'} objects")
        if request.get("stream"):
            raise _HTTPError(400, "stream=true is not supported by this server")
        if request.get("n", 1) != 1:
            raise _HTTPError(400, "only n=1 is supported by this server")
        max_tokens = request.get("max_tokens", request.get("max_completion_tokens"))
        if max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, limits.max_tokens_cap)
        elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            # OpenAI's semantics: max_tokens >= 1 (0 is refused, not read as "the default")
            raise _HTTPError(400, f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        elif max_tokens > limits.max_tokens_cap:
            raise _HTTPError(400, f"max_tokens={max_tokens} is above this server's cap "
                                  f"{limits.max_tokens_cap} (--max-tokens-cap)")
        temperature = request.get("temperature", 1.0)  # OpenAI's default
        top_p = request.get("top_p", 1.0)
        for name, value in (("temperature", temperature), ("top_p", top_p)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise _HTTPError(400, f"{name} must be a number >= 0, got {value!r}")
        with self.server.generation_slot(self.deadline):
            def should_stop() -> bool:
                return time.monotonic() > self.deadline or _client_gone(self.connection)

            try:
                text, n_prompt, n_new, finish = chat.generate(
                    messages, max_tokens, float(temperature), float(top_p), should_stop=should_stop)
            except ValueError as e:
                raise _HTTPError(400, str(e)) from None
        if time.monotonic() > self.deadline:
            raise _HTTPError(504, f"generation stopped at the request deadline "
                                  f"(request_timeout={limits.request_timeout:g} s)", "timeout")
        if _client_gone(self.connection):
            logger.info("client left; generation stopped after %d tokens", n_new)
            return None
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": chat.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new,
                      "total_tokens": n_prompt + n_new},
        }


@dataclass(frozen=True)
class ServerLimits:
    """What one client can take from the others (issue #19 item 6).

    max_tokens_cap: the largest max_tokens a request may ask; above it -> 400 (default 512; a
        judge's per-element verdicts need about 4 tokens an element). A request without
        max_tokens gets min(256, max_tokens_cap).
    request_timeout: seconds from accepting a connection to the reply, waiting for the model
        included; generation stops there (504), or as soon as its client disconnects (default 60).
    read_timeout: seconds for the whole request (line, headers, body) to arrive, and for each
        write of the reply; a half-sent request is dropped after it (default 10).
    max_connections: connections handled at once, one worker thread each (the pool's size); one
        more is answered at once with 503 and Retry-After (default 64).
    max_queue: requests waiting for the model (it generates one at a time); one more -> 503
        with Retry-After (default 8).
    backlog: the listen queue (default 128; was 5, which reset 67 of 200 simultaneous requests).
    """

    max_tokens_cap: int = 512
    request_timeout: float = 60.0
    read_timeout: float = 10.0
    max_connections: int = 64
    max_queue: int = 8
    backlog: int = 128

    def __post_init__(self):
        if (self.max_tokens_cap < 1 or self.request_timeout <= 0 or self.read_timeout <= 0
                or self.max_connections < 1 or self.max_queue < 0 or self.backlog < 1):
            raise ValueError(f"judge server limits need max_tokens_cap, max_connections, backlog >= 1, "
                             f"timeouts > 0 and max_queue >= 0; got {self}")


class JudgeServer(HTTPServer):
    """An HTTPServer with a fixed pool of `max_connections` worker threads (ThreadingHTTPServer
    starts a thread per connection: 200 half-sent connections were 206 threads) and one model."""

    def __init__(self, address: tuple[str, int], chat: Any, limits: ServerLimits):
        self.chat, self.limits = chat, limits
        self.request_queue_size = limits.backlog  # read by server_activate's listen()
        super().__init__(address, _Handler)
        self._slots = threading.BoundedSemaphore(limits.max_connections)
        self._pool = concurrent.futures.ThreadPoolExecutor(limits.max_connections, "judge-server")
        self._model_lock = threading.Lock()
        self._waiting, self._waiting_lock = 0, threading.Lock()
        host, port = self.server_address[:2]
        self.base_url = f"http://{host}:{port}/v1"
        self.allowed_hosts = _allowed_hosts(host, port)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        self._pool.submit(self._work, request, client_address)

    def _work(self, request, client_address) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 - one broken connection must not end the worker
            logger.debug("connection from %s failed", client_address, exc_info=True)
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def _refuse(self, sock: socket.socket) -> None:
        """503 from the accepting thread without reading the request: no thread is started."""
        body = json.dumps({"error": {"message": "server busy: all connections in use", "type": "server_busy",
                                     "param": None, "code": 503}}).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: {RETRY_AFTER_S}\r\nConnection: close\r\n\r\n")
        try:
            sock.settimeout(0.2)
            sock.sendall(head.encode() + body)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        _drain(sock)
        self.shutdown_request(sock)

    @contextlib.contextmanager
    def generation_slot(self, deadline: float):
        """Hold the model, waiting at most until `deadline` behind at most `max_queue` others."""
        with self._waiting_lock:
            if self._waiting >= self.limits.max_queue and self._model_lock.locked():
                raise _busy(f"server busy: {self._waiting} requests already wait for the model "
                            f"(max_queue={self.limits.max_queue})")
            self._waiting += 1
        try:
            acquired = self._model_lock.acquire(timeout=max(deadline - time.monotonic(), 0.0))
        finally:
            with self._waiting_lock:
                self._waiting -= 1
        if not acquired:
            raise _busy("server busy: the model stayed in use until this request's deadline")
        try:
            yield
        finally:
            self._model_lock.release()

    def handle_error(self, request, client_address) -> None:
        logger.debug("request from %s failed", client_address, exc_info=True)

    def server_close(self) -> None:
        super().server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _allowed_hosts(host: str, port: int) -> set[str] | None:
    """Host header values that name this server; None (any) for a wildcard address."""
    if host in ("0.0.0.0", "::", ""):
        return None
    names = {host, f"[{host}]"} if ":" in host else {host}
    if is_loopback(host):
        names |= {"localhost", "127.0.0.1", "[::1]"}
    out = {f"{n}:{port}".lower() for n in names}
    if port == 80:
        out |= {n.lower() for n in names}
    return out


def serve(model: str | Any = "tiny", host: str = DEFAULT_HOST, port: int = 0, *,
          allow_remote: bool = False, limits: ServerLimits | None = None,
          **limit_options) -> tuple[JudgeServer, threading.Thread]:
    """Start the server in a daemon thread: (server, thread). `port=0` picks a free port; read it
    from `server.server_address[1]`, or use `server.base_url` ("http://host:port/v1").
    `model`: "tiny", a model folder, or a ready object with `name` and `generate(messages,
    max_tokens, temperature, top_p, should_stop=...)` (a `ChatModel`, or a test's stub).
    `limits` or its fields as keywords (max_tokens_cap=..., see `ServerLimits`).
    Stop with `server.shutdown(); server.server_close()`. A non-loopback host needs allow_remote.
    """
    if not is_loopback(host) and not allow_remote:
        raise ValueError(f"refusing to listen on {host!r} (not loopback; the server has no "
                         "authentication); pass allow_remote=True, or --host on the command line")
    limits = limits or ServerLimits(**limit_options)
    chat = ChatModel.load(model) if isinstance(model, str) else model
    server = JudgeServer((host, port), chat, limits)
    thread = threading.Thread(target=server.serve_forever, name="judge-server", daemon=True)
    thread.start()
    return server, thread


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="'tiny' (random, no download) or a local model folder")
    parser.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one (printed)")
    parser.add_argument("--host", default=None,
                        help=f"address to listen on (default {DEFAULT_HOST}); naming one allows non-loopback")
    helps = {
        "max_tokens_cap": "largest max_tokens a request may ask (above -> 400)",
        "request_timeout": "seconds from connection to reply; generation stops there (504)",
        "read_timeout": "seconds for a whole request to arrive",
        "max_connections": "worker threads; a connection beyond them gets 503 at once",
        "max_queue": "requests waiting for the model; one more gets 503",
        "backlog": "listen queue length",
    }
    for field in fields(ServerLimits):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default,
                            help=f"{helps[field.name]} (default {field.default})")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    limits = ServerLimits(**{f.name: getattr(args, f.name) for f in fields(ServerLimits)})
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host = args.host or DEFAULT_HOST
    if not is_loopback(host):
        logger.warning("listening on %s: anyone who can reach it can use the model (no authentication)", host)
    server, thread = serve(args.model, host, args.port, allow_remote=args.host is not None, limits=limits)
    port = server.server_address[1]
    print(f"judge server: model {args.model!r} at {server.base_url} (port {port})", flush=True)
    try:
        while thread.is_alive():
            thread.join(timeout=1.0)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()
