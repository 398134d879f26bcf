"""Caption rollouts (rollouts/captions.py) on the tiny random Qwen2.5-VL, no LoRA, no learner.

What the learner relies on: the mask stops at the first EOS, the rollout's log-probs are the ones
the learner recomputes (so the first ratio is 1), suppressed tokens never reach a caption, and each
image's patches line up with its G rows.
"""

import pytest
import torch

from rl.config import RecipeError, load_recipe
from rl.models.encoder import build_tiny_encoder
from rl.shapes import VOCABULARY, generate_shapes
from rollouts.captions import (CaptionGroup, completion_logprobs, completion_mask, expand_inputs,
                               generate_captions, vllm_available)


@pytest.fixture(scope="module")
def encoder():
    enc = build_tiny_encoder(VOCABULARY, image_size=32, seed=0)
    enc.model.eval()
    return enc


@pytest.fixture(scope="module")
def images():
    return [r.image for r in generate_shapes(2, seed=3)]


def test_completion_mask_stops_after_first_eos():
    eos = 9
    ids = torch.tensor([
        [5, 6, 9, 7, 9],  # EOS at 2: keep 0..2, the tokens after it are padding
        [9, 5, 5, 5, 5],  # EOS first: only the EOS itself counts
        [5, 6, 7, 8, 4],  # no EOS (truncated at max_new_tokens): keep everything
    ])
    expected = torch.tensor([
        [1, 1, 1, 0, 0],
        [1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1],
    ])
    assert torch.equal(completion_mask(ids, eos), expected)


def test_rollout_logprobs_equal_recomputed_logprobs(encoder, images):
    temperature = 0.7  # not 1, so a forgotten temperature scaling on either side would show
    group = generate_captions(encoder, images, 3, max_new_tokens=12, temperature=temperature, seed=1)
    n, t = group.completion_ids.shape
    assert n == 2 * 3 and t <= 12
    assert len(group.captions) == n
    with torch.no_grad():
        recomputed, entropy = completion_logprobs(encoder.model, group, temperature,
                                                  encoder.suppressed_ids, with_entropy=True)
    assert torch.allclose(group.logprobs, recomputed, atol=1e-5, rtol=0)
    assert torch.all(group.logprobs[group.completion_mask == 0] == 0)  # padding is 0, never -inf
    assert torch.isfinite(group.logprobs).all()
    assert entropy.shape == (n, t) and torch.all(entropy >= 0)


def test_suppressed_tokens_never_appear(encoder, images):
    suppressed = encoder.suppressed_ids
    assert encoder.tokenizer.convert_tokens_to_ids("<|image_pad|>") in suppressed
    # Push the suppressed tokens to the top of the raw logits: without suppression they would be
    # sampled almost every time.
    bias = torch.zeros(encoder.model.config.text_config.vocab_size)
    bias[suppressed] = 20.0
    handle = encoder.model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    try:
        group = generate_captions(encoder, images, 4, max_new_tokens=10, seed=2)
    finally:
        handle.remove()
    kept = group.completion_ids[group.completion_mask.bool()]
    assert kept.numel() > 0
    assert not torch.isin(kept, torch.tensor(suppressed)).any()
    assert torch.isfinite(group.logprobs).all()


def test_expand_inputs_repeats_each_images_patches_group_size_times():
    # Two images with different patch counts (grid 1x2x2 = 4 patches, 1x2x4 = 8), D = 3.
    grid = torch.tensor([[1, 2, 2], [1, 2, 4]])
    pix_a = torch.full((4, 3), 1.0)
    pix_b = torch.full((8, 3), 2.0)
    g = 3
    group = CaptionGroup(
        prompt_ids=torch.tensor([[0, 11, 12], [10, 11, 12]]), prompt_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]),
        pixel_values=torch.cat([pix_a, pix_b]), image_grid_thw=grid,
        completion_ids=torch.arange(6 * 2).view(6, 2), completion_mask=torch.ones(6, 2, dtype=torch.long),
        logprobs=torch.zeros(6, 2), captions=[""] * 6, group_size=g, version=0,
    )
    out = expand_inputs(group, torch.device("cpu"))
    # Rows are image-major (a, a, a, b, b, b), so the patches are a a a b b b: 3*4 + 3*8 = 36 rows.
    assert torch.equal(out["pixel_values"], torch.cat([pix_a] * g + [pix_b] * g))
    assert torch.equal(out["image_grid_thw"], torch.tensor([[1, 2, 2]] * g + [[1, 2, 4]] * g))
    assert torch.equal(out["input_ids"][:3, :3], torch.tensor([[0, 11, 12]] * 3))
    assert torch.equal(out["input_ids"][3:, :3], torch.tensor([[10, 11, 12]] * 3))
    assert torch.equal(out["input_ids"][:, 3:], group.completion_ids)
    assert torch.equal(out["attention_mask"][:3, :3], torch.tensor([[0, 1, 1]] * 3))


@pytest.mark.skipif(not vllm_available(), reason="vLLM backend needs the `vllm` extra and a CUDA GPU")
def test_vllm_captioner_samples_group_size_captions(images):  # pragma: no cover - GPU only
    from rl.models.encoder import CHAT_TEMPLATE, QWEN25_SPECIAL_IDS, UAE_CAPTION_PROMPT, USER_INSTRUCTION
    from rollouts.captions import VLLMCaptioner

    # The encoder's prompt (Encoder.prompt_text() with its defaults): vLLM puts the image at its
    # <|vision_start|><|image_pad|><|vision_end|> placeholder and refuses a prompt without one.
    prompt = CHAT_TEMPLATE.format(system=UAE_CAPTION_PROMPT, user=USER_INSTRUCTION)
    assert "<|image_pad|>" in prompt
    blocked = [QWEN25_SPECIAL_IDS[t] for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                               "<|vision_end|>", "<|im_start|>", "<|endoftext|>")]
    captioner = VLLMCaptioner("Qwen/Qwen2.5-VL-3B-Instruct")
    out = captioner.generate([prompt] * len(images), images, 2, max_new_tokens=8, temperature=0.7, top_p=1.0,
                             seed=0, blocked_ids=blocked, eos_id=QWEN25_SPECIAL_IDS["<|im_end|>"])
    assert len(out) == len(images) and all(len(o) == 2 for o in out)
    for ids, logprobs in (c for o in out for c in o):
        assert len(ids) == len(logprobs) and not set(ids) & set(blocked)
        assert all(-1e3 < lp <= 0 for lp in logprobs)  # processed log-probs of sampled tokens: finite


@pytest.mark.skipif(vllm_available(), reason="vLLM is usable here, so the recipe is accepted")
def test_vllm_backend_refused_without_vllm(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("rollout:\n  caption:\n    backend: vllm\n")
    with pytest.raises(RecipeError, match=r"rollout\.caption\.backend") as err:
        load_recipe(path)
    assert "hf" in str(err.value)  # the message names the fix
    # The same recipe with the default backend loads.
    path.write_text("rollout:\n  caption:\n    backend: hf\n")
    assert load_recipe(path).rollout.caption.backend == "hf"
