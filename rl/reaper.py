"""Leave no Ray process behind: a watcher that stops a run's local Ray when its driver is gone.

    python -m rl.reaper MARKER DRIVER_PID   # started by rl.train; waits until the driver dies

`ray.init()` of a local cluster starts gcs_server, raylet, dashboard and log monitors, and the
raylet starts a DashboardAgent and a RuntimeEnvAgent. A driver that exits calls `ray.shutdown()`;
one killed with SIGKILL cannot, and the two agents outlive it (issue 19: 3 kills of 3). So the
driver puts `UNIFIED_GRPO_RUN=MARKER` in its environment before `ray.init` (every Ray process of
the run inherits it, workers included) and starts this watcher in a session of its own (a kill of
the driver's process group spares it), holding the only write end of a pipe on its stdin. When the
driver dies, however it dies, the pipe closes (or, should a process forked from the driver still
hold the pipe, the watcher finds itself re-parented); the watcher sends SIGTERM to every process whose
environment carries the marker, then SIGKILL to those still there after `GRACE_S`. Linux only
(it reads /proc); elsewhere it does nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

ENV = "UNIFIED_GRPO_RUN"
GRACE_S = 3.0
POLL_S = 0.5  # how often the watcher checks that the driver is still its parent


@contextlib.contextmanager
def watched():
    """Around `ray.init()`: start the watcher, and mark the environment only while Ray starts its
    processes (a process this one starts later is no part of the run). Yields the watcher (None off
    Linux), which must live as long as the driver: closing its stdin reaps the run."""
    if not os.path.isdir("/proc/self"):
        yield None
        return
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != ENV}
    # The pipe's write end is this process's alone (Python makes fds non-inheritable): EOF on the
    # watcher's stdin means the driver is gone.
    watcher = subprocess.Popen([sys.executable, "-m", "rl.reaper", marker, str(os.getpid())], stdin=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
                               cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    before = os.environ.get(ENV)
    os.environ[ENV] = marker
    try:
        yield watcher
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


def marked(marker: str) -> list[int]:
    """Process ids whose environment holds ENV=marker (this user's readable ones), but this one."""
    needle = f"{ENV}={marker}".encode()
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.append(int(name))
        except OSError:  # gone, or not ours
            continue
    return pids


def reap(marker: str, grace_s: float = GRACE_S) -> list[int]:
    """SIGTERM, then after `grace_s` SIGKILL, every process of the run; returns those signalled."""
    pids = marked(marker)
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.time() + grace_s
    while time.time() < deadline and _alive(marked(marker)):
        time.sleep(0.2)
    for pid in marked(marker):
        _signal(pid, signal.SIGKILL)
    return pids


def _alive(pids: list[int]) -> bool:
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":  # a zombie is gone already
                    return True
        except OSError:
            continue
    return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def main() -> None:
    marker = sys.argv[1]
    # the driver's pid (its parent: start_new_session changes the session, not the parent), given by
    # the driver so that a driver dead before this line runs is seen as dead
    driver = int(sys.argv[2]) if len(sys.argv) > 2 else os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the driver; this waits for it to end
    closed = threading.Event()

    def read() -> None:
        sys.stdin.buffer.read()  # until every holder of the pipe's write end is gone
        closed.set()

    threading.Thread(target=read, daemon=True).start()
    # The pipe closes when the driver dies, unless a process forked from it (a fork keeps its fds)
    # still holds the write end: the driver's death is also seen as this process being re-parented.
    while not closed.wait(POLL_S) and os.getppid() == driver:
        pass
    reap(marker)


if __name__ == "__main__":
    main()
