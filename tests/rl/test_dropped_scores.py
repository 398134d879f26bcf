"""Issue #19, item 5: a dropped score (skip_sample, None, NaN) is left out in every combine mode:
never counted as 0 nor as a low score. Each mode gets identical inputs."""

import math

import pytest
import torch

from rl import grpo

NAN = float("nan")
MODES = ["sum_then_normalize", "normalize_then_sum", "normalize_then_sum_raw"]
W = [1.0, 0.5]  # clip, plugin


def _adv(r, mode, scale="group"):
    return grpo.combine_rewards(torch.tensor(r), W, 4, mode=mode, scale=scale, clip=None)


@pytest.mark.parametrize("mode", MODES)
def test_the_issue_case_a_dropped_score_is_not_a_low_score(mode):
    # every caption reconstructs equally well (clip 1.0), the plugin scores the three it scored 1.0
    # and dropped sample 0. Before the fix, sum_then_normalize gave sample 0 advantage -1.5 and its
    # mates +0.5 (its total was 1.0 + 0.5 * 0 against 1.5); nothing tells them apart: all 0.
    out = _adv([[1.0, 1.0, 1.0, 1.0], [NAN, 1.0, 1.0, 1.0]], mode)
    assert out.advantages.tolist() == [0.0, 0.0, 0.0, 0.0]
    assert out.zero_var_frac == 1.0


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("mode", MODES)
def test_a_dropped_score_sits_between_the_lowest_and_highest_present_score(mode, scale):
    # two groups; the plugin dropped sample 0's score. Its advantage must be above what a score of 0
    # (counted as 0) or of the group's lowest present score would give, and below the highest.
    clip = [0.3, 0.2, 0.5, 0.4, 0.1, 0.9, 0.6, 0.3]
    plugin = [NAN, 0.6, 0.8, 1.0, 0.2, 0.4, 0.1, 0.7]

    def adv0(score):
        return float(_adv([clip, [score, *plugin[1:]]], mode, scale).advantages[0])

    dropped = adv0(NAN)
    assert adv0(0.0) < adv0(0.6) < dropped < adv0(1.0)
    assert math.isfinite(dropped)


@pytest.mark.parametrize("mode", MODES)
def test_a_dropped_score_is_the_group_mean_on_its_reward_axis(mode):
    clip = [0.3, 0.2, 0.5, 0.4, 0.1, 0.9, 0.6, 0.3]
    plugin = [NAN, 0.6, 0.8, 1.0, 0.2, 0.4, 0.1, 0.7]
    filled = [0.8, *plugin[1:]]  # the mean of the present 0.6, 0.8, 1.0
    out, ref = _adv([clip, plugin], mode), _adv([clip, filled], mode)
    if mode == "sum_then_normalize":  # the filled-in sum is exactly the sum with the group mean
        torch.testing.assert_close(out.advantages, ref.advantages)
    else:  # normalised per reward: the dropped term is 0, clip's term alone remains
        clip_only = grpo.group_advantages(torch.tensor(clip), 4, scale="group", clip=None).advantages
        plugin_alone = grpo.group_advantages(torch.tensor(plugin), 4, scale="group", clip=None).advantages
        assert plugin_alone[0] == 0
        if mode == "normalize_then_sum_raw":
            assert float(out.advantages[0]) == pytest.approx(W[0] * float(clip_only[0]))
        assert out.valid.all()


@pytest.mark.parametrize("mode", MODES)
def test_a_sample_with_no_score_at_all_is_left_out(mode):
    r = [[NAN, 0.2, 0.5, 0.4], [NAN, 0.6, 0.8, 1.0]]
    out = _adv(r, mode)
    assert out.advantages[0] == 0 and not out.valid[0]
    # and its mates' advantages are those of the group of three
    three = grpo.combine_rewards(torch.tensor([[0.2, 0.5, 0.4], [0.6, 0.8, 1.0]]), W, 3, mode=mode, clip=None)
    torch.testing.assert_close(out.advantages[1:], three.advantages)


def test_fill_missing():
    # G = 2, three groups. Reward 0: group 0 [1, -] -> 1, group 1 [3, -] -> 3, group 2 none present
    # -> the batch mean (1 + 3) / 2 = 2 for row 4; row 5 has no score at all and stays NaN.
    r = torch.tensor([[1.0, NAN, 3.0, NAN, NAN, NAN],
                      [NAN, 4.0, 6.0, 8.0, 5.0, NAN]])
    out = grpo.fill_missing(r, 2)
    expected = torch.tensor([[1.0, 1.0, 3.0, 3.0, 2.0, NAN], [4.0, 4.0, 6.0, 8.0, 5.0, NAN]])
    torch.testing.assert_close(out, expected, equal_nan=True)


def test_through_the_reward_worker_and_the_driver(tmp_path):
    """The real path: a plugin that raises for one sample under on_error=skip_sample, scored by a
    RewardWorker (the actor's class), advantages by the driver's Trainer._advantages."""
    from rewards.actors import RewardWorker
    from rl.config import Recipe
    from rl.train import Trainer

    plugin = tmp_path / "plug.py"
    plugin.write_text(
        "def const(prompts, completions, **kw):\n    return [1.0] * len(completions)\n"
        "def picky(prompts, completions, **kw):\n"
        "    return [None if c == 'a0' else 1.0 for c in completions]\n")
    recipe = Recipe.model_validate({
        "rollout": {"batch_size": 1, "group_size": 4},
        "rewards": {"on_error": "skip_sample", "functions": [{"name": f"{plugin}:const"}, {"name": f"{plugin}:picky"}]},
        "schedule": {"phases": [{"stage": "encoder", "steps": 1}]},
    })
    for mode in MODES:
        recipe.grpo.reward_combine = mode
        batch = RewardWorker(recipe).score(["p"] * 4, ["a0", "a1", "a2", "a3"], step=0)
        assert torch.isnan(batch.matrix[1, 0])
        adv = Trainer(recipe)._advantages(batch)
        assert adv.advantages.tolist() == [0.0, 0.0, 0.0, 0.0], mode  # was [-1.5, .5, .5, .5]
