"""A caption renders the same alone or in any batch (issue 15, item 2; shared/DESIGN.md,
"Conditioning independent of the batch").

SD3's joint attention has no key mask and its `context_embedder` has a bias, so zeroed pad slots
are attended tokens: before the fix, a caption batched beside a longer one got more pad slots and
rendered differently. Every condition now has the fixed length L = rollout.caption.max_new_tokens + 1
(`Models.condition`). Each test renders a short caption alone and beside a much longer one and asserts
equality (atol 1e-5) through one path the project uses: the velocity, caption renders (rollouts and
the CLIP reward), eval renders, decoder SDE rollouts, and all of them with CFG on.
"""

from types import SimpleNamespace

import pytest
import torch

import rollouts.actors as actors
from rl.config import Recipe
from rl.models.decoder import pad_condition
from rl.models.unified import build_models
from rollouts.actors import RolloutWorker
from rollouts.trajectories import Uncond, sample_trajectories

MAX_NEW_TOKENS = 12
ATOL = 1e-5


def recipe(cfg_scale: float = 1.0, pooled: str = "learned") -> Recipe:
    return Recipe.model_validate({
        "device": "cpu",
        "models": {"encoder": {"adapter": {"r": 4, "alpha": 8}}, "decoder": {"adapter": {"r": 4, "alpha": 8}},
                   "connector": {"pooled": pooled}},
        "rollout": {"batch_size": 2, "group_size": 2, "caption": {"max_new_tokens": MAX_NEW_TOKENS},
                    "trajectory": {"num_steps": 4, "eval_steps": 5, "render_steps": 3, "noise_level": 0.7,
                                   "cfg_scale": cfg_scale}},
    })


def captions(models) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((ids, mask) of the short caption alone (1, 4), (ids, mask) of [short; long] (2, 12)): 3 words
    + EOS, and 11 words + EOS; the short one right-padded in the batch as generate_captions pads it."""
    g = torch.Generator().manual_seed(0)
    eos, pad = models.encoder.eos_token_id, models.encoder.pad_token_id
    short = torch.cat([torch.randint(10, 60, (3,), generator=g), torch.tensor([eos])])
    long = torch.cat([torch.randint(10, 60, (MAX_NEW_TOKENS - 1,), generator=g), torch.tensor([eos])])
    batch = torch.full((2, MAX_NEW_TOKENS), pad)
    batch[0, :4], batch[1] = short, long
    mask = torch.zeros_like(batch)
    mask[0, :4], mask[1] = 1, 1
    return (short[None], torch.ones(1, 4, dtype=torch.long)), (batch, mask)


def test_zero_padding_is_not_neutral():
    """The premise: more zeroed pad slots change the velocity (context_embedder's bias), so only a
    fixed number of them makes the render independent of the batch."""
    models = build_models(recipe())
    (ids, mask), _ = captions(models)
    with torch.no_grad():
        cond, cmask, pooled = models.condition(ids, mask)
        x, sigma = torch.randn(1, *models.decoder.latent_shape(1)[1:]), torch.tensor([0.5])
        v = models.decoder.velocity(x, sigma, cond, pooled, cmask)
        more = pad_condition(cond, cmask, cond.shape[1] + 10)
        v_more = models.decoder.velocity(x, sigma, more[0], pooled, more[1])
    assert not torch.allclose(v, v_more, atol=1e-3)


@pytest.mark.parametrize("pooled", ["learned", "mean"])
def test_velocity_of_a_short_caption_does_not_depend_on_its_batch(pooled):
    """Failed before the fix: the short caption's condition had 4 + 1 positions alone and 12 + 1
    beside the long one (padded with zeros that joint attention still sees)."""
    models = build_models(recipe(pooled=pooled))
    (ids, mask), (batch, bmask) = captions(models)
    with torch.no_grad():
        alone = models.condition(ids, mask)
        together = models.condition(batch, bmask)
        assert alone[0].shape[1] == together[0].shape[1] == MAX_NEW_TOKENS + 1  # <|im_start|> + caption
        x = torch.randn(2, *models.decoder.latent_shape(1)[1:], generator=torch.Generator().manual_seed(1))
        sigma = torch.tensor([0.7, 0.7])
        v_alone = models.decoder.velocity(x[:1], sigma[:1], alone[0], alone[2], alone[1])
        v_together = models.decoder.velocity(x, sigma, together[0], together[2], together[1])
    for a, t in zip(alone, together):
        assert torch.allclose(a.float(), t[:1].float(), atol=ATOL)
    assert torch.allclose(v_alone, v_together[:1], atol=ATOL)


def test_longer_captions_are_truncated_to_the_fixed_length():
    models = build_models(recipe())
    ids = torch.randint(10, 60, (1, MAX_NEW_TOKENS + 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cond, mask, _ = models.condition(ids, torch.ones_like(ids))
        first, first_mask, _ = models.condition(ids[:, :MAX_NEW_TOKENS], torch.ones_like(ids[:, :MAX_NEW_TOKENS]))
    assert cond.shape[1] == MAX_NEW_TOKENS + 1 and bool(mask.all())
    assert torch.allclose(cond, first, atol=ATOL) and torch.equal(mask, first_mask)


@pytest.fixture
def tensors(monkeypatch):
    """Renders as float tensors, not uint8 PIL images, so that they compare at 1e-5."""
    monkeypatch.setattr(actors, "to_pil", lambda images: list(images.float().cpu()))


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_render_captions_alone_equals_batched(tensors, cfg_scale):
    """Encoder rollouts and the CLIP reward render captions with `render_captions`."""
    worker = RolloutWorker(recipe(cfg_scale))
    (ids, mask), (batch, bmask) = captions(worker.models)
    alone = worker.render_captions(ids, mask, [7])
    together = worker.render_captions(batch, bmask, [7, 8])
    assert torch.allclose(alone[0], together[0], atol=ATOL)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_eval_render_alone_equals_batched(tensors, monkeypatch, cfg_scale):
    """rl/eval.py renders with `RolloutWorker.eval_render` (greedy caption, then eval_steps)."""
    worker = RolloutWorker(recipe(cfg_scale))
    (ids, mask), (batch, bmask) = captions(worker.models)
    # The random tiny encoder would caption both images alike: give them a short and a long caption.
    monkeypatch.setattr(worker, "captions", lambda images, g, seed, greedy=False, **kw: SimpleNamespace(
        completion_ids=ids if len(images) == 1 else batch, completion_mask=mask if len(images) == 1 else bmask,
        captions=["short"] if len(images) == 1 else ["short", "long"]))
    _, alone = worker.eval_render([None], ["img-a"], seed=0)
    _, together = worker.eval_render([None, None], ["img-a", "img-b"], seed=0)
    assert torch.allclose(alone[0], together[0], atol=ATOL)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_sample_trajectories_alone_equals_batched(cfg_scale):
    """Decoder rollouts: the first condition's G rows (same seed, same rows) alone and batched."""
    r = recipe(cfg_scale)
    models = build_models(r)
    (ids, mask), (batch, bmask) = captions(models)
    empty = torch.zeros((1, 0), dtype=torch.long)
    with torch.no_grad():
        uncond = Uncond(*models.condition(empty, empty)) if cfg_scale != 1.0 else None
        alone, together = (sample_trajectories(models.decoder, *models.condition(i, m), group_size=2, num_steps=4,
                                               noise_level=0.7, seed=3, uncond=uncond, cfg_scale=cfg_scale)
                           for i, m in ((ids, mask), (batch, bmask)))
    for name in ("cond", "cond_mask", "pooled", "latents", "next_latents", "log_probs", "images"):
        a, t = getattr(alone, name), getattr(together, name)[:2]
        assert torch.allclose(a.float(), t.float(), atol=ATOL), name
