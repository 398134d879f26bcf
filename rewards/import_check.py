"""Import reward plugins in a child process, each under a deadline (the recipe check, issue 19).

    python -m rewards.import_check          # the child: reads {"specs": [...], "base_dir": ...} on stdin

A plugin runs arbitrary code at import. Imported in the driver itself, one that calls `os._exit`
ends the driver with that status and no message, one that sleeps can only be abandoned in a
thread. Here every plugin of a recipe is imported once by `rewards.api.validate_specs` in one
child process (the reward workers import them again later, each in its own process), which reports
on a private pipe before and after each plugin: a child that ends, or a plugin still importing
after its deadline (the child is then killed, with anything it started), is blamed on the plugin it
was importing. `check_imports` returns one message per failed plugin; the caller names the field.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

START_S = 120.0  # the child's own start (Python, torch, rewards.api) before the first plugin: not the plugin's time


def check_imports(specs: list[tuple[int, str]], base_dir: Path | str | None, timeout_s: float) -> dict[int, str]:
    """{recipe index: why} for every plugin of `specs` ((recipe index, spec) pairs) that cannot be
    imported: a spec error, an exception or `sys.exit` at import, the process ended (`os._exit`, a
    signal), or still importing after `timeout_s`. Stops at the first plugin that ends or hangs the child."""
    if not specs:
        return {}
    read_end, write_end = os.pipe()
    root = str(Path(__file__).resolve().parents[1])  # where `rewards` is, whatever the current directory
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    child = subprocess.Popen(
        [sys.executable, "-m", "rewards.import_check", str(write_end)], stdin=subprocess.PIPE, env=env, pass_fds=(write_end,), start_new_session=True)  # a session of its own: killed with what it starts
    os.close(write_end)
    events: queue.Queue = queue.Queue()

    def read() -> None:
        with os.fdopen(read_end, "r") as f:
            for line in f:
                events.put(json.loads(line))
        events.put(None)  # EOF: the child is gone

    threading.Thread(target=read, daemon=True, name="plugin import check").start()
    try:
        child.stdin.write(json.dumps({"specs": [s for _, s in specs],
                                      "base_dir": None if base_dir is None else str(base_dir)}).encode())
        child.stdin.close()
    except BrokenPipeError:  # the child is gone already: its end is reported below
        pass
    failures: dict[int, str] = {}
    current, deadline = None, time.monotonic() + START_S
    try:
        while True:
            try:
                event = events.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                if current is None:
                    return {specs[0][0]: f"the plugin check did not start within {START_S:g} s"}
                failures[specs[current][0]] = (f"reward plugin {specs[current][1]!r} was still importing after "
                                               f"rewards.import_timeout_s = {timeout_s:g} s (does it sleep, wait on the "
                                               "network or load a model at import?): make its import fast, or raise "
                                               "the limit")
                return failures
            if event is None:
                status = child.wait()
                if current is not None:
                    how = (f"killed by signal {signal.Signals(-status).name}" if status < 0
                           else f"exit status {status} without raising: os._exit?")
                    failures[specs[current][0]] = (f"reward plugin {specs[current][1]!r} ended the process at import "
                                                   f"({how})")
                elif status != 0:
                    failures[specs[0][0]] = f"the plugin check failed to start (exit status {status})"
                return failures
            if "start" in event:
                current, deadline = event["start"], time.monotonic() + timeout_s
            else:
                if event.get("error"):
                    failures[specs[event["index"]][0]] = event["error"]
                current, deadline = None, time.monotonic() + START_S
    finally:
        if child.poll() is None:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except OSError:
                pass
            child.wait()


def _main() -> None:
    report = os.fdopen(int(sys.argv[1]), "w", buffering=1)
    request = json.loads(sys.stdin.read())
    from rewards.api import RewardSpecError, validate_specs

    for index, spec in enumerate(request["specs"]):
        report.write(json.dumps({"start": index}) + "\n")
        error = None
        try:
            validate_specs([spec], base_dir=request["base_dir"])
        except RewardSpecError as e:
            error = str(e)
        except SystemExit as e:
            error = f"reward plugin {spec!r} called sys.exit({e.code!r}) at import"
        except BaseException as e:  # noqa: BLE001 - any failure at import is the plugin's
            error = f"reward plugin {spec!r} failed to load: {type(e).__name__}: {e}"
        report.write(json.dumps({"index": index, "error": error}) + "\n")
    report.close()
    os._exit(0)  # a plugin's non-daemon threads or atexit hooks must not hold the check


if __name__ == "__main__":
    _main()
