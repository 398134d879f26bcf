"""The judged caption reward (ReaDe eq. 3-4): parser, HTTP judge over real sockets, offline judge.

HTTP tests run real servers on 127.0.0.1: the repo's judge server with its tiny random LM, and
small stdlib servers that answer a fixed chat response, stall, or send garbage.
"""
import asyncio
import contextlib
import json
import pickle
import socket
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from rewards import judge as judge_mod
from rewards.api import load_reward
from rewards.judge import (
    COVERAGE_PROMPT,
    HTTPJudge,
    JudgedCaptionReward,
    JudgeError,
    JudgeParseError,
    OfflineJudge,
    build_judge_reward,
    caption_sentences,
    format_prompt,
    parse_verdicts,
)
from rewards.judge_server import serve
from rl.shapes import generate_shapes

# ---------------------------------------------------------------------------------------------
# Helpers: a real HTTP server whose replies a test decides
# ---------------------------------------------------------------------------------------------


def chat_reply(content: str) -> tuple[int, bytes]:
    """A well-formed OpenAI chat completion carrying `content`."""
    return 200, json.dumps({
        "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": "judge",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }).encode()


@contextlib.contextmanager
def stub_server(respond):
    """Serve POSTs on 127.0.0.1 with `respond(request_json) -> (status, body bytes)`; yields
    (base_url, state) where state records requests, headers and the most requests in flight."""
    state = SimpleNamespace(requests=[], headers=[], in_flight=0, max_in_flight=0, lock=threading.Lock())

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.requests.append(request)
                state.headers.append(dict(self.headers))
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                status, body = respond(request)
            finally:
                with state.lock:
                    state.in_flight -= 1
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", state
    finally:
        server.shutdown()
        server.server_close()


def fast_judge(base_url: str, **options) -> HTTPJudge:
    options = {"timeout": 5.0, "max_retries": 2, "backoff": 0.01, **options}
    return HTTPJudge(base_url, model="judge", **options)


def prompt_of(request: dict) -> str:
    return request["messages"][-1]["content"]


# ---------------------------------------------------------------------------------------------
# The prompt and its parser
# ---------------------------------------------------------------------------------------------


def test_prompt_is_reade_d4_with_numbered_elements():
    prompt = format_prompt("A red circle.", ["a circle", "the circle is red"])
    # D.4's instructions are kept; our answer format replaces its single coverage number.
    assert "check whether each element in the list is semantically supported" in prompt
    assert "semantic similarity is sufficient" in prompt
    assert "1. a circle\n2. the circle is red" in prompt
    assert prompt.endswith("Input reference text: A red circle.")
    assert "{caption}" in COVERAGE_PROMPT and "{elements}" in COVERAGE_PROMPT


@pytest.mark.parametrize(
    "reply",
    [
        "1: yes\n2: no\n3: contradict",
        "Sure! Here is my evaluation.\n```\n1: Yes\n2: No\n3: Contradict\n```\nLet me know if you need more.",
        "- **1**: yes\n- **2**: not supported\n- **3**: contradicted",
        "1. supported\n2) unsupported\n3 - contradiction",
        # the question echoed first (element 2's text starts with "no"): the last verdict wins
        "Elements:\n1: a circle\n2: no shapes\n3: a square\nAnswers:\n1: yes\n2: no\n3: contradict",
        'The verdicts are ["yes", "no", "contradict"].',
        '```json\n[{"element": 1, "verdict": "supported"}, {"verdict": "unsupported"},\n'
        ' {"answer": "contradicted"}]\n```',
    ],
)
def test_parser_tolerates_extra_text(reply):
    assert parse_verdicts(reply, 3) == ["supported", "unsupported", "contradicted"]


@pytest.mark.parametrize(
    "reply", ["1: yes\n3: no", "The caption is good. Final Score: 0.5", "", '["yes", "no"]']
)
def test_parser_refuses_missing_verdicts(reply):
    with pytest.raises(JudgeParseError, match="no verdict for element"):
        parse_verdicts(reply, 3)


def test_caption_sentences():
    assert caption_sentences("Two shapes. A red circle at the top!\nA square; done") == [
        "Two shapes.", "A red circle at the top!", "A square;", "done"]


# ---------------------------------------------------------------------------------------------
# HTTP judge over real sockets
# ---------------------------------------------------------------------------------------------


def test_http_judge_round_trip_to_a_score():
    reply = "Here is the evaluation:\n```\n1: yes\n2: no\n3: contradict\n```"
    with stub_server(lambda request: chat_reply(reply)) as (base_url, state):
        judge = fast_judge(base_url, api_key="sk-test-secret", temperature=0.3, max_tokens=40)
        assert judge.judge("A red circle.", ["a circle", "the circle is large", "the circle is blue"]) == [
            "supported", "unsupported", "contradicted"]
        reward = JudgedCaptionReward(judge)
        elements = {"user": ["a circle"], "detail": ["the circle is large"],
                    "supplementary": ["the circle is blue"]}
        # user 1/1, detail 0/1, supp 0/1, a contradiction: 1.0 * 1 + 1.0 * 0 + 0.8 * 0 - 0.7 * 1 = 0.3
        assert reward(["p"], ["A red circle."], elements=[elements], step=0) == [pytest.approx(0.3)]
    request, headers = state.requests[0], state.headers[0]
    assert (request["model"], request["temperature"], request["max_tokens"]) == ("judge", 0.3, 40)
    assert "1. a circle\n2. the circle is large\n3. the circle is blue" in prompt_of(request)
    assert prompt_of(request).endswith("Input reference text: A red circle.")
    assert headers["Authorization"] == "Bearer sk-test-secret"
    assert "sk-test-secret" not in repr(judge) and "sk-test-secret" not in repr(reward)


def test_http_judge_api_key_from_environment(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    with stub_server(lambda request: chat_reply("1: yes")) as (base_url, state):
        fast_judge(base_url).judge("c", ["e"])
    assert state.headers[0]["Authorization"] == "Bearer sk-from-env"


def test_http_judge_runs_requests_concurrently_up_to_the_limit():
    def respond(request):
        time.sleep(0.15)
        return chat_reply("1: yes" if "circle" in prompt_of(request).rsplit(":", 1)[1] else "1: no")

    captions = ["a circle", "a square", "a red circle", "a cross", "two circles", "a triangle"]
    with stub_server(respond) as (base_url, state):
        judge = fast_judge(base_url, max_concurrency=2)
        verdicts = asyncio.run(judge.judge_batch([(c, ["a circle"]) for c in captions]))
    assert verdicts == [["supported"], ["unsupported"]] * 3
    assert len(state.requests) == 6 and state.max_in_flight == 2


def test_http_judge_against_the_tiny_judge_server():
    server, thread = serve("tiny", "127.0.0.1", 0)
    try:
        # The server speaks OpenAI's format.
        body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "1: yes?"}],
                           "max_tokens": 3, "temperature": 0}).encode()
        request = urllib.request.Request(f"{server.base_url}/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            reply = json.loads(response.read())
        assert reply["object"] == "chat.completion" and reply["model"] == "tiny"
        assert isinstance(reply["choices"][0]["message"]["content"], str)
        assert reply["usage"]["completion_tokens"] <= 3
        usage = reply["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        with urllib.request.urlopen(f"{server.base_url}/models", timeout=30) as response:
            assert json.loads(response.read())["data"][0]["id"] == "tiny"
        # The judge round-trips: the tiny random LM's greedy garbage either parses (verdicts for
        # every element) or fails as "unparseable" after the retries, naming the endpoint.
        judge = HTTPJudge(server.base_url, model="tiny", timeout=30, max_retries=1, backoff=0.01,
                          max_tokens=8)
        elements = ["a circle", "the circle is red"]
        try:
            verdicts = judge.judge("a red circle.", elements)
        except JudgeError as e:
            assert (e.kind, e.attempts) == ("unparseable", 2), str(e)
            assert server.base_url + "/chat/completions" in str(e) and "2 attempts" in str(e)
        else:
            assert len(verdicts) == len(elements)
    finally:
        server.shutdown()
        server.server_close()


def test_judge_server_refuses_non_loopback_without_asking():
    with pytest.raises(ValueError, match="refusing to listen on '0.0.0.0'"):
        serve("tiny", "0.0.0.0", 0)


def test_http_judge_timeout_retries_then_fails_clearly():
    stall = threading.Event()

    def respond(request):
        stall.wait(3.0)  # far beyond the judge's timeout
        return chat_reply("1: yes")

    with stub_server(respond) as (base_url, state):
        judge = fast_judge(base_url, timeout=0.3, max_retries=2, api_key="sk-hidden")
        start = time.monotonic()
        with pytest.raises(JudgeError) as info:
            judge.judge("a caption", ["an element"])
        elapsed = time.monotonic() - start
        stall.set()
    error = info.value
    assert (error.kind, error.attempts) == ("timeout", 3)
    assert len(state.requests) == 3  # max_retries + 1 attempts reached the server
    assert f"{base_url}/chat/completions" in str(error) and "3 attempts" in str(error)
    assert "timed out" in str(error) and "sk-hidden" not in str(error)
    assert elapsed < 2.5  # 3 x 0.3 s timeouts + 0.01 + 0.02 s backoff, not 3 x 3 s
    assert pickle.loads(pickle.dumps(error)).kind == "timeout"  # crosses Ray actor boundaries


@pytest.mark.parametrize(
    "reply, kind",
    [
        ((200, b"<html>upstream proxy error</html>"), "bad_response"),  # not JSON
        ((200, b'{"choices": []}'), "bad_response"),  # JSON, not a chat completion
        (chat_reply("I think the caption is quite good overall."), "unparseable"),  # no verdicts
        ((503, b'{"error": "overloaded"}'), "http_error"),  # retryable status
    ],
)
def test_http_judge_garbage_fails_after_retries(reply, kind):
    with stub_server(lambda request: reply) as (base_url, state):
        with pytest.raises(JudgeError) as info:
            fast_judge(base_url, max_retries=2).judge("a caption", ["an element", "another"])
    assert (info.value.kind, info.value.attempts, len(state.requests)) == (kind, 3, 3)
    assert f"{base_url}/chat/completions" in str(info.value) and "after 3 attempts" in str(info.value)


def test_http_judge_does_not_retry_client_errors():
    with stub_server(lambda request: (401, b'{"error": "bad key"}')) as (base_url, state):
        with pytest.raises(JudgeError, match="HTTP 401") as info:
            fast_judge(base_url, max_retries=3).judge("a caption", ["an element"])
    assert (info.value.kind, len(state.requests)) == ("http_error", 1)


def test_http_judge_connection_refused():
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(JudgeError, match="cannot connect") as info:
        fast_judge(f"http://127.0.0.1:{port}/v1", max_retries=1).judge("c", ["e"])
    assert (info.value.kind, info.value.attempts) == ("connection", 2)


# ---------------------------------------------------------------------------------------------
# Reward arithmetic (eq. 3-4) with a hand-written backend
# ---------------------------------------------------------------------------------------------

ELEMENTS = {
    "user": ["u1", "u2"],
    "detail": ["d1", "d2", "d3", "d4"],
    "supplementary": ["s1", "s2", "s3", "s4", "s5"],
}
TABLE = {"u1": "supported", "u2": "unsupported", "d1": "supported", "d2": "supported",
         "d3": "supported", "d4": "unsupported", "s1": "supported", "s2": "supported",
         "s3": "contradicted", "s4": "unsupported", "s5": "unsupported"}


class TableJudge:
    """A backend (sync `judge` only): caption "table" -> TABLE, "calm" -> TABLE without the
    contradiction, anything else -> nothing supported. Records what it was asked."""

    def __init__(self):
        self.calls = []

    def judge(self, caption, elements):
        self.calls.append((caption, list(elements)))
        if caption == "table":
            return [TABLE[e] for e in elements]
        if caption == "calm":
            return [TABLE[e].replace("contradicted", "unsupported") for e in elements]
        return ["unsupported"] * len(elements)


def test_reward_arithmetic_reade_weights():
    reward = JudgedCaptionReward(TableJudge())
    scores = reward(["p"] * 3, ["table", "calm", "nothing"], elements=[ELEMENTS] * 3, step=0)
    # table: 1.0 * 1/2 + 1.0 * 3/4 + 0.8 * 2/5 - 0.7 * 1 = 0.5 + 0.75 + 0.32 - 0.7 = 0.87
    # calm:  the same without the contradiction           = 1.57
    # nothing supported, no contradiction                 = 0.0
    assert scores == [pytest.approx(0.87), pytest.approx(1.57), 0.0]
    table = reward.last_components[0]
    assert table == {"user": 0.5, "detail": 0.75, "supplementary": 0.4, "contra": 1.0,
                     "reward": pytest.approx(0.87)}


def test_reward_arithmetic_custom_weights_via_build():
    reward = JudgedCaptionReward(TableJudge(), alpha=2.0, rho=0.5, gamma=1.0, lambda_=0.25)
    # 2.0 * 1/2 + 0.5 * 3/4 + 1.0 * 2/5 - 0.25 * 1 = 1.0 + 0.375 + 0.4 - 0.25 = 1.525
    assert reward(["p"], ["table"], elements=[ELEMENTS]) == [pytest.approx(1.525)]
    built = build_judge_reward("offline", threshold=0.5, alpha=2.0, **{"lambda": 0.25})
    assert (built.weights["user"], built.lambda_, built.backend.threshold) == (2.0, 0.25, 0.5)
    with pytest.raises(ValueError, match="unknown; use one of: offline, http"):
        build_judge_reward("vllm")
    with pytest.raises(TypeError, match="judge backend 'http'"):
        build_judge_reward("http", base_url="http://127.0.0.1:1/v1", model="m", retries=3)


def test_reward_empty_group_is_dropped_and_none_means_no_score():
    judge = TableJudge()
    reward = JudgedCaptionReward(judge)
    no_detail = {"user": ["u1", "u2"], "supplementary": ELEMENTS["supplementary"]}
    empty = {"user": [], "detail": [], "supplementary": []}
    scores = reward(["p"] * 4, ["table"] * 4, elements=[no_detail, None, empty, ELEMENTS])
    # no detail group: 1.0 * 1/2 + 0.8 * 2/5 - 0.7 * 1 = 0.12 (the detail term is left out)
    assert scores == [pytest.approx(0.12), None, None, pytest.approx(0.87)]
    assert reward.last_components[0]["detail"] is None and reward.last_components[1] is None
    assert len(judge.calls) == 2  # None and empty entries ask nothing
    with pytest.raises(ValueError, match="needs kwargs\\['elements'\\]"):
        reward(["p"], ["table"])
    with pytest.raises(ValueError, match="unknown element group"):
        reward(["p"], ["table"], elements=[{"users": ["u1"]}])


def test_reward_judges_the_answer_once_per_distinct_caption():
    judge = TableJudge()
    reward = JudgedCaptionReward(judge)
    completions = [
        "<think>table</think>\n<answer>nothing</answer>",  # the answer is judged, not the reasoning
        "<think>calm</think> table",  # no answer tags: the reasoning is removed
        [{"role": "assistant", "content": "table"}],  # conversational completion, same caption
        "",  # an empty caption supports nothing and is not sent
    ]
    scores = reward(["p"] * 4, completions, elements=[ELEMENTS] * 4)
    assert scores == [0.0, pytest.approx(0.87), pytest.approx(0.87), 0.0]
    assert [c for c, _ in judge.calls] == ["nothing", "table"]


def test_reward_works_inside_a_running_event_loop():
    async def main():
        return JudgedCaptionReward(TableJudge())(["p"], ["table"], elements=[ELEMENTS])

    assert asyncio.run(main()) == [pytest.approx(0.87)]


def test_reward_rejects_a_backend_with_wrong_verdicts():
    class Bad:
        def judge(self, caption, elements):
            return ["maybe"] * len(elements)

    with pytest.raises(JudgeError, match="expected one of"):
        JudgedCaptionReward(Bad())(["p"], ["x"], elements=[ELEMENTS])


# ---------------------------------------------------------------------------------------------
# Offline judge: the real all-MiniLM-L6-v2 weights on the shapes world
# ---------------------------------------------------------------------------------------------

UNRELATED = "A busy street market with people selling vegetables under a bright afternoon sun."


@pytest.fixture(scope="module")
def offline():
    return OfflineJudge()


def test_offline_judge_ranks_full_over_short_over_unrelated(offline):
    reward = JudgedCaptionReward(offline)
    for example in generate_shapes(6, seed=0, max_objects=3):
        captions = [example.captions["full"], example.captions["short"], UNRELATED]
        full, short, unrelated = reward(["p"] * 3, captions, elements=[example.elements] * 3)
        assert full > short > unrelated, (example.captions, full, short, unrelated)
        assert full >= 2.0 and unrelated == 0.0, reward.last_components  # max is 1 + 1 + 0.8


def test_offline_judge_similarity_is_real(offline):
    item = ("A red circle. Two shapes.", ["a red circle", "a busy street market"])
    ((same, other),) = offline.similarities([item])
    assert same > 0.9 and other < 0.3  # random weights would not separate these
    assert offline.judge("", ["a circle"]) == ["unsupported"]


def test_judge_offline_plugin_by_name(offline, monkeypatch):
    monkeypatch.setattr(judge_mod, "_DEFAULT", JudgedCaptionReward(offline))  # reuse the loaded model
    example = generate_shapes(1, seed=3)[0]
    for spec in ("judge_offline", "rewards.judge:judge_offline"):
        fn = load_reward(spec)
        scores = fn(["p"] * 2, [example.captions["full"], "x"], elements=[example.elements, None], step=7)
        assert scores == [pytest.approx(2.8), None]
