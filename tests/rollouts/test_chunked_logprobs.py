"""Chunked caption log-probs and micro-batched caption rollouts (rollouts/captions.py).

What the memory bound must not change: `completion_logprobs` over `chunk` positions at a time, on
any subset of rows, equals log_softmax over the full (N, T, V) logits re-derived here in float64
(values, entropies and gradients); backward keeps no vocabulary-wide tensor; peft's LoRA and its
`disable_adapter` still apply; `generate_captions` in micro-batches returns the learner's own
log-probs and keeps no full-vocabulary tensor. Tiny random Qwen2.5-VL, CPU, about a second each.
"""

import pytest
import torch

from rl import adapters
from rl.config import AdapterConfig
from rl.models.encoder import build_tiny_encoder
from rl.shapes import VOCABULARY, generate_shapes
from rollouts import captions
from rollouts.captions import (CaptionGroup, completion_logprobs, completion_mask, expand_inputs,
                               generate_captions)

G, T = 3, 9
LENGTHS = [9, 1, 5, 3, 9, 7]  # caption tokens per row, EOS included unless the row fills T (truncated)


@pytest.fixture(scope="module")
def encoder():
    enc = build_tiny_encoder(VOCABULARY, image_size=32, seed=0)
    enc.model.eval()
    return enc


@pytest.fixture(scope="module")
def images():
    return [r.image for r in generate_shapes(2, seed=3)]


def handmade_group(encoder, images, seed: int = 0) -> CaptionGroup:
    """B = 2 images x G = 3 rows of random words with EOS at LENGTHS - 1 and the pad id (a
    suppressed token) after it: padding, truncation and a one-token caption in one group."""
    inputs = encoder.prepare(images)
    n = len(images) * G
    vocab = encoder.model.config.text_config.vocab_size
    words = torch.randint(8, vocab, (n, T), generator=torch.Generator().manual_seed(seed))  # ids 0-7: specials
    for r, length in enumerate(LENGTHS):
        if length < T:
            words[r, length - 1] = encoder.eos_token_id
            words[r, length:] = encoder.pad_token_id
    return CaptionGroup(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                        inputs["image_grid_thw"], words, completion_mask(words, encoder.eos_token_id),
                        torch.zeros(n, T), [""] * n, G, 0, mm_token_type_ids=inputs["mm_token_type_ids"])


def full_logits(model, group) -> torch.Tensor:
    """(N, T, V) float32 logits of the caption positions from the model's own forward (the old path)."""
    t = group.completion_ids.shape[1]
    return model(**expand_inputs(group, torch.device("cpu")), logits_to_keep=t + 1).logits[:, :-1].float()


def reference(logits, group, temperature, suppressed, dtype=torch.float64):
    """log_softmax over the full vocabulary, written out: (logp (N, T), entropy (N, T))."""
    z = logits.to(dtype) / temperature
    if suppressed:
        z = z.index_fill(-1, torch.tensor(suppressed), float("-inf"))  # as generate's suppress_tokens
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, group.completion_ids.unsqueeze(-1)).squeeze(-1)
    logp = logp.masked_fill(group.completion_mask == 0, 0.0)
    p = logp_all.exp()
    entropy = -(p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)  # 0 log 0 = 0
    return logp, entropy


@pytest.mark.parametrize("suppress", [False, True])
@pytest.mark.parametrize("rows, chunk", [(None, 1024), (None, 7), (None, 1), (slice(1, 4), 4), (slice(3, 6), 5)])
def test_chunked_logprobs_equal_the_float64_full_vocabulary_log_softmax(encoder, images, suppress, rows, chunk):
    group = handmade_group(encoder, images)
    suppressed = encoder.suppressed_ids if suppress else []
    temperature = 0.7
    with torch.no_grad():
        ref_logp, ref_entropy = reference(full_logits(encoder.model, group), group, temperature, suppressed)
        logp, entropy = completion_logprobs(encoder.model, group, temperature, suppressed, with_entropy=True,
                                            rows=rows, chunk=chunk)
    sel = rows or slice(None)
    n = ref_logp[sel].shape[0]
    assert logp.shape == entropy.shape == (n, T) and logp.dtype == torch.float32
    torch.testing.assert_close(logp.double(), ref_logp[sel], rtol=0, atol=2e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy[sel], rtol=0, atol=2e-5)
    mask = group.completion_mask[sel]
    assert torch.all(logp[mask == 0] == 0) and torch.isfinite(logp).all()  # pad ids are suppressed: 0, not -inf
    assert torch.isfinite(entropy).all()  # TRL's p log p sees no -inf
    assert not suppress or encoder.pad_token_id in suppressed  # the padding's unmasked log-prob is -inf


def test_chunked_gradients_equal_the_unchunked_ones(encoder, images):
    group = handmade_group(encoder, images, seed=1)
    model, suppressed, temperature = encoder.model, encoder.suppressed_ids, 0.7
    params = [model.model.language_model.layers[0].self_attn.q_proj.weight, model.lm_head.weight]  # lm_head: tied
    weights = torch.randn(len(LENGTHS), T, generator=torch.Generator().manual_seed(0))
    # The old computation: full float32 logits, log_softmax, gather.
    ref_logp, _ = reference(full_logits(model, group), group, temperature, suppressed, dtype=torch.float32)
    ref_grads = torch.autograd.grad((ref_logp * weights).sum(), params)
    logp, _ = completion_logprobs(model, group, temperature, suppressed, chunk=7)
    grads = torch.autograd.grad((logp * weights).sum(), params)
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_backward_keeps_no_vocabulary_wide_tensor(encoder, images):
    """Under autograd, the tensors saved for backward outside the per-chunk checkpoints are the
    language model's; no (positions, V) logits among them, and lm_head never sees more than a chunk."""
    group = handmade_group(encoder, images)
    vocab = encoder.model.config.text_config.vocab_size
    saved, head_rows = [], []
    handle = encoder.model.lm_head.register_forward_hook(lambda m, inp, out: head_rows.append(out.shape[0]))
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
            logp, _ = completion_logprobs(encoder.model, group, 0.7, encoder.suppressed_ids, chunk=8)
        logp.sum().backward()  # recomputes each chunk's logits
    finally:
        handle.remove()
        encoder.model.zero_grad(set_to_none=True)
    assert saved and not [s for s in saved if len(s) and s[-1] == vocab]
    n_chunks = -(-len(LENGTHS) * T // 8)
    assert max(head_rows) <= 8 and len(head_rows) >= 2 * n_chunks  # forward + recomputation in backward


def test_a_single_chunk_is_kept_not_recomputed(encoder, images):
    """When every position fits one chunk, backward keeps that chunk's logits (at most one (M, V)
    tensor saved, M <= chunk) instead of recomputing them, and gives the chunked gradients."""
    group = handmade_group(encoder, images)
    vocab = encoder.model.config.text_config.vocab_size
    positions = len(LENGTHS) * T
    params = [encoder.model.model.language_model.layers[0].self_attn.q_proj.weight]
    grads = {}
    for chunk in (positions, 8):
        saved, head_rows = [], []
        handle = encoder.model.lm_head.register_forward_hook(lambda m, inp, out: head_rows.append(out.shape[0]))
        try:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
                logp, _ = completion_logprobs(encoder.model, group, 0.7, encoder.suppressed_ids, chunk=chunk)
            grads[chunk] = torch.autograd.grad(logp.sum(), params)[0]
        finally:
            handle.remove()
        hidden = encoder.model.config.text_config.hidden_size  # (H, V): lm_head's weight, saved by its matmul
        wide = [s for s in saved if len(s) and s[-1] == vocab and tuple(s) != (hidden, vocab)]
        if chunk == positions:
            assert head_rows == [positions] and wide and all(s[0] <= chunk for s in wide)
    torch.testing.assert_close(grads[positions], grads[8], rtol=1e-4, atol=1e-6)


def test_lora_and_its_disabled_reference_still_apply():
    """The log-probs go through the inner model of the PeftModel: the LoRA is on, and
    `adapters.disabled` (the GRPO reference) turns it off."""
    enc = build_tiny_encoder(VOCABULARY, image_size=32, seed=0)
    enc.model.eval()
    model = adapters.apply_adapter(enc.model, AdapterConfig(r=4, alpha=8), "encoder")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B = 0 at init would make the adapter invisible
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.5)
    images = [r.image for r in generate_shapes(2, seed=3)]
    group = handmade_group(enc, images)
    with torch.no_grad():
        on, _ = completion_logprobs(model, group, 1.0, enc.suppressed_ids, chunk=10)
        ref_on, _ = reference(full_logits(model, group), group, 1.0, enc.suppressed_ids)
        with adapters.disabled(model):
            off, _ = completion_logprobs(model, group, 1.0, enc.suppressed_ids, chunk=10)
            ref_off, _ = reference(full_logits(model, group), group, 1.0, enc.suppressed_ids)
    torch.testing.assert_close(on.double(), ref_on, rtol=0, atol=2e-5)
    torch.testing.assert_close(off.double(), ref_off, rtol=0, atol=2e-5)
    assert (on - off).abs().max() > 1e-3


def test_expand_inputs_reads_only_the_rows_images():
    # Image a: 4 patches, image b: 8 (as in test_captions); rows 2..3 are a's last and b's first.
    grid = torch.tensor([[1, 2, 2], [1, 2, 4]])
    pix_a, pix_b = torch.full((4, 3), 1.0), torch.full((8, 3), 2.0)
    group = CaptionGroup(
        prompt_ids=torch.tensor([[0, 11, 12], [10, 11, 12]]), prompt_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]),
        pixel_values=torch.cat([pix_a, pix_b]), image_grid_thw=grid,
        completion_ids=torch.arange(6 * 2).view(6, 2), completion_mask=torch.ones(6, 2, dtype=torch.long),
        logprobs=torch.zeros(6, 2), captions=[""] * 6, group_size=3, version=0,
    )
    out = expand_inputs(group, torch.device("cpu"), rows=slice(2, 4))
    assert torch.equal(out["pixel_values"], torch.cat([pix_a, pix_b]))
    assert torch.equal(out["image_grid_thw"], grid)
    assert torch.equal(out["input_ids"], torch.tensor([[0, 11, 12, 4, 5], [10, 11, 12, 6, 7]]))
    assert torch.equal(out["attention_mask"][:, :3], group.prompt_mask)
    only_b = expand_inputs(group, torch.device("cpu"), rows=slice(4, 6))
    assert torch.equal(only_b["pixel_values"], torch.cat([pix_b, pix_b]))


# ----------------------------------------------------------------------------------------------
# micro-batched generation
# ----------------------------------------------------------------------------------------------
def test_micro_batched_generation_scores_like_the_learner(encoder, images, monkeypatch):
    vocab = encoder.model.config.text_config.vocab_size
    bias = torch.zeros(vocab)
    bias[encoder.eos_token_id] = 2.5  # captions of varied lengths, so calls pad to different T
    handle = encoder.model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    calls = []
    real_generate = captions.lean_generate  # the default loop (rollout.caption.generate_loop: lean)

    def spy(model, call, embeds, **kw):
        calls.append((call["input_ids"].shape[0], kw["num_return_sequences"], kw.get("output_logits")))
        return real_generate(model, call, embeds, **kw)

    monkeypatch.setattr(captions, "lean_generate", spy)
    try:
        groups = {mb: generate_captions(encoder, images, G, max_new_tokens=10, temperature=0.7, seed=1,
                                        micro_batch_size=mb, logits_chunk=5) for mb in (None, 2)}
        with torch.no_grad():
            learner = {mb: completion_logprobs(encoder.model, g, 0.7, encoder.suppressed_ids)[0]
                       for mb, g in groups.items()}
    finally:
        handle.remove()
    # None: both images in one call; 2 rows with G = 3: max(1, 2 // 3) = 1 image (3 rows) per call.
    assert calls == [(2, G, None), (1, G, None), (1, G, None)]
    for mb, group in groups.items():
        n, t = group.completion_ids.shape
        assert n == 2 * G and t <= 10 and len(group.captions) == n
        assert torch.equal(group.completion_mask, completion_mask(group.completion_ids, encoder.eos_token_id))
        assert torch.all(group.completion_ids[group.completion_mask == 0] == encoder.pad_token_id)
        assert torch.all(group.logprobs[group.completion_mask == 0] == 0) and torch.isfinite(group.logprobs).all()
        torch.testing.assert_close(group.logprobs, learner[mb], rtol=0, atol=1e-5)
        tensors = [v for v in group if isinstance(v, torch.Tensor)]
        assert all(vocab not in v.shape for v in tensors)  # no full-vocabulary tensor is kept
    lengths = groups[2].completion_mask.sum(1)
    assert lengths.min() < lengths.max()  # padding was exercised


def test_greedy_captions_do_not_depend_on_the_micro_batch(encoder, images):
    runs = [generate_captions(encoder, images, 1, max_new_tokens=8, greedy=True, micro_batch_size=mb)
            for mb in (None, 1)]
    assert torch.equal(runs[0].completion_ids, runs[1].completion_ids)
    assert runs[0].captions == runs[1].captions
    torch.testing.assert_close(runs[0].logprobs, runs[1].logprobs, rtol=0, atol=1e-5)
