"""Issue #19, item 4: nothing hangs silently. A reward function slower than `rewards.timeout_s`
fails naming it and the step (then on_error applies); a rollout slower than `rollout.timeout_s`
stops the run naming the actor and the step. (Plugin imports under `rewards.import_timeout_s` and an
unreachable `ray.address`: tests/rl/test_bad_input.py.)"""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rewards.actors import RewardWorker, TimedReward
from rewards.api import RewardFn, RewardPluginError
from rl.config import Recipe

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "recipes" / "tiny.yaml"


def _sleeper(seconds, release=None):
    def slow(prompts, completions, **kwargs):
        if release is not None:
            release.wait(seconds)
        else:
            time.sleep(seconds)
        return [1.0] * len(completions)
    return slow


def test_a_slow_reward_fails_naming_it_and_the_step():
    timed = TimedReward(RewardFn(_sleeper(30, threading.Event()), name="slow_judge"), timeout_s=0.3)
    t0 = time.time()
    with pytest.raises(RewardPluginError) as e:
        timed(["p"] * 2, ["a", "b"], step=7, on_error="fail")
    assert time.time() - t0 < 5
    assert str(e.value) == "reward plugin 'slow_judge' failed at step 7: took longer than rewards.timeout_s = 0.3 s"


def test_skip_sample_drops_the_scores_and_a_call_still_running_fails_at_once(caplog):
    release = threading.Event()
    timed = TimedReward(RewardFn(_sleeper(30, release), name="slow_judge"), timeout_s=0.3)
    assert timed(["p"] * 3, ["a", "b", "c"], step=1, on_error="skip_sample") == [None, None, None]
    t0 = time.time()
    assert timed(["p"], ["a"], step=2, on_error="skip_sample") == [None]  # at once: no queue behind it
    assert time.time() - t0 < 0.2
    assert "its call of step 1 is still running" in caplog.text
    release.set()  # the first call ends; the next one runs again
    time.sleep(0.1)
    assert timed(["p"], ["a"], step=3, on_error="skip_sample") == [1.0]


def test_sys_exit_in_a_reward_is_a_plugin_failure():
    def quits(prompts, completions, **kwargs):
        sys.exit(3)

    timed = TimedReward(RewardFn(quits, name="quits"), timeout_s=10)
    with pytest.raises(RewardPluginError, match=r"'quits' failed at step 0: called sys.exit\(3\)"):
        timed(["p"], ["a"], step=0, on_error="fail")
    assert timed(["p"], ["a"], step=0, on_error="skip_sample") == [None]


def test_the_reward_worker_applies_rewards_timeout_s(tmp_path):
    plugin = tmp_path / "slow.py"
    plugin.write_text("import time\ndef score(prompts, completions, **kwargs):\n"
                      "    time.sleep(30)\n    return [1.0] * len(completions)\n")
    spec = f"{plugin}:score"
    recipe = Recipe.model_validate({"rewards": {"functions": [{"name": spec}], "timeout_s": 0.5}})
    worker = RewardWorker(recipe)
    with pytest.raises(RewardPluginError, match=f"'{spec}' failed at step 4: took longer than rewards.timeout_s"):
        worker.score(["p"] * 2, ["a", "b"], step=4)
    recipe.rewards.on_error = "skip_sample"
    batch = RewardWorker(recipe).score(["p"] * 2, ["a", "b"], step=5)
    assert list(batch.per_reward.values()) == [[None, None]]


def _train(tmp_path, *sets, timeout=600):
    cmd = [sys.executable, "-m", "rl.train", str(TINY), "--output-dir", str(tmp_path / "run"), "--max-steps", "3"]
    for o in ["pretrain.enabled=false", "schedule.cold_start_steps=0", "rollout.batch_size=2", "rollout.group_size=2",
              "output.progress=false", "output.plot=false", "output.tensorboard=false", "eval.grid_images=0",
              "schedule.phases=[{stage: encoder, steps: 3}]", *sets]:
        cmd += ["--set", o]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(cmd, cwd=REPO, env=dict(env, HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_a_reward_plugin_that_sleeps_stops_the_run_naming_it(tmp_path):
    plugin = tmp_path / "sleepy.py"
    plugin.write_text("import time\ndef score(prompts, completions, step, **kwargs):\n"
                      "    if step >= 1:\n        time.sleep(3600)\n    return [0.5] * len(completions)\n")
    spec = f"{plugin}:score"
    t0 = time.time()
    proc = _train(tmp_path, f"rewards.functions=[{{name: clip}}, {{name: '{spec}'}}]", "rewards.timeout_s=3")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"error: reward plugin '{spec}' failed at step 1: took longer than rewards.timeout_s = 3 s" in proc.stderr
    assert "Traceback" not in proc.stderr.split("error: reward plugin")[-1]
    assert time.time() - t0 < 400


@pytest.mark.slow
def test_a_rollout_slower_than_its_timeout_stops_the_run_naming_the_actor(tmp_path):
    proc = _train(tmp_path, "rollout.timeout_s=0.05", "resources.max_restarts=0")
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: step 0: rollout actor 0: no encoder rollout within 0.05 s (rollout.timeout_s)"), err
    assert (tmp_path / "run" / "failures.jsonl").read_text().count("rollout.timeout_s") == 1


def test_an_actor_that_does_not_start_or_answer_in_time_is_named():
    """Trainer._wait_ready and Trainer._wait_learners on real Ray actors: one whose start takes longer
    than resources.start_timeout_s, or a learner rank whose call takes longer than learner.timeout_s,
    ends the wait naming it (both used to wait forever)."""
    import ray

    from rl.train import StepTimeout, Trainer

    class Quick:
        def ready(self):
            return True

        def state_dict(self):
            return {}

    class Stuck:
        def ready(self):
            time.sleep(60)  # stands for a constructor or placement that never finishes
            return True

        def state_dict(self):
            time.sleep(60)  # stands for a rank stuck in a collective
            return {}

    recipe = Recipe.model_validate({"resources": {"start_timeout_s": 2}, "learner": {"timeout_s": 2}})
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        quick = ray.remote(num_cpus=0)(Quick).remote()
        stuck = ray.remote(num_cpus=0)(Stuck).remote()
        ray.get(quick.ready.remote(), timeout=120)  # up before the 2 s start (a loaded machine takes longer)
        t0 = time.time()
        with pytest.raises(StepTimeout, match=r"^reward actor 1 not started within resources.start_timeout_s = 2 s"):
            Trainer(recipe)._wait_ready([("learner", [quick]), ("reward", [quick, stuck])])
        assert time.time() - t0 < 30
        trainer = Trainer(recipe)
        trainer.learners, trainer.step = [quick, ray.remote(num_cpus=0)(Stuck).remote()], 5
        t0 = time.time()
        with pytest.raises(StepTimeout, match=r"^step 5: learner rank\(s\) \[1\] did not finish state_dict within "
                                              r"learner.timeout_s = 2 s; last complete checkpoint: none$"):
            trainer._learners("state_dict")
        assert time.time() - t0 < 30
    finally:
        ray.shutdown()
