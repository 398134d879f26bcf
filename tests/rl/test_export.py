"""rl.export: folders that load with peft/diffusers alone, the model card, and the Hub push.

The export is loaded in a fresh interpreter that cannot import the project (cwd outside the repo,
no PYTHONPATH) and must reproduce the project's own outputs for fixed inputs. The push runs the
real huggingface_hub client against a loopback HTTP server that records every request.
"""

import json
import re
import os
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "recipes" / "tiny.yaml"
TOKEN = "hf_FakeTokenForTests0123456789abcdefXYZ"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A checkpoint with non-trivial adapters, the project's outputs on fixed inputs, and its export."""
    from rl.checkpoint import save_checkpoint
    from rl.config import load_recipe
    from rl.export import export_checkpoint
    from rl.models.unified import build_models

    root = tmp_path_factory.mktemp("export")
    # the schedule the card's assertions describe, whatever tiny.yaml's is today
    recipe = load_recipe(TINY, ["schedule.cold_start_steps=3", "schedule.cycles=2",
                                "schedule.phases=[{stage: encoder, steps: 4}, {stage: decoder, steps: 4}]",
                                f"output.dir={root / 'runs' / 'tiny'}"])  # an absolute path the export must not leak
    models = build_models(recipe, torch.device("cpu"))
    # Freshly built, the encoder's LoRA B is zero (an identity adapter): draw every float tensor so
    # that a lost or mis-scaled adapter changes the outputs.
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) * 0.05 if v.is_floating_point() else v
             for k, v in models.trainable_state().items()}
    models.load_trainable_state(state)
    metrics = {"encoder": {"step": 2, "reward_mean": 0.75, "loss": 0.01},
               "decoder": {"step": 3, "reward_mean": 0.8, "loss": -0.02}}
    trainer = {"step": 4, "stage": "decoder", "schedule": {"stage": "cold_start", "stage_step": 0},
               "data_position": 16, "version": 4, "total_steps": 19, "metrics": metrics}
    save_checkpoint(str(root / "run" / "checkpoints"), 4, state, {"learner": {}, "driver": {}}, trainer,
                    recipe.model_dump(mode="json"))

    # the project's outputs: encoder logits on a text-only input, decoder velocity on a latent
    ids = torch.randint(10, len(models.encoder.tokenizer), (2, 9), generator=g)
    x = {"hidden_states": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.tensor([500.0, 250.0]),
         "encoder_hidden_states": torch.randn(2, 5, 32, generator=g), "pooled_projections": torch.randn(2, 32, generator=g)}
    with torch.no_grad():
        logits = models.encoder.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        velocity = models.decoder.transformer(**x, return_dict=False)[0]
    # the project's greedy caption of an image, and the decoder conditions of that caption and of
    # the empty caption (CFG's negative)
    from rl.shapes import generate_shapes
    from rollouts.captions import generate_captions

    image = generate_shapes(1, seed=5)[0].image
    image.save(root / "image.png")
    caption = generate_captions(models.encoder, [image], 1, greedy=True,
                                max_new_tokens=recipe.rollout.caption.max_new_tokens).captions[0]
    conds = {}
    for name, text in (("caption", caption), ("empty", "")):
        words = torch.tensor([models.encoder.tokenizer(text, add_special_tokens=False).input_ids], dtype=torch.long)
        with torch.no_grad():
            cond, _, pooled = models.condition(words, torch.ones_like(words))
        conds[f"cond_{name}"], conds[f"pooled_{name}"] = cond.clone(), pooled.clone()  # pooled: a view of one vector
    save_file({"input_ids": ids, **x, "logits": logits.contiguous(), "velocity": velocity.contiguous(), **conds},
              str(root / "io.safetensors"))
    out = export_checkpoint(str(root / "run"), str(root / "out"), merge_encoder=True)
    return {"root": root, "out": Path(out), "run": root / "run", "state": state, "caption": caption}


def test_export_layout(exported):
    out = exported["out"]
    for rel in ["encoder/adapter_config.json", "encoder/adapter_model.safetensors", "encoder/base/config.json",
                "encoder/base/model.safetensors", "encoder_merged/model.safetensors",
                "decoder/pytorch_lora_weights.safetensors", "decoder/base/model_index.json",
                "decoder/base/transformer/config.json", "decoder/base/vae/config.json",
                "decoder/base/scheduler/scheduler_config.json", "connector/model.safetensors",
                "connector/config.json", "README.md"]:
        assert (out / rel).is_file(), rel
    # the chat template and the caption prompt travel with every encoder folder
    for folder in ("encoder", "encoder/base", "encoder_merged"):
        for name in ("chat_template.jinja", "caption_prompt.json"):
            assert (out / folder / name).is_file(), f"{folder}/{name}"
    # the adapter points at the saved base, so AutoPeftModel-style loading finds it from the export folder
    cfg = json.loads((out / "encoder" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "encoder/base"  # relative to the export folder: no absolute path
    assert not list(exported["root"].glob(".tmp-export-*"))
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]  # no pickles


# The head of every fresh-process script here. The project may be installed (pip install -e .):
# its packages are refused outright, so whatever loads after this loads without any of its code.
NO_PROJECT = textwrap.dedent("""
    import json, sys

    class _NoProject:

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("rl", "rollouts", "rewards"):
                raise ImportError(f"{name} is blocked: this process must not use the project")
            return None

    sys.meta_path.insert(0, _NoProject())
""")

def test_exported_folders_load_in_a_fresh_process_without_the_project(exported):
    """peft + transformers + diffusers only: the outputs equal the project's."""
    script = NO_PROJECT + textwrap.dedent("""
        import torch
        from safetensors.torch import load_file
        from peft import PeftModel
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
        from diffusers import StableDiffusion3Pipeline

        out, io = sys.argv[1], load_file(sys.argv[2])
        try:
            import rl  # noqa: F401
            raise SystemExit("the project is importable here; the test would prove nothing")
        except ImportError:
            pass
        report = {}
        with torch.no_grad():
            base = Qwen2_5_VLForConditionalGeneration.from_pretrained(out + "/encoder/base")
            processor = AutoProcessor.from_pretrained(out + "/encoder/base")
            request = json.load(open(out + "/encoder/caption_prompt.json"))
            render = lambda: processor.apply_chat_template(request["messages"], add_generation_prompt=True,
                                                           tokenize=False)
            report["chat_base"] = render()  # the template the processor loaded from encoder/base
            processor.chat_template = open(out + "/encoder/chat_template.jinja").read()
            report["chat_adapter"] = render()  # the one saved beside the adapter
            report["chat_saved_prompt"] = request["prompt"]
            kw = {"input_ids": io["input_ids"], "attention_mask": torch.ones_like(io["input_ids"])}
            report["encoder_base_diff"] = float((base(**kw).logits - io["logits"]).abs().max())
            enc = PeftModel.from_pretrained(base, out + "/encoder")
            report["encoder_max_diff"] = float((enc(**kw).logits - io["logits"]).abs().max())
            merged = Qwen2_5_VLForConditionalGeneration.from_pretrained(out + "/encoder_merged")
            report["merged_max_diff"] = float((merged(**kw).logits - io["logits"]).abs().max())

            no_text = {k: None for k in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                                         "text_encoder_3", "tokenizer_3")}
            pipe = StableDiffusion3Pipeline.from_pretrained(out + "/decoder/base", **no_text)
            x = {k: io[k] for k in ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections")}
            report["decoder_base_diff"] = float((pipe.transformer(**x).sample - io["velocity"]).abs().max())
            pipe.load_lora_weights(out + "/decoder")
            report["decoder_max_diff"] = float((pipe.transformer(**x).sample - io["velocity"]).abs().max())
        report["connector_keys"] = sorted(load_file(out + "/connector/model.safetensors"))
        report["project_modules"] = [m for m in sys.modules if m.split(".")[0] in ("rl", "rollouts", "rewards")]
        print("REPORT " + json.dumps(report))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, "-c", script, str(exported["out"]), str(exported["root"] / "io.safetensors")],
                          cwd=exported["root"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.split("REPORT ", 1)[1])
    assert report["project_modules"] == []
    # The adapters matter: without them the outputs move by far more than the tolerance below.
    assert report["encoder_base_diff"] > 1e-3 and report["decoder_base_diff"] > 1e-3
    # Same weights, same ops; a fresh process may still round differently in the last bit (CPU
    # matmul kernels depend on memory alignment), hence 1e-5 rather than equality. A lost adapter
    # or a wrong alpha/r scale (diffusers reads it from the safetensors metadata) is far above it.
    assert report["encoder_max_diff"] < 1e-5
    assert report["decoder_max_diff"] < 1e-5
    assert report["merged_max_diff"] < 1e-4  # merging re-associates the sums
    want = sorted(k.split(".", 1)[1] for k in exported["state"] if k.startswith("connector."))
    assert report["connector_keys"] == want
    # The saved template formats the saved messages to exactly the prompt the project captions with.
    from rl.models.encoder import CHAT_TEMPLATE, UAE_CAPTION_PROMPT, USER_INSTRUCTION

    project_prompt = CHAT_TEMPLATE.format(system=UAE_CAPTION_PROMPT, user=USER_INSTRUCTION)
    assert report["chat_base"] == report["chat_adapter"] == report["chat_saved_prompt"] == project_prompt


def test_model_card(exported):
    card = (exported["out"] / "README.md").read_text()
    front = card.split("---")[1]
    for tag in ("unified-grpo", "grpo", "lora"):
        assert f"- {tag}" in front
    assert "encoder/base" in card and "decoder/base" in card  # base models
    assert "## Training stages" in card and "cold_start 3 steps, encoder 1 steps" in card
    assert "Schedule: 3 cold-start steps" in card  # no warm-up steps in this recipe: none named
    assert "| encoder | 2 | 0.75 |" in card and "| decoder | 3 | 0.8 |" in card  # final metrics
    assert "```yaml" in card and "cold_start_steps: 3" in card  # the recipe
    assert "### Caption an image" in card and "caption_prompt.json" in card and "chat_template.jinja" in card
    assert "### The connector" in card and "### Render a caption" in card


def test_card_snippet_captions_and_renders_in_a_process_without_the_project(exported):
    """The card's "Use it" code, run as written in the export folder by a process that never
    imports the project: it captions the image as the project does (greedy), rebuilds the connector
    from its safetensors + config, builds the caption's condition equal to `Models.condition`'s
    (fixed length, zeros after the caption) and renders it with the stock SD3 pipeline."""
    card = (exported["out"] / "README.md").read_text()
    section = card.split("## Use it: caption an image, render a caption\n", 1)[1].split("## Training stages", 1)[0]
    code = "\n".join(block.split("```", 1)[0] for block in section.split("```python\n")[1:])
    assert "LENGTH = 49" in code  # tiny.yaml: max_new_tokens 48, + <|im_start|>
    assert 'Image.open("image.png")' in code
    code = code.replace('Image.open("image.png")', 'Image.open("../image.png")')  # the fixture's image
    rebuild = code.split("class Connector", 1)[1].split("connector = Connector", 1)[0]
    assert len([line for line in rebuild.splitlines() if line.strip()]) <= 12  # a ~10-line torch rebuild
    script = NO_PROJECT + textwrap.dedent("""
        import torch
        from safetensors.torch import load_file

        io = load_file(sys.argv[1])
        scope = {"__name__": "__main__"}
        exec(open(sys.argv[2]).read(), scope)  # the card's code, cwd = the export folder
        report = {"caption": scope["caption"], "render_size": list(scope["render"].size),
                  "shape": list(scope["cond"].shape)}
        for name, text in (("caption", scope["caption"]), ("empty", "")):
            cond, pooled = scope["condition"](text)
            report[f"cond_{name}"] = float((cond - io[f"cond_{name}"]).abs().max())
            report[f"pooled_{name}"] = float((pooled - io[f"pooled_{name}"]).abs().max())
        report["project_modules"] = [m for m in sys.modules if m.split(".")[0] in ("rl", "rollouts", "rewards")]
        print("REPORT " + json.dumps(report))
    """)
    snippet = exported["root"] / "card_snippet.py"
    snippet.write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, "-c", script, str(exported["root"] / "io.safetensors"), str(snippet)],
                          cwd=exported["out"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.split("REPORT ", 1)[1])
    assert report["project_modules"] == []
    assert exported["caption"] and report["caption"] == exported["caption"]  # the project's greedy caption
    assert report["shape"] == [1, 49, 32]
    for key in ("cond_caption", "pooled_caption", "cond_empty", "pooled_empty"):
        assert report[key] < 1e-5, (key, report)
    assert report["render_size"] == [32, 32]


def test_no_absolute_path_in_any_exported_file(exported):
    """Every file of the export, text or binary (safetensors metadata, configs, the card, the
    processor files), is free of the machine's paths: the temporary folder and /work."""
    needles = [str(exported["root"]).encode(), str(exported["root"].resolve()).encode(), b"/work/"]
    files = [p for p in exported["out"].rglob("*") if p.is_file()]
    assert len(files) > 20
    leaks = {str(p.relative_to(exported["out"])): n.decode() for p in files for n in needles if n in p.read_bytes()}
    assert leaks == {}
    card = (exported["out"] / "README.md").read_text()
    assert "dir: <local>/tiny" in card  # the recipe's absolute output.dir, by its last part only


def test_export_refuses_what_it_cannot_do(exported, tmp_path):
    from rl.export import ExportError, export_checkpoint

    with pytest.raises(ExportError, match="no complete checkpoint"):
        export_checkpoint(str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(ExportError, match="not empty"):
        export_checkpoint(str(exported["run"]), str(exported["out"]))
    with pytest.raises(ExportError, match="no EMA weights"):
        export_checkpoint(str(exported["run"]), str(tmp_path / "ema"), ema=True)
    assert not (tmp_path / "ema").exists()


# ----------------------------------------------------------------------------------------------
# push, up to the HTTP boundary
# ----------------------------------------------------------------------------------------------
class FakeHub:
    """Loopback stand-in for the Hub API: records requests; answers create_repo, validate-yaml,
    preupload (every file inline) and commit; `fail_on` (a path substring) answers 403."""

    def __init__(self, fail_on: str | None = None):
        self.requests: list[dict] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                hub.requests.append({"method": self.command, "path": self.path, "body": body,
                                     "headers": {k.lower(): v for k, v in self.headers.items()}})
                host = f"http://{self.headers['Host']}"
                if fail_on and fail_on in self.path:
                    return self._answer(403, {"error": "fake hub: you do not have write access"})
                if self.path == "/api/repos/create":
                    req = json.loads(body)
                    repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                    return self._answer(200, {"url": f"{host}/{repo}", "name": repo})
                if self.path == "/api/validate-yaml":
                    return self._answer(200, {"errors": [], "warnings": []})
                if "/preupload/" in self.path:
                    files = json.loads(body)["files"]
                    return self._answer(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                         "shouldIgnore": False} for f in files]})
                if "/commit/" in self.path:
                    repo = self.path.split("/api/models/", 1)[1].split("/commit/", 1)[0]
                    return self._answer(200, {"commitUrl": f"{host}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40})
                return self._answer(404, {"error": f"fake hub: no route {self.command} {self.path}"})

            do_GET = do_POST = do_PUT = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _hub_env(hub: FakeHub, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN_PATH")}
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1",
               PYTHONPATH=str(REPO), HF_HUB_OFFLINE="0")
    return env


def _assert_no_token(*texts: str) -> None:
    for text in texts:
        assert TOKEN not in text and TOKEN[3:] not in text


def test_push_uploads_the_export_with_the_token_only_in_the_auth_header(exported, tmp_path):
    hub = FakeHub()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", "import sys; from rl.export import push_to_hub; "
             "print(push_to_hub(sys.argv[1], 'me/unified-grpo-tiny', private=True))", str(exported["out"])],
            cwd=tmp_path, env=_hub_env(hub, tmp_path / "hf"), capture_output=True, text=True, timeout=120)
    finally:
        hub.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "me/unified-grpo-tiny/commit/" in proc.stdout
    _assert_no_token(proc.stdout, proc.stderr)
    paths = [r["path"] for r in hub.requests]
    assert paths[0] == "/api/repos/create"
    assert json.loads(hub.requests[0]["body"])["visibility"] == "private"
    assert any("/api/models/me/unified-grpo-tiny/commit/main" in p for p in paths)
    assert all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)
    committed = b"".join(r["body"] for r in hub.requests if "/commit/" in r["path"])
    for rel in ("README.md", "encoder/adapter_model.safetensors", "decoder/pytorch_lora_weights.safetensors",
                "connector/model.safetensors"):
        assert f'"path": "{rel}"'.encode() in committed or f'"path":"{rel}"'.encode() in committed, rel


def test_failed_push_keeps_the_export_and_never_prints_the_token(exported, tmp_path):
    """The whole CLI: export, then a push that the server refuses at the commit."""
    hub = FakeHub(fail_on="/commit/")
    out = tmp_path / "out"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "rl.export", str(exported["run"]), str(out), "--push-to-hub", "me/tiny"],
            cwd=REPO, env=_hub_env(hub, tmp_path / "hf"), capture_output=True, text=True, timeout=300)
    finally:
        hub.close()
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "error: push to me/tiny failed" in proc.stderr and f"the export is kept in {out}" in proc.stderr
    assert "403" in proc.stderr
    assert (out / "encoder" / "adapter_model.safetensors").is_file() and (out / "README.md").is_file()
    assert any(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)
    _assert_no_token(proc.stdout, proc.stderr)
    for file in out.rglob("*"):
        if file.is_file():
            assert TOKEN.encode() not in file.read_bytes(), file


def test_push_refuses_offline_mode(exported, tmp_path):
    hub = FakeHub()
    env = _hub_env(hub, tmp_path / "hf")
    env["HF_HUB_OFFLINE"] = "1"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", "import sys; from rl.export import push_to_hub; push_to_hub(sys.argv[1], 'me/x')",
             str(exported["out"])], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    finally:
        hub.close()
    assert proc.returncode != 0 and "HF_HUB_OFFLINE is set" in proc.stderr
    assert hub.requests == []
    _assert_no_token(proc.stdout, proc.stderr)


def test_bases_built_from_a_config_are_saved_and_local_ones_named_by_folder_only():
    from rl.config import DecoderConfig, EncoderConfig
    from rl.export import _base_reference, _portable, _saves_base

    assert _saves_base(EncoderConfig(name="tiny")) and _saves_base(DecoderConfig(name="tiny"))
    # the published architectures with random weights exist nowhere else either
    assert _saves_base(EncoderConfig(name="Qwen/Qwen2.5-VL-3B-Instruct", random_init={"num_layers": 1}))
    assert _saves_base(DecoderConfig(name="stabilityai/stable-diffusion-3.5-large", random_init={"num_layers": 1}))
    hub = EncoderConfig(name="Qwen/Qwen2.5-VL-3B-Instruct")
    assert not _saves_base(hub) and _base_reference(hub) == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert _base_reference(EncoderConfig.model_construct(name="x", path="/data/models/qwen-vl/")) == "qwen-vl"
    assert _portable({"a": ["/abs/p/x.yaml", "rel/p", "~/cache/m"], "b": 1}) == {
        "a": ["<local>/x.yaml", "rel/p", "<local>/m"], "b": 1}


@pytest.mark.parametrize("layers", ["last", "norm_avg", "learned"])
@pytest.mark.parametrize("pooled", ["learned", "zeros", "mean"])
def test_card_connector_rebuild_equals_the_projects_connector(layers, pooled):
    """The card's torch rebuild of the connector, for every layer selection and pooled mode: it loads
    the project's state dict strictly and gives its outputs on the same hidden states."""
    import torch.nn.functional as F

    from rl.config import Recipe
    from rl.export import _usage_sections
    from rl.models.connector import Connector

    recipe = Recipe.model_validate({"models": {"connector": {"layers": layers, "pooled": pooled}}})
    code = "\n".join(_usage_sections(recipe, {"encoder": "encoder/base", "decoder": "decoder/base"}))
    rebuild = "class Connector" + code.split("class Connector", 1)[1].split("connector = Connector", 1)[0]
    c = {"hidden_size": 16, "cond_dim": 12, "pooled_dim": 10, "num_layers": 3, "mlp_ratio": 2.0}
    project = Connector(c["hidden_size"], c["cond_dim"], c["pooled_dim"], c["num_layers"], layers=layers, pooled=pooled)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in project.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    scope = {"torch": torch, "F": F}
    exec(rebuild, scope)
    card = scope["Connector"](c)
    card.load_state_dict(project.state_dict())  # strict: the same keys and shapes
    hidden = tuple(torch.randn(1, 5, 16, generator=g) for _ in range(4))  # embeddings + 3 layers
    with torch.no_grad():
        want, got = project(hidden), card(hidden)
    for w, o in zip(want, got):
        assert w.shape == o.shape and torch.allclose(w, o, atol=1e-6)
