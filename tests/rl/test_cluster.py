"""The users' entry point: `ray job submit ... -- python -m rl.train RECIPE` on a real Ray head.

Starts a head on loopback (`--node-ip-address=127.0.0.1`), submits the tiny recipe with
`--working-dir .`, waits for it, and checks the run's outputs. The head is stopped afterwards.
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """A Ray head on loopback, run with --block in its own process group so that stopping it
    kills this head only (`ray stop` would kill every Ray on the machine)."""
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    assert ray_bin, "the ray CLI is part of ray[default]"
    gcs, dash = free_port(), free_port()
    # Ray 2.5x+ guards the job API with a token: give the head and the client the same one.
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    # Ray's socket paths live under the temp dir: keep it short (AF_UNIX paths max ~107 bytes).
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
         f"--temp-dir={temp}", "--disable-usage-stats",
         # fixed default ports would clash with any other Ray on this machine: take free ones
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
         f"--ray-client-server-port={free_port()}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:  # the job API answers once the dashboard is up
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # it answers (401 without the token): it is up
                break
            except OSError:
                assert head.poll() is None, "ray start --head exited"
                assert time.time() < deadline, "the Ray dashboard did not come up in 120 s"
                time.sleep(1)
        yield ray_bin, address, env
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(head.pid, sig)
                head.wait(timeout=30)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_runs_the_tiny_recipe(ray_head, tmp_path):
    ray_bin, address, env = ray_head
    out = tmp_path / "run"
    cmd = [
        ray_bin, "job", "submit", "--address", address, "--working-dir", str(ROOT),
        "--runtime-env-json", json.dumps({"env_vars": {"HF_HUB_OFFLINE": "1"}}),
        "--", "python", "-m", "rl.train", "recipes/tiny.yaml", "--output-dir", str(out),
        "--set", "schedule.cold_start_steps=1", "--set", "schedule.cycles=1",
        "--set", "schedule.phases=[{stage: encoder, steps: 1}, {stage: decoder, steps: 1}]",
        "--set", "rollout.batch_size=2", "--set", "rollout.group_size=2", "--set", "pretrain.enabled=false",
    ]
    deadline = time.time() + 300
    while True:  # the head's job agent comes up a little after its dashboard
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in proc.stdout + proc.stderr or time.time() > deadline:
            break
        time.sleep(3)
    log = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, log
    assert "succeeded" in proc.stdout.lower(), log
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["cold_start", "encoder", "decoder"]
