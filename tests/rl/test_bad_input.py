"""Issue #19, item 7: every bad input ends with one line naming the field, file or plugin, exit 2,
before Ray starts (rl.train's `main`, in this process: Ray must not be initialised afterwards).
Data-loading inputs (images, folders, Hub names) are tests/rl/test_data.py's."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rl.config import RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "recipes" / "tiny.yaml"
QUICK = ["--set", "pretrain.enabled=false"]


def _main(capsys, *argv, recipe=TINY):
    import ray

    from rl.train import main

    rc = main([str(recipe), *argv])
    err = capsys.readouterr().err
    assert not ray.is_initialized()
    assert "Traceback" not in err
    return rc, err


@pytest.mark.parametrize("override, field", [
    ("seed=1180591620717411303424", "seed"),  # 2**70
    ("seed=-1", "seed"),
    ("data.generate.seed=1180591620717411303424", "data.generate.seed"),
    ("data.generate.n=1000000000000", "data.generate.n"),  # 1e12
    ("data.generate.n=1000000", "data.generate"),  # within the limit, but not in this machine's memory at 1024 px
])
def test_out_of_range_numbers_name_the_field(capsys, tmp_path, override, field):
    extra = ["--set", "data.generate.size=4096"] if override == "data.generate.n=1000000" else []
    rc, err = _main(capsys, "--output-dir", str(tmp_path / "o"), "--set", override, *extra, *QUICK)
    assert rc == 2 and f"{field}" in err, err


@pytest.mark.parametrize("content, expected", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "is not UTF-8 text"),
    (TINY.read_text().encode("utf-16"), "is not UTF-8 text"),
    (b"", "the recipe is empty"),
    (b"# nothing but a comment\n\n", "the recipe is empty"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b"{a: " * 20_000 + b"1" + b"}" * 20_000, "nested too deeply"),
])
def test_bad_recipe_files_are_refused_naming_the_file(capsys, tmp_path, content, expected):
    recipe = tmp_path / "bad.yaml"
    recipe.write_bytes(content)
    rc, err = _main(capsys, "--output-dir", str(tmp_path / "o"), recipe=recipe)
    assert rc == 2 and str(recipe) in err and expected in err, err[-500:]
    assert len(err.strip().splitlines()) == 1  # one line


def test_a_utf8_recipe_with_a_bom_loads():
    text = TINY.read_text()
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bom-{os.getpid()}.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    try:
        assert load_recipe(path, check_files=False).rollout.group_size == 8
    finally:
        path.unlink()


@pytest.mark.parametrize("item, expected", [
    ("rollout.group_size=[", "--set 'rollout.group_size=[': the value is not valid YAML"),
    ("rollout.group_size=" + "[" * 5000 + "]" * 5000, "nested too deeply"),
    ("=3", "empty field name"),
    ("rollout..group_size=3", "empty field name"),
    ("rollout.group_size", "expected key.path=value"),
    ("rewards.functions.3.weight=2", "`rewards.functions` is a list of 2"),
    ("seed.x=1", "`seed` is not a section"),
    ("rollout.group_size=many", "rollout.group_size"),
])
def test_bad_set_values_are_refused(capsys, tmp_path, item, expected):
    rc, err = _main(capsys, "--output-dir", str(tmp_path / "o"), "--set", item)
    assert rc == 2 and expected in err, err[-500:]


def test_set_indexes_a_list():
    recipe = load_recipe(TINY, ["rewards.functions.0.weight=2.5"], check_files=False)
    assert recipe.rewards.functions[0].weight == 2.5


def test_output_dir_that_is_a_file_or_empty(capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    rc, err = _main(capsys, "--output-dir", str(f), *QUICK)
    assert rc == 2 and f"output.dir: {f} is a file" in err
    rc, err = _main(capsys, "--output-dir", str(f / "sub"), *QUICK)
    assert rc == 2 and f"is under {f}, which is a file" in err
    rc, err = _main(capsys, "--output-dir", "", *QUICK)
    assert rc == 2 and "output.dir" in err


def test_read_only_output_dir_fails_before_ray(capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root writes through permission bits: make the folder immutable
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(ro)]).returncode:
            pytest.skip("root without chattr +i: no read-only folder to try")
        undo = ["chattr", "-i", str(ro)]
    else:
        ro.chmod(0o555)
        undo = ["chmod", "755", str(ro)]
    try:
        t0 = time.time()
        rc, err = _main(capsys, "--output-dir", str(ro / "run"), *QUICK)
        rc2, err2 = _main(capsys, "--output-dir", str(ro), *QUICK)
    finally:
        subprocess.run(undo, check=True)
    assert rc == 2 and "output.dir: cannot write in" in err and str(ro / "run") in err, err
    assert rc2 == 2 and "output.dir: cannot write in" in err2, err2
    assert time.time() - t0 < 30  # before Ray and the models (it used to take 22 s to fail)


def _plugin(tmp_path, body: str) -> str:
    path = tmp_path / "plug.py"
    path.write_text(body + "\ndef score(prompts, completions, **kwargs):\n    return [1.0] * len(completions)\n")
    return f"{path}:score"


@pytest.mark.parametrize("body, expected", [
    ("import sys\nsys.exit(0)", "SystemExit"),
    ("raise SystemExit('bye')", "SystemExit: bye"),
    # imported in the driver itself, these ended it (and pytest with it) with no message
    ("import os\nos._exit(0)", "ended the process at import (exit status 0 without raising: os._exit?)"),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "ended the process at import (killed by signal SIGKILL)"),
])
def test_a_plugin_that_exits_at_import_is_refused(capsys, tmp_path, body, expected):
    spec = _plugin(tmp_path, body)
    rc, err = _main(capsys, "--output-dir", str(tmp_path / "o"), "--set",
                    f"rewards.functions=[{{name: clip}}, {{name: '{spec}'}}]", *QUICK)
    assert rc == 2 and "rewards.functions.1.name" in err and expected in err, err[-800:]
    assert not (tmp_path / "o").exists()  # nothing started


def test_a_plugin_that_sleeps_at_import_is_refused_within_its_deadline(capsys, tmp_path):
    spec = _plugin(tmp_path, "import time\ntime.sleep(60)")  # a daemon thread, left behind asleep
    t0 = time.time()
    rc, err = _main(capsys, "--output-dir", str(tmp_path / "o"), "--set",
                    f"rewards.functions=[{{name: '{spec}'}}]", "--set", "rewards.import_timeout_s=1", *QUICK)
    assert rc == 2 and "rewards.functions.0.name" in err and spec in err and "rewards.import_timeout_s = 1 s" in err
    assert time.time() - t0 < 20


def test_an_unreachable_ray_address_is_refused_naming_the_field(capsys, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    rc, err = _main(capsys, "--output-dir", str(tmp_path / "o"), "--set", f"ray.address=127.0.0.1:{port}", *QUICK)
    assert rc == 2 and "ray.address" in err and f"127.0.0.1:{port}" in err, err
    assert time.time() - t0 < 20
    rc, err = _main(capsys, "--output-dir", str(tmp_path / "o2"), "--set", "ray.address=ray://nowhere:x", *QUICK)
    assert rc == 2 and "ray.address" in err


def test_a_port_that_is_not_ray_times_out_within_the_deadline(tmp_path):
    """ray.init itself would retry for minutes against a port that takes connections but is no
    Ray cluster: the driver ends it at ray.connect_timeout_s with exit 2."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        port = server.getsockname()[1]
        cmd = [sys.executable, "-m", "rl.train", str(TINY), "--output-dir", str(tmp_path / "o"), *QUICK,
               "--set", f"ray.address=127.0.0.1:{port}", "--set", "ray.connect_timeout_s=3"]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=REPO, env=dict(env, HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                              timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: ray.address" in proc.stderr and "ray.connect_timeout_s = 3 s" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.time() - t0 < 60
