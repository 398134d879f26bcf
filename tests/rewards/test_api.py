"""The reward plugin API: the four ways to name a reward, adapters, and every bad-plugin case."""
import asyncio
import inspect
import logging
import math
import pickle
import textwrap
from pathlib import Path

import pytest
import torch

from rewards import api
from rewards.api import (
    RewardFn,
    RewardPluginError,
    RewardSpecError,
    compute_rewards,
    from_verl,
    load_reward,
    register,
    validate_specs,
)
from rewards.format import READE_SECTIONS, format_score

HERE = Path(__file__).parent
PLUGINS = HERE / "plugins"
COMPLETIONS = ["a", "bb", "ccc", "dddd"]  # length_reward: [0.1, 0.2, 0.3, 0.4]
PROMPTS = ["p"] * 4


@pytest.fixture(autouse=True)
def private_registry(monkeypatch):
    """Each test registers into a copy, so test names never leak into the real registry."""
    api._import_builtins()
    monkeypatch.setattr(api, "_REGISTRY", dict(api._REGISTRY))


def bad(fn_name: str) -> RewardFn:
    return load_reward(f"plugins/bad.py:{fn_name}", base_dir=HERE)


# ---------------------------------------------------------------------------------------------
# The four routes
# ---------------------------------------------------------------------------------------------


def test_registered_name():
    @register("test_upper")
    def upper(prompts, completions, **kwargs):
        return [float(c.isupper()) for c in completions]

    fn = load_reward("test_upper", weight=0.5)
    assert (fn.name, fn.weight) == ("test_upper", 0.5)
    assert fn(PROMPTS, ["A", "b", "C", "d"], step=0) == [1.0, 0.0, 1.0, 0.0]
    assert "format" in api.registered_names()  # built-ins are registered without an import


def test_register_same_name_twice():
    def one(prompts, completions, **kwargs):
        return [1.0] * len(completions)

    def two(prompts, completions, **kwargs):
        return [2.0] * len(completions)

    register("test_dup")(one)
    register("test_dup")(one)  # same function again: fine (a module imported twice)
    with pytest.raises(ValueError, match="already registered"):
        register("test_dup")(two)


def test_module_route(tmp_path, monkeypatch):
    (tmp_path / "ug_test_module_plugin.py").write_text(
        textwrap.dedent(
            """
            def reward(prompts, completions, **kwargs):
                return [float(len(c)) for c in completions]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("ug_test_module_plugin:reward")(PROMPTS, COMPLETIONS, step=0) == [1.0, 2.0, 3.0, 4.0]


def test_file_route_relative_absolute_and_cwd(monkeypatch):
    expected = [0.1, 0.2, 0.3, 0.4]  # len / 10
    assert load_reward("plugins/basic.py:length_reward", base_dir=HERE)(PROMPTS, COMPLETIONS, step=0) == expected
    assert load_reward(f"{PLUGINS}/basic.py:length_reward")(PROMPTS, COMPLETIONS, step=0) == expected
    monkeypatch.chdir(HERE)
    assert load_reward("plugins/basic.py:length_reward")(PROMPTS, COMPLETIONS, step=0) == expected
    # an attribute path after the colon
    holder = load_reward("plugins/basic.py:Holder.first_char_is_a")
    assert holder(PROMPTS, ["ab", "ba", "a", "b"], step=0) == [1.0, 0.0, 1.0, 0.0]


def test_file_loaded_once():
    a = load_reward("plugins/basic.py:length_reward", base_dir=HERE)
    b = load_reward(f"{PLUGINS}/basic.py:length_reward")
    assert a.fn is b.fn


def test_entry_point_route(tmp_path, monkeypatch):
    # A fake installed distribution: importlib.metadata finds *.dist-info folders on sys.path.
    (tmp_path / "ug_fake_plugin.py").write_text(
        "def reward(prompts, completions, **kwargs):\n    return [7.0] * len(completions)\n"
    )
    dist_info = tmp_path / "ug_fake_plugin-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: ug-fake-plugin\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[unified_grpo.rewards]\nug_seven = ug_fake_plugin:reward\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_reward("ug_seven")
    assert fn.name == "ug_seven"
    assert fn(PROMPTS, COMPLETIONS, step=0) == [7.0] * 4


def test_step_and_extra_kwargs_reach_the_plugin():
    fn = load_reward("plugins/basic.py:step_echo", base_dir=HERE)
    assert fn(PROMPTS, COMPLETIONS, step=3, images=[None] * 4, unknown_key="x") == [3.0] * 4


# ---------------------------------------------------------------------------------------------
# Async, TRL, verl
# ---------------------------------------------------------------------------------------------


def test_async_function():
    fn = load_reward("plugins/basic.py:async_length_reward", base_dir=HERE)
    assert fn(PROMPTS, COMPLETIONS, step=0) == [0.1, 0.2, 0.3, 0.4]

    async def driver():  # called from inside a running event loop: runs on a helper thread
        return fn(PROMPTS, COMPLETIONS, step=0)

    assert asyncio.run(driver()) == [0.1, 0.2, 0.3, 0.4]


def test_trl_reward_function_unchanged():
    from trl.rewards import think_format_reward

    fn = load_reward("trl.rewards:think_format_reward")
    assert fn.fn is think_format_reward  # no wrapper: TRL's signature is ours
    # TRL's conversational completions; its rule: starts with <think>, one think block.
    completions = [
        [{"role": "assistant", "content": "<think>\nreasoning\n</think>\nanswer"}],
        [{"role": "assistant", "content": "no think tags"}],
    ]
    assert fn(["p", "p"], completions, step=0) == [1.0, 0.0]


@pytest.mark.parametrize(
    "spec", ["plugins/verl_style.py:my_reward", "verl:plugins/verl_style.py:compute_score"]
)
def test_verl_adapter(spec):
    fn = load_reward(spec, base_dir=HERE)
    completions = ["4", "5", " 4 ", "4"]
    # score = (answer == ground truth) + extra_info["bonus"]; data_source "dict" returns a dict
    scores = fn(
        PROMPTS,
        completions,
        step=0,
        data_source=["x", "dict", "dict", "x"],
        ground_truth=["4", "4", "4", "5"],
        extra_info=[None, {"bonus": 0.5}, None, {"bonus": 0.25}],
    )
    assert scores == [1.0, 0.5, 1.0, 0.25]
    # TRL's column name `solution` also works; missing data_source / extra_info -> None
    assert fn(PROMPTS, completions, step=0, solution=["4"] * 4) == [1.0, 0.0, 1.0, 1.0]


def test_from_verl_directly():
    def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        return {"score": float(len(solution_str)), "data_source": data_source}

    assert from_verl(compute_score)(prompts=None, completions=["ab", "c"]) == [2.0, 1.0]


# ---------------------------------------------------------------------------------------------
# Specs that do not resolve
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, words",
    [
        ("no_such_reward_xyz", ["registered names", "format", "entry points"]),
        ("no_such_module_xyz.sub:fn", ["No module named"]),
        ("plugins/basic.py:missing_fn", ["has no attribute"]),
        ("plugins/missing.py:fn", ["no such file"]),
        ("plugins/basic.py:NOT_A_FUNCTION", ["not a reward function"]),
        ("plugins/basic.py:no_kwargs", ["**kwargs"]),
        ("verl:no_such_reward_xyz", ["registered names"]),
    ],
)
def test_bad_spec_names_the_spec(spec, words):
    with pytest.raises(RewardSpecError) as err:
        load_reward(spec, base_dir=HERE)
    assert isinstance(err.value, ValueError)
    assert repr(spec) in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_validate_specs():
    good = validate_specs(["format", "plugins/basic.py:length_reward"], base_dir=HERE)
    assert [(f.name, f.spec) for f in good] == [("format", "format"), ("length_reward", "plugins/basic.py:length_reward")]
    with pytest.raises(RewardSpecError, match="'nope_xyz'") as err:
        validate_specs(["format", "nope_xyz"], base_dir=HERE)
    assert err.value.spec == "nope_xyz"


# ---------------------------------------------------------------------------------------------
# Plugins that misbehave: on_error="fail" and "skip_sample"
# ---------------------------------------------------------------------------------------------

BAD_CASES = [  # plugin, message fragment, positions that become None under skip_sample
    ("raises", "raised RuntimeError: boom", [0, 1, 2, 3]),
    ("wrong_length", "returned 2 scores for 4 completions", [0, 1, 2, 3]),
    ("returns_none", "returned NoneType, not a list of scores", [0, 1, 2, 3]),
    ("non_number", "score 1 is a str", [1]),
    ("returns_bool", "score 0 is a bool", [0]),
    ("nan_at_1", "score 1 is nan (not finite)", [1]),
    ("inf_at_0", "score 0 is inf (not finite)", [0]),
]


@pytest.mark.parametrize("plugin, message, _", BAD_CASES)
def test_bad_plugin_fails_naming_plugin_and_step(plugin, message, _):
    fn = bad(plugin)
    with pytest.raises(RewardPluginError) as err:
        compute_rewards([fn], PROMPTS, COMPLETIONS, step=3, on_error="fail")
    assert (err.value.plugin, err.value.step) == (f"plugins/bad.py:{plugin}", 3)
    assert str(err.value).startswith(f"reward plugin 'plugins/bad.py:{plugin}' failed at step 3: ")
    assert message in str(err.value)


@pytest.mark.parametrize("plugin, message, none_at", BAD_CASES)
def test_bad_plugin_skip_sample(plugin, message, none_at, caplog):
    good = load_reward("plugins/basic.py:length_reward", base_dir=HERE)
    with caplog.at_level(logging.WARNING, logger="rewards.api"):
        batch = compute_rewards([good, bad(plugin)], PROMPTS, COMPLETIONS, step=7, on_error="skip_sample")
    scores = batch.per_reward[plugin]  # keyed by the function's name, never its path
    assert [i for i, s in enumerate(scores) if s is None] == none_at
    assert all(s == 0.5 for s in scores if s is not None)
    # NaN in the matrix marks exactly the missing scores, nothing else
    assert batch.matrix.shape == (2, 4) and batch.matrix.dtype == torch.float32
    assert torch.isnan(batch.matrix[1]).nonzero().flatten().tolist() == none_at
    assert not torch.isnan(batch.matrix[0]).any()
    assert f"plugins/bad.py:{plugin}" in caplog.text and "step 7" in caplog.text and message in caplog.text


def test_none_is_a_valid_missing_score_and_means_exclude_it():
    fns = [bad("some_none"), load_reward("plugins/basic.py:length_reward", base_dir=HERE, weight=2.0)]
    batch = compute_rewards(fns, PROMPTS, COMPLETIONS, step=0)  # no error even under "fail"
    assert batch.per_reward["some_none"] == [None, 1.0, 1.0, 1.0]
    assert batch.means["some_none"] == 1.0  # (1 + 1 + 1) / 3, not 3 / 4
    assert batch.means["length_reward"] == pytest.approx(0.25)  # (.1+.2+.3+.4)/4
    assert batch.weights == [1.0, 2.0]
    assert math.isnan(batch.matrix[0, 0]) and batch.matrix[1].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_mean_is_none_when_nothing_present():
    batch = compute_rewards([bad("raises")], PROMPTS, COMPLETIONS, step=0, on_error="skip_sample")
    assert batch.means == {"raises": None}


def test_duplicate_reward_names_rejected():
    fn = load_reward("format")
    with pytest.raises(ValueError, match="unique"):
        compute_rewards([fn, fn], PROMPTS, COMPLETIONS, step=0)


def test_names_are_function_names_with_a_suffix_on_a_clash():
    specs = ["recipes/plugins/my_reward.py:shape_words", "pkg.mod:Holder.score", "verl:x.py:compute_score",
             "format", "other/my_reward.py:shape_words", "ug_entry_point"]
    names = [api.reward_name(s) for s in specs]
    assert names == ["shape_words", "score", "compute_score", "format", "shape_words", "ug_entry_point"]
    assert api.unique_names(names) == ["shape_words", "score", "compute_score", "format", "shape_words_2", "ug_entry_point"]
    assert api.unique_names(["a", "a", "a_2", "a"]) == ["a", "a_3", "a_2", "a_4"]  # never a name already taken
    fn = load_reward("plugins/basic.py:length_reward", base_dir=HERE)
    assert (fn.name, fn.spec, fn.__name__) == ("length_reward", "plugins/basic.py:length_reward", "length_reward")


def test_load_reward_has_trls_signature_step_optional():
    fn = load_reward("plugins/basic.py:length_reward", base_dir=HERE)
    # As TRL's GRPOTrainer._calculate_rewards calls a reward function: keywords, no step.
    out = fn(prompts=PROMPTS, completions=[[{"role": "assistant", "content": c}] for c in COMPLETIONS],
             completion_ids=[[1]] * 4, trainer_state=None, log_extra=None, log_metric=None)
    assert out == [0.1, 0.2, 0.3, 0.4]
    assert inspect.signature(fn).parameters["step"].default is None
    echo = load_reward("plugins/basic.py:step_echo", base_dir=HERE)
    assert echo(PROMPTS, COMPLETIONS, step=5) == [5.0] * 4
    with pytest.raises(RewardPluginError, match=r"^reward plugin 'plugins/bad.py:raises' failed: raised"):
        bad("raises")(PROMPTS, COMPLETIONS)


def test_relative_plugin_path_is_relative_to_the_recipe_file(tmp_path, monkeypatch):
    from rl.config import RecipeError, load_recipe

    recipes = tmp_path / "recipes"
    (recipes / "plugins").mkdir(parents=True)
    (recipes / "plugins" / "r.py").write_text("def r(prompts, completions, **kwargs):\n    return [1.0] * len(completions)\n")
    (recipes / "x.yaml").write_text("rewards:\n  functions:\n    - {name: plugins/r.py:r}\n")
    monkeypatch.chdir(tmp_path)  # the working directory has no plugins/: the recipe's folder is what counts
    load_recipe(recipes / "x.yaml")
    (recipes / "y.yaml").write_text("rewards:\n  functions:\n    - {name: recipes/plugins/r.py:r}\n")
    with pytest.raises(RecipeError, match=r"rewards.functions.0.name.*no such file: .*recipes/recipes/plugins/r.py "
                                          r"\(a relative path is resolved against the recipe file folder"):
        load_recipe(recipes / "y.yaml")


def test_plugin_error_pickles():  # it crosses Ray actor boundaries
    err = pickle.loads(pickle.dumps(RewardPluginError("x", 3, "returned 2 scores for 4 completions")))
    assert str(err) == "reward plugin 'x' failed at step 3: returned 2 scores for 4 completions"


# ---------------------------------------------------------------------------------------------
# The format reward (ReaDe eq. 2)
# ---------------------------------------------------------------------------------------------

SIX_PARTS = " ".join(f"{k}. {name}: text {k}." for k, name in enumerate(READE_SECTIONS, start=1))
THINK = "<think>look at the image first</think>\n"
ANSWER = f"<answer>{SIX_PARTS}</answer>"


@pytest.mark.parametrize(
    "completion, expected",
    [
        (THINK + ANSWER, 1.0),  # both formats
        (THINK + ANSWER + "\n", 1.0),  # trailing whitespace is fine
        (THINK + "a red circle", 0.2),  # think only
        (ANSWER, 0.2),  # answer only
        (THINK + THINK + ANSWER, 0.2),  # two think blocks: think fails, answer holds
        ("<think>   </think>" + ANSWER, 0.2),  # blank reasoning: think fails
        (THINK + ANSWER.replace("6. Camera caption: text 6.", ""), 0.2),  # five parts: answer fails
        (THINK + ANSWER.replace("text 3.", ""), 0.2),  # a blank part: answer fails
        (THINK + ANSWER + " more", 0.2),  # text after </answer>: answer fails
        ("a red circle", 0.0),  # neither
        ("<answer>" + SIX_PARTS, 0.0),  # unclosed answer, no think
    ],
)
def test_format_reward(completion, expected):
    assert load_reward("format_reade")(["p"], [completion], step=0) == [expected]


def test_format_tags_only_and_conversational():
    assert format_score(THINK + "<answer>a red circle</answer>", sections=None) == 1.0
    assert format_score(THINK + "<answer>a red circle</answer>") == 0.2  # six parts required
    assert load_reward("format")(["p"], [THINK + "<answer>a red circle</answer>"], step=0) == [1.0]
    assert load_reward("format")(["p"], ["<answer>a red circle</answer>"], step=0) == [0.2]
    conversational = [[{"role": "assistant", "content": THINK + ANSWER}]]
    assert load_reward("format_reade")(["p"], conversational, step=0) == [1.0]


def test_load_reward_runs_inside_trls_own_calculate_rewards():
    """A loaded reward is a TRL reward function: TRL's GRPOTrainer._calculate_rewards (trl 1.16, a
    trainer built with object.__new__, only the attributes that method reads set) names it by its
    __name__ and calls it with its own keywords, on the arguments our reward workers build."""
    from types import SimpleNamespace

    from PIL import Image
    from trl import GRPOTrainer

    from rewards.actors import trl_completion, trl_prompt

    fns = [load_reward("plugins/basic.py:length_reward", base_dir=HERE), load_reward("trl.rewards:think_format_reward")]
    t = object.__new__(GRPOTrainer)
    t.__dict__.update(accelerator=SimpleNamespace(device=torch.device("cpu"), is_main_process=True), reward_funcs=fns,
                      reward_processing_classes=[None, None], reward_func_names=[f.__name__ for f in fns],
                      state=SimpleNamespace(global_step=0), args=SimpleNamespace(report_to=[]),
                      environments=None, _log_completion_extra=None, _log_metric=None)
    prompts = [trl_prompt(Image.new("RGB", (4, 4)))] * 2
    completions = [trl_completion("<think>a</think>b"), trl_completion("plain")]
    inputs = [{"prompt": p, "image_id": i} for p, i in zip(prompts, ["x", "y"])]  # a dataset column: image_id
    rewards = t._calculate_rewards(inputs, prompts, completions, [[1], [2]])
    assert t.reward_func_names == ["length_reward", "think_format_reward"]
    assert torch.allclose(rewards, torch.tensor([[1.7, 1.0], [0.5, 0.0]]))  # len / 10; TRL's think rule
