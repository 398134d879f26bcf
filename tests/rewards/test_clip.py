"""The CLIP reconstruction reward on a randomly initialised tiny CLIP (no download)."""
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from rewards.api import RewardFn, compute_rewards
from rewards.clip import ClipReward, ImagePreprocess, build_clip, tiny_clip_config


def noise_images(n: int, seed: int = 0) -> list[Image.Image]:
    """Random RGB images of different, non-square sizes (so resize and crop both matter)."""
    rng = np.random.default_rng(seed)
    sizes = [(40, 56), (64, 48), (33, 90), (70, 70), (50, 37)]
    return [
        Image.fromarray(rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8))
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def reward() -> ClipReward:
    return ClipReward(tiny_clip_config(), seed=0)


def test_identical_images_score_one(reward):
    images = noise_images(5)
    assert torch.allclose(reward.similarity(images, images), torch.ones(5), atol=1e-5)


def test_preprocess_matches_open_clip_eval_transform(reward):
    images = noise_images(5)
    transform = open_clip.image_transform(32, is_train=False)  # bicubic, shortest side, crop
    expected = torch.stack([transform(im) for im in images])
    assert reward.preprocess.size == (32, 32)
    assert torch.allclose(reward.preprocess(images), expected, atol=1e-6)


def test_matches_direct_open_clip_computation(reward):
    sources, renders = noise_images(4, seed=1), noise_images(4, seed=2)
    transform = open_clip.image_transform(32, is_train=False)
    with torch.no_grad():  # R_i = cos<f_I(x_i), f_I(x_rec_i)> (UAE sec. 2.3), computed by hand
        f_src = reward.model.encode_image(torch.stack([transform(im) for im in sources]))
        f_rec = reward.model.encode_image(torch.stack([transform(im) for im in renders]))
    expected = torch.nn.functional.cosine_similarity(f_src, f_rec, dim=-1)
    got = reward.similarity(sources, renders)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, torch.ones(4), atol=1e-3)  # different images are not all 1


def test_source_cache_avoids_recomputation():
    reward = ClipReward(tiny_clip_config(), seed=0, batch_size=3)
    encoded = []  # number of images per encode_image call
    original = reward.model.encode_image
    reward.model.encode_image = lambda x: encoded.append(len(x)) or original(x)

    sources = noise_images(2)
    group = [sources[0]] * 3 + [sources[1]] * 3  # G = 3 renders per source
    renders = noise_images(6, seed=5)
    keys = ["img0"] * 3 + ["img1"] * 3
    first = reward.similarity(group, renders, source_keys=keys)
    assert sum(encoded) == 2 + 6  # each source once (deduplicated by key), then 6 renders
    encoded.clear()
    second = reward.similarity(group, renders, source_keys=keys)
    assert sum(encoded) == 6  # sources came from the cache
    assert torch.allclose(first, second, atol=1e-6)
    encoded.clear()
    reward.similarity(group, renders)  # no keys: no cache, but a repeated image object is encoded once
    assert sum(encoded) == 2 + 6


def test_native_reward_call_and_missing_renders(reward):
    images = noise_images(3)
    renders = [images[0], None, images[2]]
    scores = reward(["p"] * 3, ["c"] * 3, images=images, renders=renders, image_ids=[0, 1, 2])
    assert scores[1] is None  # no render, no score (excluded, not 0)
    assert scores[0] == pytest.approx(1.0, abs=1e-5) and scores[2] == pytest.approx(1.0, abs=1e-5)
    # through the plugin API, as the stack calls it
    batch = compute_rewards(
        [RewardFn(reward, name="clip")], ["p"] * 3, ["c"] * 3, step=0,
        images=images, renders=renders, image_ids=[0, 1, 2],
    )
    assert torch.isnan(batch.matrix).tolist() == [[False, True, False]]


def test_extra_timm_backbones():
    reward = ClipReward(
        tiny_clip_config(),
        extra_backbones={
            # model_kwargs go to timm.create_model: a 2-block ViT on 32 px builds in ~0.2 s
            "vit_tiny": {"model": "timm:vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 2},
            "resnet10t": {"model": "timm:resnet10t", "image_size": 64},
        },
    )
    assert reward.backbones["vit_tiny"][1].size == (32, 32)  # read from the model's img_size
    assert reward.backbones["resnet10t"][1].size == (64, 64)
    sources, renders = noise_images(3), noise_images(3, seed=9)
    scores = reward.scores_all_backbones(sources, renders)
    assert set(scores) == {"clip", "vit_tiny", "resnet10t"}
    assert torch.allclose(scores["clip"], reward.similarity(sources, renders))
    for name, s in scores.items():
        assert s.shape == (3,) and bool(((s >= -1) & (s <= 1)).all()), name
    same = reward.scores_all_backbones(sources, sources)
    for name, s in same.items():
        assert torch.allclose(s, torch.ones(3), atol=1e-5), name


def test_seeded_init_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, _ = build_clip(tiny_clip_config(), seed=0)
    assert torch.equal(torch.rand(1), before)  # build_clip forked the RNG
    b, _ = build_clip(tiny_clip_config(), seed=0)
    c, _ = build_clip(tiny_clip_config(), seed=1)
    pa, pb, pc = (m.visual.conv1.weight for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_safetensors_checkpoint_round_trip(tmp_path):
    trained, preprocess = build_clip(tiny_clip_config(), seed=0)
    path = tmp_path / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    loaded, _ = build_clip(tiny_clip_config(), seed=1, checkpoint=str(path))  # seed 1 is overwritten
    for (k, v), (k2, v2) in zip(trained.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    x = preprocess(noise_images(2))
    with torch.no_grad():
        assert torch.equal(trained.encode_image(x), loaded.encode_image(x))
    reward = ClipReward(tiny_clip_config(), seed=1, checkpoint=str(path))
    assert torch.equal(reward.model.visual.conv1.weight, trained.visual.conv1.weight)


def test_image_preprocess_is_deterministic_and_shaped():
    pre = ImagePreprocess((16, 16))
    images = noise_images(3)
    assert pre(images).shape == (3, 3, 16, 16) and torch.equal(pre(images), pre(images))


def test_openai_weights_get_quick_gelu_whatever_the_config_name():
    """`ViT-L-14` + `openai` (recipes/unified_grpo.yaml) must build QuickGELU layers, as OpenAI trained
    them; open_clip's `ViT-L-14` config has plain GELU and would only warn. The real weights cannot be
    downloaded here: the check is on the arguments open_clip gets, from open_clip's own tag table."""
    from rewards.clip import quick_gelu_kwargs

    assert quick_gelu_kwargs("ViT-L-14", "openai", {}) == {"force_quick_gelu": True}
    assert quick_gelu_kwargs("ViT-L-14-quickgelu", "openai", {}) == {}  # the name says so already
    assert quick_gelu_kwargs("ViT-L-14", "laion2b_s32b_b82k", {}) == {}  # trained with GELU
    assert quick_gelu_kwargs("ViT-L-14", None, {}) == {}  # random weights: the config decides
    assert quick_gelu_kwargs("ViT-L-14", "openai", {"force_quick_gelu": False}) == {}  # the recipe's choice wins
