"""Leave no Ray process behind: a watcher that stops a run's local Ray when its driver is gone.

    python -m rl.reaper MARKER DRIVER_PID       # started by rl.train; waits until the driver dies
    python -m rl.reaper MARKER DRIVER_PID LOG   # the same, logging what it sees and signals to LOG

`ray.init()` of a local cluster starts gcs_server, raylet, dashboard and log monitors, and the
raylet starts a DashboardAgent, a RuntimeEnvAgent and the workers. A driver that exits calls
`ray.shutdown()`; one killed with SIGKILL cannot: the processes it started die with it (Ray sets
their parent-death signal), but the agents, children of the raylet, outlive it (issue 19: 3 kills
of 3). So the driver puts `UNIFIED_GRPO_RUN=MARKER` in its environment before `ray.init` (every Ray
process of the run inherits it) and starts this watcher in a session of its own (a kill of the
driver's process group spares it), holding the only write end of a pipe on its stdin. While the
driver lives, the watcher tracks the run's processes every `POLL_S`: those whose environment in
/proc shows the marker, and their descendants. The marker alone is not enough: Ray's processes
rename themselves with setproctitle, which overwrites their environment strings in /proc, and
whether the marker survives depends on where it lies in them (the agents lost it in some runs, and
outlived a watcher that looked for the marker only once the driver was gone). When the driver
dies, however it dies, the pipe closes (or, should a process forked from the driver still hold the
pipe, the watcher finds itself re-parented); the watcher sends SIGTERM to every process of the run,
then SIGKILL to those still there after `GRACE_S` (the agents ignore SIGTERM while their raylet is
gone). Linux only (it reads /proc); elsewhere it does nothing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

ENV = "UNIFIED_GRPO_RUN"
GRACE_S = 3.0
POLL_S = 1.0  # how often the watcher checks that the driver is still its parent, and tracks the run (~10 ms)
_LOG = None  # the watcher's log file, when it was given one
_UNREADABLE: set[str] = set()  # /proc entries whose environ could not be read, logged once


@contextlib.contextmanager
def watched(log_path: str | None = None):
    """Around `ray.init()`: start the watcher, and mark the environment only while Ray starts its
    processes (a process this one starts later is no part of the run). Yields the watcher (None off
    Linux), which must live as long as the driver: closing its stdin reaps the run. `log_path`: the
    watcher's log (what it saw and signalled, with times), e.g. `reaper.log` in the run directory."""
    if not os.path.isdir("/proc/self"):
        yield None
        return
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != ENV}
    # The pipe's write end is this process's alone (Python makes fds non-inheritable): EOF on the
    # watcher's stdin means the driver is gone.
    watcher = subprocess.Popen([sys.executable, "-m", "rl.reaper", marker, str(os.getpid()),
                                *([os.path.abspath(log_path)] if log_path else [])], stdin=subprocess.PIPE,
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
    """Process ids whose environment, as /proc shows it, holds ENV=marker (this user's readable
    ones), but this one. A process that rewrote its title with setproctitle may no longer show it."""
    needle = f"{ENV}={marker}".encode()
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.append(int(name))
        except OSError as e:  # gone, or not ours
            if e.errno not in (errno.ENOENT, errno.ESRCH) and name not in _UNREADABLE:
                _UNREADABLE.add(name)
                _log(f"cannot read /proc/{name}/environ: {e}")
            continue
    return pids


def run_processes(marker: str, known: dict[int, int] | None = None) -> dict[int, int]:
    """{pid: start time} of the run's live processes: the marked ones, those in `known` (the same
    pid with the same start time: not a reused pid), and every descendant of either, but this one.
    Ray's processes rename themselves with setproctitle, which overwrites the command line and the
    environment strings behind it in /proc (ray.init's DashboardAgent and RuntimeEnvAgent lose the
    marker there in some runs and not in others, depending on where it lies in their environment),
    so a run's processes are tracked while the driver lives (`known`): they are found by the marker
    (gcs_server and the raylet keep theirs) or as a descendant (the raylet starts the agents and the
    workers), and stay known after the raylet, killed with the driver, leaves them to init."""
    table = {pid: stat for pid in _pids() if (stat := _stat(pid)) is not None}  # pid -> (ppid, start, state)
    run = {pid: st[1] for pid, st in table.items() if (known or {}).get(pid) == st[1]}
    run.update((pid, table[pid][1]) for pid in marked(marker) if pid in table)
    children: dict[int, list[int]] = {}
    for pid, st in table.items():
        children.setdefault(st[0], []).append(pid)
    todo = list(run)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in run:
                run[child] = table[child][1]
                todo.append(child)
    run.pop(os.getpid(), None)
    return {pid: start for pid, start in run.items() if table[pid][2] != "Z"}  # a zombie is gone already


def reap(marker: str, known: dict[int, int] | None = None, grace_s: float = GRACE_S) -> list[int]:
    """SIGTERM, then after `grace_s` SIGKILL, every process of the run (`run_processes`); returns
    those signalled."""
    run = run_processes(marker, known)
    shown = set(marked(marker))  # the others were found as known or as descendants only
    _log(f"found {len(run)}: " + "; ".join(f"{pid} {_name(pid)}{'' if pid in shown else ' (no marker in /proc)'}"
                                           for pid in run))
    for pid in run:
        _signal(pid, signal.SIGTERM)
    deadline = time.time() + grace_s
    while time.time() < deadline and run_processes(marker, run):
        time.sleep(0.2)
    left = run_processes(marker, run)
    _log(f"after {grace_s:g} s, SIGKILL to {len(left)}: " + "; ".join(f"{pid} {_name(pid)}" for pid in left))
    for pid in left:
        _signal(pid, signal.SIGKILL)
    return list(run)


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, start time in clock ticks, state) of a process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ... (proc(5))
        return int(fields[1]), int(fields[19]), fields[0]
    except (OSError, IndexError, ValueError):
        return None


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError as e:
        _log(f"{signal.Signals(sig).name} to {pid}: {e}")


def main() -> None:
    marker = sys.argv[1]
    # the driver's pid (its parent: start_new_session changes the session, not the parent), given by
    # the driver so that a driver dead before this line runs is seen as dead
    driver = int(sys.argv[2]) if len(sys.argv) > 2 else os.getppid()
    if len(sys.argv) > 3:
        _open_log(sys.argv[3])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the driver; this waits for it to end
    closed = threading.Event()

    def read() -> None:
        sys.stdin.buffer.read()  # until every holder of the pipe's write end is gone
        closed.set()

    threading.Thread(target=read, daemon=True).start()
    _log(f"watching driver {driver} (marker {marker})")
    # The pipe closes when the driver dies, unless a process forked from it (a fork keeps its fds)
    # still holds the write end: the driver's death is also seen as this process being re-parented.
    # Meanwhile the run's processes are tracked (run_processes): some lose the marker.
    known: dict[int, int] = {}
    while True:
        now = run_processes(marker, known)
        if now.keys() != known.keys():
            _log(f"tracking {len(now)}: " + "; ".join(f"+{pid} {_name(pid)}" for pid in now if pid not in known)
                 + "".join(f"; -{pid}" for pid in known if pid not in now))
        known = now
        if closed.wait(POLL_S) or os.getppid() != driver:
            break
    _log("the driver is gone: " + ("EOF on the pipe" if closed.is_set() else f"re-parented to {os.getppid()}"))
    reap(marker, known)
    _log("done")


def _open_log(path: str) -> None:
    global _LOG
    try:
        _LOG = open(path, "a", buffering=1)
    except OSError:
        _LOG = None


def _log(message: str) -> None:
    if _LOG is not None:
        try:
            _LOG.write(f"{time.strftime('%H:%M:%S')}.{int(time.time() * 1000) % 1000:03d} {message}\n")
        except OSError:
            pass


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:80]
    except OSError as e:
        return f"? ({e.strerror})"


if __name__ == "__main__":
    main()
