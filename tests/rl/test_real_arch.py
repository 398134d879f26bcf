"""Real architectures on CPU (DESIGN.md): the published models built from their configs in code,
random weights, reduced depth, so that the paper recipe's code path runs here.

Default suite: the configs' numbers, recipe validation of `random_init`, the SD3.5-medium and CLIP
ViT-L/14 builds, and one module-scoped `build_models` of recipes/unified_grpo.yaml at depth 1 that
checks the real widths and runs encoder -> connector -> decoder -> VAE once (about 4 GB, 30 s).
Slow: `python -m rl.train recipes/unified_grpo_dryrun.yaml` end to end (cold start, encoder and
decoder step) in a subprocess.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from rl.config import Recipe, RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[2]
PAPER = ROOT / "recipes" / "unified_grpo.yaml"
DRYRUN = ROOT / "recipes" / "unified_grpo_dryrun.yaml"
QWEN = "Qwen/Qwen2.5-VL-3B-Instruct"
LARGE, MEDIUM = "stabilityai/stable-diffusion-3.5-large", "stabilityai/stable-diffusion-3.5-medium"

# unified_grpo.yaml at depth 1 on a CPU, as the dry-run recipe sets it (56 px = 2 x 28: one 2x2
# block of merged 14 px patches per 28 px; 64 px renders = 8x8 latents = 16 tokens of patch 2).
DEPTH_1 = [
    "device=cpu", "models.encoder.dtype=float32", "models.decoder.dtype=float32",
    "models.encoder.image_size=56", "models.decoder.image_size=64",
    "models.encoder.random_init={num_layers: 1, vision_depth: 1}", "models.decoder.random_init={num_layers: 1}",
    "models.clip.pretrained=null", "models.clip.random_init={layers: 1}",
]


# ----------------------------------------------------------------------------------------------
# configs written in code (no model built)
# ----------------------------------------------------------------------------------------------
def test_qwen25_vl_3b_config_has_the_published_numbers():
    from rl.models.encoder import QWEN25_SPECIAL_IDS, qwen25_vl_3b_config

    c = qwen25_vl_3b_config()
    t, v = c["text_config"], c["vision_config"]
    assert (t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]) == (2048, 11008, 36)
    assert (t["num_attention_heads"], t["num_key_value_heads"], t["vocab_size"]) == (16, 2, 151936)
    # M-RoPE sections cover the rotary half-dimension: head dim 2048 / 16 = 128, half 64 = 16 + 24 + 24
    assert t["rope_parameters"]["mrope_section"] == [16, 24, 24] and t["rope_parameters"]["rope_theta"] == 1e6
    assert (v["depth"], v["hidden_size"], v["out_hidden_size"]) == (32, 1280, 2048)
    assert (v["patch_size"], v["spatial_merge_size"], v["temporal_patch_size"]) == (14, 2, 2)
    assert v["fullatt_block_indexes"] == [7, 15, 23, 31] and c["tie_word_embeddings"] is True
    assert c["image_token_id"] == QWEN25_SPECIAL_IDS["<|image_pad|>"] == 151655
    # reduced depth keeps the full-attention blocks that still exist, and at least one
    assert qwen25_vl_3b_config(vision_depth=20)["vision_config"]["fullatt_block_indexes"] == [7, 15]
    assert qwen25_vl_3b_config(vision_depth=1)["vision_config"]["fullatt_block_indexes"] == [0]
    assert qwen25_vl_3b_config(num_layers=1)["text_config"]["num_hidden_layers"] == 1


def test_sd35_configs_have_the_published_numbers():
    from rl.models.decoder import sd35_large_transformer_config, sd35_medium_transformer_config, sd3_vae_config

    large, medium = sd35_large_transformer_config(), sd35_medium_transformer_config()
    assert (large["num_layers"], large["num_attention_heads"], large["caption_projection_dim"]) == (38, 38, 2432)
    assert (medium["num_layers"], medium["num_attention_heads"], medium["caption_projection_dim"]) == (24, 24, 1536)
    for c in (large, medium):
        assert (c["joint_attention_dim"], c["pooled_projection_dim"]) == (4096, 2048)
        assert (c["in_channels"], c["out_channels"], c["patch_size"]) == (16, 16, 2)
        assert c["qk_norm"] == "rms_norm"
    assert large["dual_attention_layers"] == () and medium["dual_attention_layers"] == tuple(range(13))
    assert sd35_medium_transformer_config(2)["dual_attention_layers"] == (0, 1)
    vae = sd3_vae_config()
    assert vae["latent_channels"] == 16 and vae["block_out_channels"] == [128, 256, 512, 512]
    assert (vae["scaling_factor"], vae["shift_factor"]) == (1.5305, 0.0609)


# ----------------------------------------------------------------------------------------------
# recipe validation
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, field, says", [
    ("models.encoder.random_init={num_layers: 1}", "models.encoder", QWEN),  # name: tiny
    ("models.decoder.random_init={num_layers: 1}", "models.decoder", LARGE),
    ("models.clip.random_init={layers: 1}", "models.clip", "ViT-L-14"),
])
def test_random_init_is_refused_for_a_name_without_a_config(tmp_path, override, field, says):
    with pytest.raises(RecipeError) as e:
        load_recipe(ROOT / "recipes" / "tiny.yaml", [override, "pretrain.enabled=false"])
    assert f"{field}: random_init" in str(e.value) and says in str(e.value)


@pytest.mark.parametrize("override, says", [
    ("models.encoder.random_init={layers: 1}", "unknown key 'layers'"),
    ("models.decoder.random_init={num_layers: 0}", "at least 1"),
    ("models.clip.random_init={layers: 1}", "set pretrained: null"),  # pretrained: openai in unified_grpo.yaml
])
def test_random_init_keys_and_conflicts_name_the_fix(override, says):
    with pytest.raises(RecipeError, match=says):
        load_recipe(PAPER, [override])


def test_dryrun_recipe_differs_from_the_paper_recipe_only_where_it_says():
    """Every difference of unified_grpo_dryrun.yaml from unified_grpo.yaml is a dry-run change."""
    paper, dry = yaml.safe_load(PAPER.read_text()), yaml.safe_load(DRYRUN.read_text())

    def flat(tree, prefix=""):
        out = {}
        for k, v in tree.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(paper), flat(dry)
    changed = {k for k in a.keys() | b.keys() if a.get(k, "absent") != b.get(k, "absent")}
    allowed = {
        "device", "models.encoder.dtype", "models.encoder.image_size", "models.encoder.random_init.num_layers",
        "models.encoder.random_init.vision_depth", "models.decoder.dtype", "models.decoder.image_size",
        "models.decoder.random_init.num_layers", "models.clip.pretrained", "models.clip.random_init.layers",
        "schedule.cold_start_steps", "schedule.phases", "schedule.cycles", "rollout.batch_size",
        "rollout.group_size", "rollout.caption.max_new_tokens", "ray.address", "ray.num_cpus",
        "resources.colocate", "resources.learner_workers", "resources.rollout_workers", "resources.cpus_per_actor",
        "resources.gpus_per_actor", "resources.async_rollouts", "learner.bf16", "output.dir", "rollout.micro_batch_size",
        "schedule.warmup_steps", "warmup.max_new_tokens", "data.source", "data.limit", "rewards.functions",
        "rewards.judge.backend", "rewards.judge.base_url", "rewards.judge.model", "rewards.judge.references",
        "rewards.judge.column", "rewards.judge.timeout", "rewards.judge.max_concurrency",
    }
    assert changed <= allowed, changed - allowed
    recipe = load_recipe(DRYRUN)
    assert recipe.stages() == ["warmup", "cold_start", "encoder", "decoder"] and recipe.data.source is None


# ----------------------------------------------------------------------------------------------
# float32 timesteps, the reward actor's device
# ----------------------------------------------------------------------------------------------
def test_timesteps_reach_the_transformer_in_float32_with_bfloat16_weights():
    from rl.models.decoder import build_decoder

    dec = build_decoder("tiny", image_size=32, dtype="bfloat16")
    seen = []
    dec.transformer.time_text_embed.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    sigma = torch.tensor([0.9987, 0.3141])
    x = torch.randn(dec.latent_shape(2))
    v = dec.velocity(x, sigma, torch.randn(2, 3, dec.joint_attention_dim), torch.randn(2, dec.pooled_projection_dim))
    assert seen[0].dtype == torch.float32
    assert torch.equal(seen[0], sigma * 1000.0)
    # what a cast to the model dtype would have passed: bfloat16 is spaced 4 apart in [512, 1024)
    assert (sigma * 1000.0).to(torch.bfloat16).tolist() == [1000.0, 314.0]
    assert v.dtype == torch.bfloat16 and torch.isfinite(v).all()


def test_reward_actor_puts_clip_on_its_resolved_device(monkeypatch):
    from rewards import actors
    from rl.models.unified import resolve_device

    for device in ("cpu", "auto"):
        recipe = Recipe.model_validate({"device": device})
        assert actors.reward_device(recipe) == resolve_device(device)
    # an actor that sees a GPU (Ray gave it one) follows the recipe; `cpu` stays on the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert actors.reward_device(Recipe.model_validate({"device": "auto"})) == torch.device("cuda")
    assert actors.reward_device(Recipe.model_validate({"device": "cpu"})) == torch.device("cpu")
    monkeypatch.undo()
    import rl.learner

    got = []
    monkeypatch.setattr(rl.learner, "make_clip_reward",
                        lambda recipe, device="cpu": got.append(device) or (lambda *a, **k: []))
    recipe = Recipe.model_validate({"device": "auto"})
    actors.RewardWorker(recipe)
    assert got == [resolve_device("auto")]


# ----------------------------------------------------------------------------------------------
# the architectures at depth 1
# ----------------------------------------------------------------------------------------------
def test_clip_vit_l14_at_one_layer():
    from rl.learner import make_clip_reward

    reward = make_clip_reward(load_recipe(PAPER, DEPTH_1))
    model = reward.model
    assert model.visual.conv1.kernel_size == (14, 14) and model.visual.conv1.out_channels == 1024
    assert len(model.visual.transformer.resblocks) == 1 and len(model.transformer.resblocks) == 1
    assert reward.preprocess.size == (224, 224)
    a, b = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")
    emb = reward.embed([a, b])
    assert emb.shape == (2, 768) and torch.isfinite(emb).all()
    assert reward([None, None], ["", ""], images=[a, a], renders=[a, b])[0] == pytest.approx(1.0, abs=1e-5)


def test_sd35_medium_at_one_layer_has_dual_attention_and_the_lora_targets():
    from rl import adapters
    from rl.config import AdapterConfig
    from rl.models.decoder import build_decoder

    dec = build_decoder(MEDIUM, image_size=64, random_init={"num_layers": 1})
    cfg = dec.transformer.config
    assert (cfg.joint_attention_dim, cfg.caption_projection_dim, cfg.pooled_projection_dim) == (4096, 1536, 2048)
    assert cfg.in_channels == 16
    assert dec.transformer.transformer_blocks[0].attn2 is not None  # MMDiT-X dual attention
    adapters.apply_adapter(dec.transformer, AdapterConfig(r=4, alpha=8), "decoder")
    lora = {n.split(".lora_A")[0].split("attn")[-1] for n, _ in dec.transformer.named_parameters() if "lora_A" in n}
    # both attentions' projections; the last (context_pre_only) block has no to_add_out
    assert {".to_q", ".to_k", ".to_v", ".to_out.0", ".add_q_proj", ".add_k_proj", ".add_v_proj", "2.to_q"} <= lora
    v = dec.velocity(torch.randn(dec.latent_shape(1)), torch.tensor([0.5]), torch.randn(1, 3, 4096), torch.randn(1, 2048))
    assert v.shape == (1, 16, 8, 8) and torch.isfinite(v).all()


@pytest.fixture(scope="module")
def paper_models():
    """recipes/unified_grpo.yaml's models at depth 1, float32, on the CPU (~4 GB: the 151,936 x
    2048 embedding alone is 1.2 GB), built once for the tests below."""
    from rl.models.unified import build_models

    recipe = load_recipe(PAPER, DEPTH_1)
    return recipe, build_models(recipe, torch.device("cpu"))


def test_paper_recipe_builds_the_real_widths(paper_models):
    recipe, m = paper_models
    text = m.encoder.model.config.text_config
    assert (text.hidden_size, text.vocab_size, text.num_hidden_layers) == (2048, 151936, 1)
    assert m.encoder.model.config.vision_config.depth == 1
    image_processor = m.encoder.processor.image_processor
    assert type(image_processor).__name__ == "Qwen2VLImageProcessor"
    assert (image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size) == (14, 2, 2)
    assert m.encoder.tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655 == m.encoder.model.config.image_token_id
    assert m.encoder.eos_token_id == 151645
    cfg = m.decoder.transformer.config
    assert (cfg.joint_attention_dim, cfg.caption_projection_dim, cfg.pooled_projection_dim) == (4096, 2432, 2048)
    assert (cfg.in_channels, cfg.patch_size, cfg.num_layers) == (16, 2, 1)
    assert m.decoder.vae.config.latent_channels == 16 and m.decoder.vae_scale == 8
    # the connector's widths come from the built configs: 2048 -> 4096 (mlp_ratio 1.0), pooled 2048
    assert (m.connector.proj[0].in_features, m.connector.proj[-1].out_features) == (2048, 4096)
    assert m.connector.pooled.shape == (2048,)
    # LoRA with the default targets found its modules on both policies
    enc = [n for n, _ in m.encoder.model.named_parameters() if "lora_A" in n]
    assert {n.split(".self_attn.")[1].split(".")[0] for n in enc} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert all("language_model" in n for n in enc)
    assert len(m.parameters("decoder")) == 14  # 7 projections x (A, B): the one block is context_pre_only
    assert m.encoder.model.get_input_embeddings().weight.shape == (151936, 2048)


@torch.no_grad()
def test_paper_recipe_runs_encoder_connector_decoder_once(paper_models):
    recipe, m = paper_models
    image = Image.new("RGB", (80, 60), (200, 40, 40))  # any size: resized to 56 px, as the recipe says
    batch = m.encoder.prepare([image])
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]]  # 56 / 14 = 4 patches a side
    assert batch["pixel_values"].shape == (16, 3 * 2 * 14 * 14)
    # 16 patches merge 2x2 into 4 <|image_pad|> tokens
    assert int((batch["input_ids"] == 151655).sum()) == 4
    out = m.encoder.model(**batch)
    assert out.logits.shape[-1] == 151936 and torch.isfinite(out.logits[:, -1]).all()
    caption = torch.tensor([[11, 12, 13, 151645]])  # three words and <|im_end|>
    cond, mask, pooled = m.condition(caption, torch.ones_like(caption))
    # <|im_start|> + 4 tokens, then zeros up to the fixed length max_new_tokens + 1 (batch independence)
    length = recipe.rollout.caption.max_new_tokens + 1
    assert cond.shape == (1, length, 4096) and pooled.shape == (1, 2048) and not mask[:, 5:].any()
    latents = torch.randn(m.decoder.latent_shape(1))
    assert latents.shape == (1, 16, 8, 8)
    v = m.decoder.velocity(latents, torch.tensor([0.7]), cond, pooled, mask)
    images = m.decoder.decode(latents - 0.7 * v)
    assert v.shape == latents.shape and torch.isfinite(v).all()
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()


# ----------------------------------------------------------------------------------------------
# the dry run, end to end
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_dryrun_recipe_runs_one_step_of_each_stage(tmp_path):
    """`python -m rl.train recipes/unified_grpo_dryrun.yaml`: a local Ray on 2 cores, one warm-up, one
    cold-start, one encoder and one decoder step of the paper's code path with the real widths."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rl.train", str(DRYRUN), "--output-dir", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-5000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["warmup", "cold_start", "encoder", "decoder"]
    for r in rows:  # the warm-up has a loss, no reward
        assert math.isfinite(r["loss"]) and (r["stage"] == "warmup" or math.isfinite(r["reward_mean"])), r
    ckpts = sorted((out / "checkpoints").iterdir())
    assert ckpts and (ckpts[-1] / "adapters.safetensors").exists()
