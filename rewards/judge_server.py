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
"role: content" lines. One generation runs at a time (requests queue on a lock); no streaming,
n = 1 only, no authentication, so it listens on 127.0.0.1 unless --host says otherwise.
"""
from __future__ import annotations

import argparse
import json
import logging
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from rewards.judge import is_loopback

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_TOKENS = 256  # when a request gives no max_tokens
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
        self._lock = threading.Lock()

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

    def generate(self, messages: list[dict], max_tokens: int, temperature: float, top_p: float = 1.0):
        """(reply text, prompt tokens, completion tokens, finish_reason)."""
        import torch

        ids = self.prompt_ids(messages)
        input_ids = torch.tensor([ids])  # (1, P)
        sample = temperature > 0
        options = {"do_sample": sample, "temperature": temperature, "top_p": top_p} if sample else {
            "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        eos = self.tokenizer.eos_token_id
        with self._lock, torch.inference_mode():
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


class _BadRequest(ValueError):
    pass


def _handler(chat: ChatModel) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # http.server writes every request to stderr
            logger.debug("%s " + format, self.address_string(), *args)

        def _send(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
            self._send(status, {"error": {"message": message, "type": kind, "code": status}})

        def do_GET(self):
            path = self.path.split("?", 1)[0].rstrip("/")
            if path == "/health":
                self._send(200, {"status": "ok"})
            elif path in ("/v1/models", "/models"):
                self._send(200, {"object": "list", "data": [
                    {"id": chat.name, "object": "model", "created": 0, "owned_by": "unified-grpo"}]})
            else:
                self._error(404, f"no route GET {path}; try /v1/chat/completions, /v1/models, /health",
                            "not_found")

        def do_POST(self):
            path = self.path.split("?", 1)[0].rstrip("/")
            if path not in ("/v1/chat/completions", "/chat/completions"):
                self._error(404, f"no route POST {path}; use /v1/chat/completions", "not_found")
                return
            try:
                request = self._read_json()
                reply = self._complete(request)
            except _BadRequest as e:
                self._error(400, str(e))
                return
            except Exception as e:  # noqa: BLE001 - a model failure must still answer
                logger.exception("generation failed")
                self._error(500, f"generation failed: {type(e).__name__}: {e}", "server_error")
                return
            self._send(200, reply)

        def _read_json(self) -> dict:
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_BODY_BYTES:
                raise _BadRequest(f"need a JSON body of 1..{MAX_BODY_BYTES} bytes with Content-Length")
            try:
                request = json.loads(self.rfile.read(length))
            except ValueError as e:
                raise _BadRequest(f"body is not JSON: {e}") from None
            if not isinstance(request, dict):
                raise _BadRequest("body must be a JSON object")
            return request

        def _complete(self, request: dict) -> dict:
            messages = request.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and "role" in m for m in messages
            ):
                raise _BadRequest("'messages' must be a non-empty list of {'role', 'content'} objects")
            if request.get("stream"):
                raise _BadRequest("stream=true is not supported by this server")
            if request.get("n", 1) != 1:
                raise _BadRequest("only n=1 is supported by this server")
            max_tokens = request.get("max_tokens", request.get("max_completion_tokens")) or DEFAULT_MAX_TOKENS
            temperature = request.get("temperature", 1.0)  # OpenAI's default
            top_p = request.get("top_p", 1.0)
            if not isinstance(max_tokens, int) or max_tokens < 1:
                raise _BadRequest(f"max_tokens must be a positive integer, got {max_tokens!r}")
            if not isinstance(temperature, (int, float)) or temperature < 0:
                raise _BadRequest(f"temperature must be a number >= 0, got {temperature!r}")
            try:
                text, n_prompt, n_new, finish = chat.generate(
                    messages, max_tokens, float(temperature), float(top_p))
            except ValueError as e:
                raise _BadRequest(str(e)) from None
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

    return Handler




def serve(model: str | ChatModel = "tiny", host: str = DEFAULT_HOST, port: int = 0, *,
          allow_remote: bool = False) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Start the server in a daemon thread: (server, thread). `port=0` picks a free port; read it
    from `server.server_address[1]`, or use `server.base_url` ("http://host:port/v1").
    Stop with `server.shutdown(); server.server_close()`. A non-loopback host needs allow_remote.
    """
    if not is_loopback(host) and not allow_remote:
        raise ValueError(f"refusing to listen on {host!r} (not loopback; the server has no "
                         "authentication); pass allow_remote=True, or --host on the command line")
    chat = model if isinstance(model, ChatModel) else ChatModel.load(model)
    server = ThreadingHTTPServer((host, port), _handler(chat))
    server.daemon_threads = True
    bound_host, bound_port = server.server_address[:2]
    server.base_url = f"http://{bound_host}:{bound_port}/v1"
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
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host = args.host or DEFAULT_HOST
    if not is_loopback(host):
        logger.warning("listening on %s: anyone who can reach it can use the model (no authentication)", host)
    server, thread = serve(args.model, host, args.port, allow_remote=args.host is not None)
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
