"""Issue #19, item 8: a driver killed with SIGKILL leaves no Ray process of its run behind
(rl/reaper.py), and Ctrl-C (SIGINT to the foreground process group) ends the run with one line
naming the last checkpoint, a non-zero exit and no traceback, its checkpoints intact."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from rl import checkpoint as ckpt
from rl.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "recipes" / "tiny.yaml"


def _start(out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rl.train", str(TINY), "--output-dir", str(out)]
    for o in ["pretrain.enabled=false", "schedule.cold_start_steps=0", "rollout.batch_size=2", "rollout.group_size=2",
              "output.progress=false", "output.plot=false", "output.tensorboard=false", "eval.grid_images=0",
              "output.save_every=1", "schedule.phases=[{stage: encoder, steps: 200}]"]:
        cmd += ["--set", o]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # a session of its own: the driver leads a process group, as a shell's foreground job does
    return subprocess.Popen(cmd, cwd=REPO, env=dict(env, HF_HUB_OFFLINE="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_steps(proc, out: Path, n: int, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while len(read_metrics(out / "metrics.jsonl")) < n:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early (exit {proc.returncode}): {proc.stderr.read()[-3000:]}")
        assert time.time() < deadline, "timed out waiting for the first steps"
        time.sleep(0.5)


def _alive(procs: list[psutil.Process]) -> list[str]:
    left = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{p.pid} {' '.join(p.cmdline())[:100]}")
        except psutil.NoSuchProcess:
            continue
    return left


def _survivors(procs: list[psutil.Process], out: Path) -> str:
    """What is left, and why the watcher missed it: each survivor's parent, whether its environment
    (as /proc shows it) still holds the run's marker; then the watcher's log."""
    marker = next((p.cmdline()[3] for p in procs if "rl.reaper" in " ".join(_cmdline(p))), "?")
    lines = []
    for p in procs:
        try:
            if not p.is_running() or p.status() == psutil.STATUS_ZOMBIE:
                continue
            env = Path(f"/proc/{p.pid}/environ").read_bytes()
            lines.append(f"{p.pid} ppid {p.ppid()} {' '.join(p.cmdline())[:60]}: marker in environ "
                         f"{f'UNIFIED_GRPO_RUN={marker}'.encode() in env.split(bytes(1))}, "
                         f"{env.count(bytes(1))} entries, {len(env) - len(env.lstrip(bytes(1)))} leading NULs")
        except (psutil.NoSuchProcess, OSError):
            continue
    log = out / "reaper.log"
    return "\n".join(lines + [log.read_text() if log.exists() else "no reaper.log"])


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.NoSuchProcess:
        return []


def _cleanup(proc: subprocess.Popen, procs: list[psutil.Process]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    for p in procs:  # this test's run only, should anything be left
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.slow
def test_sigkill_of_the_driver_leaves_no_ray_process(tmp_path):
    out = tmp_path / "run"
    proc = _start(out)
    ray_procs: list[psutil.Process] = []
    try:
        _wait_steps(proc, out, 1)
        ray_procs = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in ray_procs)
        assert "raylet" in names and "DashboardAgent" in names and "rl.reaper" in names  # what used to stay
        os.kill(proc.pid, signal.SIGKILL)  # the driver alone, not its group
        proc.wait(timeout=30)
        deadline = time.time() + 40
        while _alive(ray_procs) and time.time() < deadline:
            time.sleep(0.5)
        assert _alive(ray_procs) == [], _survivors(ray_procs, out)
    finally:
        _cleanup(proc, ray_procs)


@pytest.mark.slow
def test_ctrl_c_ends_quietly_naming_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = _start(out)
    ray_procs: list[psutil.Process] = []
    try:
        _wait_steps(proc, out, 2)
        ray_procs = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        _, err = proc.communicate(timeout=120)
    finally:
        _cleanup(proc, ray_procs)
    assert proc.returncode == 130, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted at step "), err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    named = last.split("last complete checkpoint: ")[1]
    newest, skipped = ckpt.find_latest(str(out / "checkpoints"))
    assert named == newest and Path(named).is_dir()
    ckpt.load_checkpoint(named)  # complete, hashes match
    deadline = time.time() + 20  # the driver stopped its Ray and waited for the watcher: all gone
    while _alive(ray_procs) and time.time() < deadline:
        time.sleep(0.5)
    assert _alive(ray_procs) == []


DRIVER = """
import ctypes, os, signal, subprocess, sys, time
from rl import reaper

def die_with_parent():  # what Ray does for gcs_server and the raylet: they die with the driver
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

# a 'raylet' whose child, an 'agent', does not show the marker in /proc (setproctitle wiped it)
RAYLET = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], env={}); time.sleep(120)"
with reaper.watched(sys.argv[1]):
    marked = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # a 'Ray process'
    raylet = subprocess.Popen([sys.executable, "-c", RAYLET], preexec_fn=die_with_parent)
if os.fork() == 0:  # a process forked from the driver keeps the pipe's write end open
    time.sleep(120)
    os._exit(0)
print(marked.pid, raylet.pid, flush=True)
time.sleep(120)
"""


def test_the_watcher_reaps_the_run_when_the_driver_dies_even_if_a_fork_holds_its_pipe(tmp_path):
    """rl/reaper.py: a stand-in driver starts the watcher, a marked process, a marked 'raylet' that
    dies with the driver and whose child, an 'agent', has no marker in its environment (as Ray's
    agents after setproctitle), and a fork of itself that inherits the watcher's pipe. SIGKILL of the
    driver alone must still end the marked process, the raylet and the agent (the watcher tracked
    the agent as the raylet's child while the driver lived, and sees itself re-parented), while the
    fork, which is no part of the run, is spared."""
    script, log = tmp_path / "driver.py", tmp_path / "reaper.log"
    script.write_text(DRIVER)
    driver = subprocess.Popen([sys.executable, str(script), str(log)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)), start_new_session=True)
    procs: list[psutil.Process] = []
    try:
        marked, raylet = (psutil.Process(int(pid)) for pid in driver.stdout.readline().split())
        deadline = time.time() + 30
        while len(raylet.children()) < 1 and time.time() < deadline:
            time.sleep(0.1)
        agent = raylet.children()[0]
        assert b"UNIFIED_GRPO_RUN=" not in Path(f"/proc/{agent.pid}/environ").read_bytes()
        while f"+{agent.pid} " not in (log.read_text() if log.exists() else "") and time.time() < deadline:
            time.sleep(0.1)  # the watcher has seen the agent (it looks every reaper.POLL_S)
        procs = psutil.Process(driver.pid).children(recursive=True)  # watcher, marked, raylet, agent, fork
        run = [marked, raylet, agent]
        fork = [p for p in procs if p.pid not in {q.pid for q in run} and "rl.reaper" not in " ".join(p.cmdline())]
        assert len(procs) == 5 and len(fork) == 1, [p.cmdline() for p in procs]
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        deadline = time.time() + 30
        while _alive(run) and time.time() < deadline:
            time.sleep(0.2)
        assert _alive(run) == [], log.read_text()
        assert _alive(fork) != []  # it still holds the pipe: the pipe alone would not have closed
    finally:
        _cleanup(driver, procs)
