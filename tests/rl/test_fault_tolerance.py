"""Actor failures: a rollout actor and a reward actor killed from outside mid-run are restarted by
Ray, their step is retried with the last synced weights, and the run finishes with every step."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rl.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny.yaml"


def _wait(cond, timeout: float, what: str, proc) -> None:
    deadline = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            output = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"the run ended early (exit {proc.returncode}) while waiting for {what}:\n"
                                 f"{output[-4000:]}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_killed_rollout_and_reward_actors_do_not_stop_the_run(tmp_path):
    out = tmp_path / "run"
    steps = 30
    cmd = [
        sys.executable, "-m", "rl.train", str(TINY), "--output-dir", str(out),
        "--set", "schedule.cold_start_steps=0", "--set", "schedule.cycles=1",
        "--set", f"schedule.phases=[{{stage: encoder, steps: {steps // 2}}}, {{stage: decoder, steps: {steps // 2}}}]",
        "--set", "rollout.batch_size=2", "--set", "rollout.group_size=2", "--set", "resources.max_restarts=3",
        "--set", "pretrain.enabled=false",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        metrics = out / "metrics.jsonl"
        _wait(lambda: len(read_metrics(metrics)) >= 2, 300, "the first steps", proc)
        actors = {(a["role"], a["index"]): a["pid"] for a in json.loads((out / "actors.json").read_text())}
        os.kill(actors[("rollout", 0)], signal.SIGKILL)
        n = len(read_metrics(metrics))
        _wait(lambda: len(read_metrics(metrics)) >= n + 2, 300, "steps after the rollout actor's death", proc)
        os.kill(actors[("reward", 0)], signal.SIGKILL)
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-4000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(steps))  # every step once, none lost
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert {f["actor"] for f in failures} == {"rollout-0", "reward-0"}
    assert all("step" in f for f in failures)
