"""Multi-node runs, emulated on this machine with Ray's own multi-node test cluster
(`ray.cluster_utils.Cluster`: a head and two worker nodes, each its own raylet and object store,
with distinct custom resources): `placement: SPREAD` puts the DeepSpeed ranks on distinct nodes,
they meet at the address Ray reports for rank 0's node, every rank's optimizer partition is in the
checkpoint and comes back on resume; a cluster too small for `resources` is refused at once.

The same layout by hand (README, "Running on a cluster"):
    ray start --head --node-ip-address=127.0.0.1 --port=6379 --num-cpus=1 --resources='{"head": 1}'
    ray start --address=127.0.0.1:6379 --num-cpus=1 --resources='{"node_a": 1}'
    ray start --address=127.0.0.1:6379 --num-cpus=1 --resources='{"node_b": 1}'
    python -m rl.train recipes/tiny.yaml --set ray.address=127.0.0.1:6379 --set resources.placement=SPREAD \
        --set resources.learner_workers=2 ...
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rl.checkpoint import load_checkpoint
from rl.config import Recipe
from rl.metrics import read_metrics
from rl.train import ClusterTooSmall, check_cluster

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny.yaml"
MB = 2**20
SMALL = ["--set", "schedule.cold_start_steps=0", "--set", "schedule.cycles=1",
         "--set", "schedule.phases=[{stage: encoder, steps: 2}, {stage: decoder, steps: 1}]",
         "--set", "rollout.batch_size=2", "--set", "rollout.group_size=2", "--set", "pretrain.enabled=false",
         "--set", "output.progress=false", "--set", "output.plot=false", "--set", "eval.grid_images=0",
         "--set", "resources.cpus_per_actor=0.5"]


def _env() -> dict[str, str]:
    """The test process's environment without RAY_ADDRESS (a `Cluster` sets it): every run here
    names its cluster with `--set ray.address=...`, or starts its own local Ray."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"HF_HUB_OFFLINE": "1"}


def _head(**system_config):
    """A Ray test cluster's head node: one CPU, a 100 MB object store, resource `head`; Ray system
    settings (e.g. max_direct_call_object_size) as keywords."""
    from ray.cluster_utils import Cluster

    return Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 100 * MB, "resources": {"head": 1}, "include_dashboard": False,
        **({"_system_config": system_config} if system_config else {})})


def _worker(c, name: str):
    """A worker node of `c`: one CPU, a 100 MB object store, resource `name`."""
    return c.add_node(num_cpus=1, object_store_memory=100 * MB, resources={name: 1})


@pytest.fixture
def cluster():
    """Head + two worker nodes, one CPU and a 100 MB object store each; always shut down."""
    c = _head()
    try:
        for name in ("node_a", "node_b"):
            _worker(c, name)
        c.wait_for_nodes()
        yield c
    finally:
        c.shutdown()


def _train(cluster, out: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rl.train", str(TINY), "--output-dir", str(out),
           "--set", f"ray.address={cluster.address}", *SMALL, *extra]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _zero_frac(state: dict[str, torch.Tensor], prefix: str) -> float:
    flat = torch.cat([v.flatten() for k, v in state.items() if k.startswith(prefix)])
    return float((flat == 0).float().mean())


@pytest.mark.slow
def test_spread_ranks_on_two_nodes_train_checkpoint_and_resume(cluster, tmp_path):
    out = tmp_path / "run"
    ranks = ["--set", "resources.placement=SPREAD", "--set", "resources.learner_workers=2",
             "--set", "learner.zero_stage=2", "--set", "output.save_every=1"]
    proc = _train(cluster, out, *ranks, "--max-steps", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    actors = json.loads((out / "actors.json").read_text())
    alive = {n["NodeID"]: n for n in _nodes(cluster)}
    learners = sorted((a for a in actors if a["role"] == "learner"), key=lambda a: a["rank"])
    assert [a["rank"] for a in learners] == [0, 1]
    assert all(a["node_id"] in alive for a in actors)
    assert learners[0]["node_id"] != learners[1]["node_id"]  # one DeepSpeed rank per node
    assert len({a["node_id"] for a in actors}) >= 2
    # the rendezvous is the address Ray reports for rank 0's node, not a localhost assumption
    host, port = learners[0]["rendezvous"].rsplit(":", 1)
    assert host == learners[0]["ip"] == alive[learners[0]["node_id"]]["NodeManagerAddress"] and int(port) > 0
    assert learners[1]["rendezvous"] == learners[0]["rendezvous"]

    # every rank's ZeRO-2 partition of the AdamW state is in the checkpoint: with only rank 0's,
    # about half of the trained group's moments would be zeros
    c2 = load_checkpoint(str(out / "checkpoints" / "step-000002"))
    opt = c2.state["learner"]["optimizer"]
    assert _zero_frac(opt["exp_avg_sq"], "encoder.") < 0.05, _zero_frac(opt["exp_avg_sq"], "encoder.")

    # resume on the same cluster: the decoder step leaves the encoder's optimizer state alone, so the
    # next checkpoint holds it exactly as restored on both ranks
    proc = _train(cluster, out, *ranks, "--resume")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1, 2]  # every step once
    c3 = load_checkpoint(str(out / "checkpoints" / "step-000003"))
    opt3 = c3.state["learner"]["optimizer"]
    for key in ("master", "exp_avg", "exp_avg_sq"):
        for name, value in opt[key].items():
            if name.startswith("encoder."):
                assert torch.equal(opt3[key][name], value), (key, name)
    assert any(not torch.equal(opt3["master"][k], v) for k, v in opt["master"].items() if k.startswith("decoder."))


def _nodes(cluster) -> list[dict]:
    import ray

    ray.init(address=cluster.address, logging_level="ERROR")
    try:
        return [n for n in ray.nodes() if n["Alive"]]
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_spread_with_fewer_nodes_than_learner_ranks_is_refused_at_once(cluster, tmp_path):
    t0 = time.time()
    proc = _train(cluster, tmp_path / "run", "--set", "resources.placement=SPREAD", "--set",
                  "resources.learner_workers=4", "--set", "rollout.batch_size=4", "--set", "resources.cpus_per_actor=0.25",
                  timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert time.time() - t0 < 60  # the cluster is up already: the time is the driver's start and the check
    err = proc.stderr
    assert "resources.placement: SPREAD" in err and "resources.learner_workers=4" in err, err[-3000:]
    assert "3 alive node(s), 3 CPU" in err, err[-3000:]


def test_more_learner_ranks_than_the_cluster_holds_is_refused_at_once(tmp_path):
    """The real path on a local (one-node, 2-CPU) Ray: 8 ranks at 0.5 CPU do not fit."""
    t0 = time.time()
    cmd = [sys.executable, "-m", "rl.train", str(TINY), "--output-dir", str(tmp_path / "run"), *SMALL,
           "--set", "resources.learner_workers=8", "--set", "rollout.batch_size=8"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    # no placement-group wait: the error comes as soon as Ray is up (~10 s idle; Ray's own start
    # takes up to ~40 s on a loaded 2-core machine)
    assert time.time() - t0 < 90
    err = proc.stderr
    assert "resources.learner_workers=8" in err and "need 5 CPU" in err and "has 2:" in err, err[-3000:]
    assert not (tmp_path / "run" / "actors.json").exists()  # refused before any actor was made


def _node(ip: str, cpu: float, gpu: float = 0) -> dict:
    return {"NodeID": ip.replace(".", "") * 4, "NodeManagerAddress": ip, "Alive": True,
            "Resources": {"CPU": cpu, "GPU": gpu, "memory": 1e9}}


def test_check_cluster_names_the_field_and_the_cluster():
    r = Recipe.model_validate({"resources": {"learner_workers": 2, "placement": "SPREAD", "cpus_per_actor": 1,
                                             "gpus_per_actor": 1}, "rollout": {"batch_size": 4}}).resources
    kinds = ["learner", "learner", "rollout", "reward"]
    res = {"learner": {"CPU": 1, "GPU": 1}, "rollout": {"CPU": 1, "GPU": 1}, "reward": {"CPU": 1, "GPU": 0.5}}
    two_boxes = [_node("10.0.0.1", 8, 4), _node("10.0.0.2", 8, 4)]
    check_cluster(r, kinds, res, two_boxes)  # fits: two GPU boxes, one rank on each
    with pytest.raises(ClusterTooSmall, match=r"resources.placement: SPREAD .*resources.learner_workers=2 .* only 1 node"):
        check_cluster(r, kinds, res, [_node("10.0.0.1", 8, 4), _node("10.0.0.2", 8, 0)])
    with pytest.raises(ClusterTooSmall, match=r"need 3.5 GPU, but the Ray cluster has 2: 1 alive node.*10.0.0.1"):
        check_cluster(r, kinds, res, [_node("10.0.0.1", 8, 2)])
    with pytest.raises(ClusterTooSmall, match=r"one learner actor needs .* on a single node"):
        check_cluster(r, kinds, res, [_node("10.0.0.1", 8, 0.5)] * 8)


def _wait(cond, timeout: float, what: str, proc) -> None:
    deadline = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early (exit {proc.returncode}) waiting for {what}:\n"
                                 f"{proc.stdout.read()[-4000:]}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.mark.slow
def test_losing_the_node_of_the_rollout_and_reward_actors_does_not_stop_the_run(tmp_path):
    """The learner pinned to the head, the rollout and reward actors to node_b (resources.custom_resources);
    node_b is removed mid-run (its raylet and every process on it killed, its object store gone) and
    a replacement joins, as an autoscaler would bring one. Every task return lives in the object
    store of the node that made it (max_direct_call_object_size 8 KB: the ~5 KB recipe stays inline in
    the actors' creation tasks), as a large trajectory does."""
    c = _head(max_direct_call_object_size=8192)
    proc = None
    try:
        node_b = _worker(c, "node_b")
        c.wait_for_nodes()
        out, steps = tmp_path / "run", 12
        cmd = [sys.executable, "-m", "rl.train", str(TINY), "--output-dir", str(out), "--set", f"ray.address={c.address}",
               *SMALL, "--set", f"schedule.phases=[{{stage: encoder, steps: {steps // 2}}}, {{stage: decoder, steps: {steps // 2}}}]",
               "--set", "resources.custom_resources={learner: {head: 0.5}, rollout: {node_b: 0.5}, reward: {node_b: 0.5}}",
               "--set", "resources.max_restarts=3", "--set", "output.save_every=4"]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        metrics = out / "metrics.jsonl"
        _wait(lambda: len(read_metrics(metrics)) >= 2, 400, "the first steps", proc)
        actors = {(a["role"], a["index"]): a for a in json.loads((out / "actors.json").read_text())}
        b = node_b.node_id
        assert actors[("rollout", 0)]["node_id"] == actors[("reward", 0)]["node_id"] == b
        assert actors[("learner", 0)]["node_id"] != b
        c.remove_node(node_b, allow_graceful=False)
        _worker(c, "node_b")  # the replacement
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, 9)
        c.shutdown()
    assert proc.returncode == 0, output[-4000:]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(steps))  # every step once
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert {f["actor"] for f in failures} == {"rollout-0", "reward-0"}, failures  # both noticed, with node and step
    assert all(f["node"] == b and 0 <= f["step"] < steps for f in failures), failures
    moved = {(a["role"], a["index"]): a["node_id"] for a in json.loads((out / "actors.json").read_text())}
    assert moved[("rollout", 0)] not in (b, None) and moved[("reward", 0)] not in (b, None)  # on the replacement


@pytest.mark.slow
def test_losing_a_learner_node_ends_the_run_and_resume_continues_with_one_rank_fewer(tmp_path):
    """Two ZeRO-2 ranks on two nodes, checkpoints every step; the node of the rank that is not on
    the head is removed: the run ends (exit 1) naming its last complete checkpoint, which is intact,
    and `--resume` on the head alone continues with one rank, which takes the full optimizer state."""
    c = _head()
    proc = None
    out, steps = tmp_path / "run", 6
    base = [sys.executable, "-m", "rl.train", str(TINY), "--output-dir", str(out), "--set", f"ray.address={c.address}",
            *SMALL, "--set", f"schedule.phases=[{{stage: encoder, steps: {steps - 2}}}, {{stage: decoder, steps: 2}}]",
            "--set", "resources.custom_resources={rollout: {head: 0.25}, reward: {head: 0.25}}",
            "--set", "resources.placement=SPREAD", "--set", "learner.zero_stage=2", "--set", "output.save_every=1",
            "--set", "resources.cpus_per_actor=0.25"]
    env = _env()
    try:
        node_a = _worker(c, "node_a")
        c.wait_for_nodes()
        proc = subprocess.Popen([*base, "--set", "resources.learner_workers=2"], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        metrics = out / "metrics.jsonl"
        _wait(lambda: len(read_metrics(metrics)) >= 2, 400, "the first steps", proc)
        learners = [a for a in json.loads((out / "actors.json").read_text()) if a["role"] == "learner"]
        assert {a["node_id"] for a in learners} == {c.head_node.node_id, node_a.node_id}
        c.remove_node(node_a, allow_graceful=False)
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 1, output[-4000:]
        assert "learner died" in output and "last complete checkpoint: " in output, output[-4000:]
        last = output.rsplit("last complete checkpoint: ", 1)[1].split()[0].rstrip(")")
        saved = load_checkpoint(last)  # verifies every tensor: complete, not half-written
        resumed = subprocess.run([*base, "--set", "resources.learner_workers=1", "--resume"], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=600)
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, 9)
        c.shutdown()
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from {last} at step {saved.step}" in resumed.stderr
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(steps))  # every step once


@pytest.mark.slow
def test_a_trajectory_lost_with_its_node_before_the_learner_read_it_relaunches_the_step(tmp_path, monkeypatch):
    """Trainer._wait_update's ObjectLostError path. The rollout actor on node_b, the learner and the
    reward actor on the head; every task return above 8 KB lives in the object store of the node
    that made it, so a decoder step's trajectory stays on node_b (the driver reads only its captions).
    At the first decoder step, after the rollout returned and the rewards came, before any learner
    read the trajectory, node_b is removed (raylet, object store and rollout actor killed) and a
    replacement joins: the learner's update fails with an ObjectLostError, and the step is launched
    again on the restarted rollout actor instead of ending the run. The real `python -m rl.train`
    main, in this process so that the node goes at that exact point (Trainer._update)."""
    from rl import train

    c = _head(max_direct_call_object_size=8192)
    lost: list[tuple[int, int]] = []  # (step, pid of the rollout actor that was lost)
    try:
        node_b = _worker(c, "node_b")
        c.wait_for_nodes()

        class NodeLostBeforeTheUpdate(train.Trainer):
            def _update(self, stage, p, rollout, batch):
                if stage == "decoder" and not lost:  # the rollout and its rewards are in; no learner has read it
                    lost.append((p.step, self._pids[("rollout", p.rollout_actor)]))
                    c.remove_node(node_b, allow_graceful=False)
                    _worker(c, "node_b")  # the replacement, where Ray restarts the rollout actor
                return super()._update(stage, p, rollout, batch)

        monkeypatch.setattr(train, "Trainer", NodeLostBeforeTheUpdate)
        out = tmp_path / "run"
        rc = train.main([str(TINY), "--output-dir", str(out), "--set", f"ray.address={c.address}", *SMALL,
                         "--set", "schedule.phases=[{stage: encoder, steps: 1}, {stage: decoder, steps: 2}]",
                         "--set", "resources.custom_resources={learner: {head: 0.5}, rollout: {node_b: 0.5}, "
                                  "reward: {head: 0.5}}"])
    finally:
        c.shutdown()
    assert rc == 0
    assert [step for step, _ in lost] == [1]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1, 2]  # every step once
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    relaunched = [f for f in failures if "lost with its node before the learners read it" in f["error"]]
    assert [(f["step"], f["actor"], f["node"]) for f in relaunched] == [(1, "rollout-0", node_b.node_id)], failures
    assert any(f["step"] == 1 and f["error"].startswith("restarted (pid ") for f in failures), failures
    rollout = next(a for a in json.loads((out / "actors.json").read_text()) if a["role"] == "rollout")
    assert rollout["pid"] != lost[0][1] and rollout["node_id"] != node_b.node_id  # the step ran again elsewhere
