"""Reference elements for the judged caption reward (rewards/references.py, rewards/judge.py): refused
at recipe load when missing, read from a text column, extracted by the judge (ReaDe appendix D.2) and
cached per image; an unreachable judge endpoint ends `rl.train` before Ray starts."""

import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rewards.judge import HTTPJudge, JudgeError, check_endpoint, extract_elements, parse_elements
from rewards.references import ReferencesError, attach_references, element_cache_dir, parse_element_text
from rl.config import RecipeError, load_recipe
from rl.data import ImageRecord

ROOT = Path(__file__).resolve().parents[2]
JUDGE = ROOT / "recipes" / "unified_tiny_judge.yaml"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(texts):
    from PIL import Image

    return [ImageRecord(Image.new("RGB", (8, 8)), f"img{i}", None, None, {"text": t} if t is not None else None)
            for i, t in enumerate(texts)]


def test_a_judge_reward_without_references_is_refused_at_load(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")  # check_source only looks for image files
    with pytest.raises(RecipeError, match="rewards.judge.references"):
        load_recipe(JUDGE, [f"data.source={tmp_path}", "rewards.judge.references=null"])
    with pytest.raises(RecipeError, match="rewards.judge.*column"):
        load_recipe(JUDGE, [f"data.source={tmp_path}", "rewards.judge.references=extract"])
    with pytest.raises(RecipeError, match="base_url"):
        load_recipe(JUDGE, ["rewards.judge.backend=http"])
    ok = load_recipe(JUDGE, [f"data.source={tmp_path}", "rewards.judge.references=extract", "rewards.judge.column=text"])
    assert ok.rewards.reference_source(ok.data.source) == "extract"
    # the shapes world brings its own elements
    assert load_recipe(JUDGE, ["rewards.judge.references=null"]).rewards.reference_source(None) == "elements"


def test_element_text_formats():
    assert parse_element_text('{"user": ["a cat"], "detail": ["the cat is black"]}') == {
        "user": ["a cat"], "detail": ["the cat is black"], "supplementary": []}
    assert parse_element_text('["a cat", "a mat"]')["detail"] == ["a cat", "a mat"]
    assert parse_element_text("a cat\n- a red mat; a window")["detail"] == ["a cat", "a red mat", "a window"]
    with pytest.raises(ValueError, match="unknown element group"):
        parse_element_text('{"objects": ["a cat"]}')


def test_extraction_reply_parsing():
    reply = 'Sure:\n```json\n{"user": ["a woman"], "detail": [{"name": "desk", "attributes": ["white"]}], ' \
            '"supplementary": ["bright light"]}\n```'
    assert parse_elements(reply) == {"user": ["a woman"], "detail": ["desk", "desk: white"],
                                     "supplementary": ["bright light"]}
    with pytest.raises(ValueError, match="no JSON object"):
        parse_elements("I cannot help with that.")


def recipe_for(tmp_path, *sets):
    (tmp_path / "imgs").mkdir(exist_ok=True)
    (tmp_path / "imgs" / "a.png").write_bytes(b"")
    return load_recipe(JUDGE, [f"data.source={tmp_path / 'imgs'}", f"output.dir={tmp_path / 'run'}", *sets])


def test_column_references_and_missing_text(tmp_path):
    r = recipe_for(tmp_path, "rewards.judge.references=column", "rewards.judge.column=text")
    recs = records(["a cat; a mat", '{"user": ["a dog"]}'])
    assert attach_references(r, recs)["images"] == 2
    assert recs[0].elements["detail"] == ["a cat", "a mat"] and recs[1].elements["user"] == ["a dog"]
    with pytest.raises(ReferencesError, match="img1.*column 'text'"):
        attach_references(r, records(["a cat", None]))
    r2 = recipe_for(tmp_path, "rewards.judge.references=elements")
    with pytest.raises(ReferencesError, match="img0.*no reference elements"):
        attach_references(r2, records(["a cat"]))


def test_offline_extraction_is_cached_per_image(tmp_path):
    r = recipe_for(tmp_path, "rewards.judge.references=extract", "rewards.judge.column=text")
    recs = records(["A red circle in the top left. A small blue square.", "A green triangle."])
    info = attach_references(r, recs)
    assert info["extracted_now"] == 2
    assert recs[0].elements == {"user": [], "detail": ["A red circle in the top left.", "A small blue square."],
                                "supplementary": []}
    assert len(list(element_cache_dir(r).glob("*.json"))) == 2
    again = records(["A red circle in the top left. A small blue square.", "Now another caption."])
    assert attach_references(r, again)["extracted_now"] == 1  # changed text: extracted again, the other cached


class _Extractor(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that answers every chat request with one extraction reply."""

    def do_GET(self):  # /v1/models
        self._send({"data": [{"id": "judge"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        caption = prompt.rsplit("Input description: ", 1)[1]
        reply = json.dumps({"user": [caption.split()[1]], "detail": [caption], "supplementary": []})
        self._send({"choices": [{"message": {"role": "assistant", "content": reply}}]})

    def _send(self, obj):
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_http_extraction_and_endpoint_check():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Extractor)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/v1"
        check_endpoint(base)
        out = extract_elements(HTTPJudge(base, "judge"), ["a cat on a mat", "a dog"])
        assert out == [{"user": ["cat"], "detail": ["a cat on a mat"], "supplementary": []},
                       {"user": ["dog"], "detail": ["a dog"], "supplementary": []}]
    finally:
        server.shutdown()
    with pytest.raises(JudgeError, match="not reachable"):
        check_endpoint(f"http://127.0.0.1:{closed_port()}/v1", timeout=2)


def test_unreachable_judge_exits_2_before_training(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "rl.train", str(JUDGE), "--output-dir", str(tmp_path / "run"),
         "--set", "rewards.judge.backend=http", "--set", f"rewards.judge.base_url=http://127.0.0.1:{closed_port()}/v1",
         "--set", "rewards.judge.model=judge"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "rewards.judge.base_url" in out.stderr and "not reachable" in out.stderr
    assert not (tmp_path / "run" / "actors.json").exists()  # no actor was started


def test_a_folder_metadata_text_column_reaches_the_references(tmp_path):
    from PIL import Image

    from rl.data import load_dataset_from_config

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / f"p{i}.png")
    (folder / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": f"p{i}.png", "text": f"A dark square {i}. It is small."}) + "\n" for i in range(2)))
    ds = load_dataset_from_config(str(folder))
    assert [r.texts for r in ds] == [{"text": "A dark square 0. It is small."}, {"text": "A dark square 1. It is small."}]
    r = load_recipe(JUDGE, [f"data.source={folder}", f"output.dir={tmp_path / 'run'}",
                            "rewards.judge.references=extract", "rewards.judge.column=text"])
    attach_references(r, ds.records)
    assert ds[1].elements["detail"] == ["A dark square 1.", "It is small."]
