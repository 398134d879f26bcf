"""Unified-GRPO training driver (single controller).

    python -m rl.train recipes/tiny.yaml                       # embedded default: tiny models, local Ray, CPU
    python -m rl.train recipes/tiny.yaml --max-steps 3 --set rollout.group_size=2
    python -m rl.train recipes/tiny.yaml --resume               # continue from runs/tiny/checkpoints/
    python -m rl.train recipes/tiny.yaml --overwrite            # start anew; runs/tiny moves to runs/tiny.old-<time>
    python -m rl.export runs/tiny/checkpoints/step-000019 exported/   # peft + diffusers folders
    ray job submit --working-dir . -- python -m rl.train recipes/unified_grpo.yaml

The driver owns the schedule, the step counter, logging and checkpoints; Ray actors own the
models (rollout workers, reward workers, the DeepSpeed learner). One step of each stage:

    warmup      cached long captions of the frozen encoder -> learner: flow matching  UAE sec. 2.2
    cold_start  captions (no grad) -> learner: 1 - cos(f_I(x), f_I(D(E(x))))          UAE eq. 3
    encoder     G captions/image -> frozen-decoder renders -> CLIP reward -> GRPO     UAE eq. 2
    decoder     1 caption/image -> G SDE trajectories -> CLIP reward -> GRPO per step UAE eq. 4

after which the learner's LoRA weights (and connector) go to the rollout workers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rewards.api import RewardPluginError
from rewards.references import ReferencesError
from rl import grpo
from rl.checkpoint import CheckpointError
from rl.config import Recipe, RecipeError, load_recipe
from rl.data import DataError
from rl.metrics import completions_table, reward_stats

log = logging.getLogger("unified_grpo")


class Trainer:
    """setup() -> train() -> save_checkpoint() -> cleanup(), torchtune's recipe shape."""

    def __init__(self, recipe: Recipe, recipe_dir: str | None = None):
        self.recipe = recipe
        self.recipe_dir = recipe_dir
        self.out_dir = recipe.output.dir
        self.step = 0
        self.stages = recipe.stages()
        self.version = 0
        self.data_position = 0  # records consumed so far (rl.data.BatchIterator.position)
        self.last_metrics: dict[str, dict[str, Any]] = {}  # newest numeric row per stage, for model cards
        self.checkpoint_root = os.path.join(self.out_dir, "checkpoints")
        self.checkpoint_path: str | None = None  # the newest checkpoint this run wrote or resumed
        self._saved_step: int | None = None
        self._resume_from = None

    # ------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------
    def setup(self) -> None:
        from rl.checkpoint import seed_rng

        seed_rng(self.recipe.seed)  # a resume restores the driver's RNG over this
        self._setup_output_dir()  # first: a refused directory fails before anything is built or written
        self._check_ray_address()  # a cluster that does not answer fails before models or data are built
        self._setup_pretrained()  # before anything reads models.*.path (checkpoints compare them too)
        self._resume_from = self._find_checkpoint()  # before Ray: a refused resume fails at once
        self._setup_data()
        self._setup_references()  # judge reference elements: checked (and extracted) before Ray starts
        self._setup_ray()
        self._setup_actors()
        if self._resume_from is not None:
            self._load_checkpoint(self._resume_from)
        self._setup_logging()

    def _setup_output_dir(self) -> None:
        """One run per output directory. A directory an earlier run used (metrics.jsonl or
        checkpoints/ in it) is continued with `--resume`, moved aside to `<dir>.old-<UTC time>` with
        `--overwrite` (never deleted), and refused otherwise: two runs' checkpoints, metrics rows
        and TensorBoard events would mix."""
        out, o = self.out_dir, self.recipe.output
        if o.resume != "auto" and used_output_dir(out):
            if not o.overwrite:
                raise OutputDirInUse(
                    f"output directory {out} holds an earlier run (metrics.jsonl or checkpoints/). Pass --resume "
                    f"to continue it, --overwrite to move it aside to {out}.old-<timestamp> and start anew, or "
                    f"--output-dir for a new directory")
            base = f"{os.path.normpath(out)}.old-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
            aside, n = base, 1
            while os.path.exists(aside):  # two overwrites within a second
                aside, n = f"{base}-{n}", n + 1
            try:
                os.rename(out, aside)
            except OSError as e:
                raise OutputDirError(f"output.dir: --overwrite could not move {out} aside to {aside}: "
                                     f"{e.strerror or e}") from None
            log.warning("--overwrite: moved the earlier run in %s aside to %s", out, aside)
        try:  # create it and write a file there now, rather than fail after Ray and the models are up
            os.makedirs(out, exist_ok=True)
            with tempfile.TemporaryFile(dir=out):
                pass
        except OSError as e:
            raise OutputDirError(f"output.dir: cannot write in {out!r}: {e.strerror or e}; pass --output-dir with "
                                 "a folder you can write to") from None

    def _check_ray_address(self) -> None:
        """A `host:port` or `ray://host:port` cluster address must take a TCP connection within
        `ray.connect_timeout_s` (ray.init would retry for minutes, silently)."""
        r = self.recipe.ray
        if r.address in ("local", "auto"):
            return
        host, port = _host_port(r.address)
        try:
            socket.create_connection((host, port), timeout=r.connect_timeout_s).close()
        except OSError as e:
            why = "timed out" if isinstance(e, socket.timeout) else (e.strerror or str(e))
            raise ClusterUnreachable(f"ray.address: no Ray cluster at {r.address!r} ({host} port {port}: {why}, "
                                     f"ray.connect_timeout_s = {r.connect_timeout_s:g} s); start one there "
                                     "(`ray start --head`), fix the address, or use ray.address: local") from None

    def _setup_pretrained(self) -> None:
        """`pretrain.enabled`: the recipe's `pretrain.provider` points every unset `models` path at its
        pretrained models (`shapes`: the shipped shapes-world models, sha256-checked, when the
        pretraining settings are the shipped ones, else built into the cache; rl/shapes/)."""
        if not self.recipe.pretrain.enabled:
            return
        from rl.config import PRETRAIN_PROVIDERS
        from rl.named import UnknownName, resolve

        t0 = time.time()
        try:
            provide = resolve(self.recipe.pretrain.provider, PRETRAIN_PROVIDERS, "pretrain.provider")
            # shapes: a shipped file that differs from its manifest is a ValueError (ShippedModelError)
            info = provide(self.recipe) or {}
        except (UnknownName, ValueError) as e:  # before Ray and any model
            raise BadInput(str(e)) from None
        m = self.recipe.models
        log.info("pretrained shapes-world models ready in %.0f s (their training: %s): encoder %s, decoder %s, clip %s",
                 time.time() - t0, ", ".join(f"{k} {v.get('seconds', 0):.0f} s" for k, v in info.items()),
                 m.encoder.path, m.decoder.path, m.clip.checkpoint)

    def _setup_data(self) -> None:
        from rl.data import load_dataset_from_config

        d = self.recipe.data
        self.dataset = load_dataset_from_config(
            d.source, image_column=d.image_column, split=d.split, limit=d.limit,
            image_size=self.recipe.models.decoder.image_size, generate=d.generate.model_dump(),
            reference_column=d.reference_column, on_bad_image=d.on_bad_image, generator=d.generator,
        )
        log.info("data: %d images from %s", len(self.dataset), d.source or f"the generated world {d.generator!r}")

    def _setup_references(self) -> None:
        """The judge reward's reference elements on every record (rewards/references.py): refused with
        a message naming the field when a record has none; an unreachable judge endpoint ends the run
        here, before any actor starts."""
        from rewards.references import attach_references

        info = attach_references(self.recipe, self.dataset.records)
        if info:
            log.info("judge references: %s", info)

    def _setup_ray(self) -> None:
        import ray

        r = self.recipe.ray
        address = r.address
        if address == "local" and os.environ.get("RAY_ADDRESS"):
            address = "auto"  # launched by `ray job submit`: join that cluster
        if ray.is_initialized():
            return
        env = {"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
                            "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}}
        if address == "local":
            from rl import reaper

            # every process of this Ray inherits a marker; a watcher stops them when this process
            # ends, even by SIGKILL (rl/reaper.py)
            with reaper.watched(os.path.join(self.out_dir, "reaper.log")) as self._reaper:
                # address "local": a new Ray of our own even when `ray start` left one on this machine
                ray.init(address="local", num_cpus=r.num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                         runtime_env=env, logging_level=logging.WARNING, log_to_driver=True)
            return
        # Under `ray job submit` the job's runtime_env (working_dir, env_vars) already applies;
        # passing another one here would conflict with it.
        done = threading.Event()

        def watchdog() -> None:  # ray.init retries an address that takes TCP but is no Ray cluster for minutes
            if not done.wait(r.connect_timeout_s):
                print(f"error: ray.address: {address!r} took a connection but did not answer as a Ray cluster within "
                      f"ray.connect_timeout_s = {r.connect_timeout_s:g} s (a wrong port?)", file=sys.stderr, flush=True)
                os._exit(2)  # nothing is written yet; Ray's own threads would not let the process exit otherwise

        threading.Thread(target=watchdog, daemon=True, name="ray.init watchdog").start()
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except ConnectionError as e:  # address auto and no cluster running
            raise ClusterUnreachable(f"ray.address: {address!r}: {e}") from None
        finally:
            done.set()

    def _setup_actors(self) -> None:
        """Learner ranks, rollout and reward actors, in one placement group (`resources`)."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from rewards.actors import RewardWorker
        from rl.learner import LearnerWorker
        from rollouts.actors import RolloutWorker

        r = self.recipe.resources
        n_rollout = 0 if r.colocate else r.rollout_workers
        kinds = ["learner"] * r.learner_workers + ["rollout"] * n_rollout + ["reward"] * r.reward_workers
        res = {"learner": _bundle(r.cpus_per_actor, r.gpus_per_actor), "rollout": _bundle(r.cpus_per_actor, r.gpus_per_actor),
               "reward": _bundle(r.cpus_per_actor, r.gpus_per_actor / 2)}
        for kind, extra in r.custom_resources.items():  # pins a role to nodes started with these resources
            res[kind] = {**res[kind], **extra}
        # before any placement group or actor: a cluster that cannot hold the run is an error now, not a hang
        check_cluster(r, kinds, res, [n for n in ray.nodes() if n.get("Alive")])
        self.placement_group = None
        slots: list[tuple[Any, int]] = [(None, 0)] * len(kinds)  # (placement group, bundle index) per actor
        if r.placement != "none":
            # SPREAD: the DeepSpeed ranks on distinct nodes (STRICT_SPREAD, one rank per machine as with
            # GPU boxes), the rollout and reward actors spread over the nodes as best Ray can (SPREAD).
            n_learn = r.learner_workers
            groups = ([(list(range(n_learn)), "STRICT_SPREAD" if n_learn > 1 else "SPREAD"),
                       (list(range(n_learn, len(kinds))), "SPREAD")]
                      if r.placement == "SPREAD" else [(list(range(len(kinds))), r.placement)])
            self.placement_groups = [_place([res[kinds[i]] for i in idx], strategy, kinds, res, r.placement)
                                     for idx, strategy in groups]
            self.placement_group = self.placement_groups[0]
            slots = [(pg, j) for (idx, _), pg in zip(groups, self.placement_groups) for j, _ in enumerate(idx)]

        def opts(i: int, kind: str, **extra: Any) -> dict[str, Any]:
            o = {"num_cpus": res[kind].get("CPU", 0), "num_gpus": res[kind].get("GPU", 0), **extra}
            pg, index = slots[i]
            if pg is not None:
                o["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)
            elif r.custom_resources.get(kind):
                o["resources"] = r.custom_resources[kind]
            return o

        # step 1. the learner group: DeepSpeed ranks meet at rank 0's node (its address as Ray knows it,
        # never a localhost assumption) on a port free there
        self.rendezvous = addr, port = ray.get(ray.remote(_rendezvous_fn).options(
            **{k: v for k, v in opts(0, "learner").items() if k == "scheduling_strategy"}, num_cpus=0).remote())
        self.learners = [
            ray.remote(LearnerWorker).options(**opts(i, "learner")).remote(
                self.recipe, r.colocate and i == 0, i, r.learner_workers, port, addr)
            for i in range(r.learner_workers)
        ]
        self.learner = self.learners[0]
        # step 2. rollout and reward actors restart when they die; the driver retries their step
        restart = {"max_restarts": r.max_restarts, "max_task_retries": 0}
        base = r.learner_workers
        self.rollouts = [ray.remote(RolloutWorker).options(**opts(base + j, "rollout", **restart)).remote(self.recipe)
                         for j in range(n_rollout)]
        base += n_rollout
        self.rewards = [ray.remote(RewardWorker).options(**opts(base + k, "reward", **restart)).remote(self.recipe, self.recipe_dir)
                        for k in range(r.reward_workers)]
        self._wait_ready([("learner", self.learners), ("rollout", self.rollouts), ("reward", self.rewards)])
        self.failures: list[dict[str, Any]] = []
        self._write_actors()
        self._sync_weights(self._wait_learners([self.learner.version.remote()], "version")[0])  # identical adapters before the first rollout

    def _wait_ready(self, groups: list[tuple[str, list[Any]]]) -> None:
        """Every actor built its models, within `resources.start_timeout_s` (an actor that cannot be
        placed or hangs in its constructor would otherwise block here forever)."""
        import ray

        refs = {a.ready.remote(): f"{role} actor {i}" for role, actors in groups for i, a in enumerate(actors)}
        timeout = self.recipe.resources.start_timeout_s
        ready, waiting = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        ray.get(ready)  # an actor whose constructor raised raises here
        if waiting:
            raise StepTimeout(f"{', '.join(refs[w] for w in waiting)} not started within resources.start_timeout_s = "
                              f"{timeout:g} s (resources this cluster lacks, or a model that takes longer to load?)")

    def _write_actors(self) -> None:
        """`actors.json` in the output directory: each actor's role, index, learner rank, process id,
        Ray node id and node IP (and the learners' DeepSpeed rendezvous), rewritten when one restarts."""
        import json

        import ray

        rows = [(role, i, a) for role, actors in (("learner", self.learners), ("rollout", self.rollouts),
                                                   ("reward", self.rewards)) for i, a in enumerate(actors)]
        where = ray.get([a.__ray_call__.remote(_whereabouts) for _, _, a in rows])
        table = [{"role": role, "index": i, "rank": i if role == "learner" else None, "pid": pid, "node_id": node,
                  "ip": ip, **({"rendezvous": "%s:%d" % self.rendezvous} if role == "learner" else {})}
                 for (role, i, _), (pid, node, ip) in zip(rows, where)]
        if not getattr(self, "_pids", None):  # later only _check_restarted moves an actor's pid and node on:
            # another actor restarted meanwhile must still be noticed (and re-synced) when next used
            self._pids = {(t["role"], t["index"]): t["pid"] for t in table}
            self._nodes = {(t["role"], t["index"]): t["node_id"] for t in table}
        with open(os.path.join(self.out_dir, "actors.json.tmp"), "w") as f:
            json.dump(table, f, indent=1)
        os.replace(os.path.join(self.out_dir, "actors.json.tmp"), os.path.join(self.out_dir, "actors.json"))

    def _log_failure(self, step: int, role: str, index: int, error: str, attempt: int = 1) -> None:
        event = {"step": step, "actor": f"{role}-{index}", "node": getattr(self, "_nodes", {}).get((role, index)),
                 "error": error, "attempt": attempt}
        self.failures.append(event)
        with open(os.path.join(self.out_dir, "failures.jsonl"), "a") as f:
            f.write(json.dumps(event) + "\n")
        log.warning("step %d: %s actor %d (node %s): %s", step, role, index, event["node"], error)

    def _check_restarted(self, step: int, role: str, index: int) -> bool:
        """An actor that died between calls comes back from Ray with fresh (base) weights: notice
        it by its process id, log it (with the node it was on), and give a rollout actor the last
        synced weights. True when it restarted (the caller rewrites actors.json once all are checked)."""
        import ray

        actor = self.rollouts[index] if role == "rollout" else self.rewards[index]
        deadline = time.time() + 600
        while True:  # while Ray restarts it the actor answers "unavailable" for a while
            try:
                pid = ray.get(actor.pid.remote(), timeout=600)
                break
            except ray.exceptions.ActorUnavailableError:
                if time.time() > deadline:
                    raise
                time.sleep(1.0)
        if pid != self._pids.get((role, index)):
            self._log_failure(step, role, index, f"restarted (pid {self._pids.get((role, index))} -> {pid})")
            if role == "rollout":
                ray.get(actor.set_weights.remote(self._state_ref, self.version))
            self._pids[(role, index)] = pid
            self._nodes[(role, index)] = ray.get(actor.__ray_call__.remote(_whereabouts))[1]
            return True
        return False

    def _setup_logging(self) -> None:
        from rl.metrics import MetricsLogger

        self.metrics = MetricsLogger(self.out_dir, tensorboard=self.recipe.output.tensorboard,
                                     wandb_project=self.recipe.output.wandb_project,
                                     config=self.recipe.model_dump(mode="json"),
                                     purge_step=self.step if self.recipe.output.resume == "auto" else None)

    def _find_checkpoint(self):
        """The checkpoint to resume from (`output.resume: auto`), read and checked, or None."""
        from rl import checkpoint as ckpt

        if self.recipe.output.resume != "auto":
            return None  # _setup_output_dir refused (or moved aside) a directory with checkpoints
        path, skipped = ckpt.find_latest(self.checkpoint_root)
        for bad, reason in skipped:
            log.warning("resume: ignoring incomplete checkpoint %s: %s", bad, reason)
        if path is None:
            dropped = _truncate_metrics(os.path.join(self.out_dir, "metrics.jsonl"), 0)
            _truncate_metrics(os.path.join(self.out_dir, "completions.jsonl"), 0)
            log.info("resume: no complete checkpoint in %s; starting at step 0 (dropped %d metrics rows of the "
                     "earlier attempt)", self.checkpoint_root, dropped)
            return None
        c = ckpt.load_checkpoint(path, verify=False)  # find_latest just verified it
        current = self.recipe.model_dump(mode="json")
        try:  # through today's schema, so that fields added since (with defaults) compare equal
            saved = Recipe.model_validate(c.recipe).model_dump(mode="json")
        except ValueError:
            saved = c.recipe
        ckpt.check_models_match(saved, current, path)
        other = [d for d in ckpt.recipe_differences(saved, current)
                 if not d.startswith(("models", "output", "max_steps"))]
        if other:
            log.warning("resume: the recipe differs from the checkpoint's in %s", ", ".join(other))
        now = ckpt.schedule_position(self._full_schedule(), c.step)
        if now != c.trainer.get("schedule"):
            log.warning("resume: the schedule changed: step %d was %s in the checkpoint's run, is %s now",
                        c.step, c.trainer.get("schedule"), now)
        return c

    def _full_schedule(self) -> list[str]:
        """Every step's stage, max_steps aside: a run stopped by --max-steps and resumed with a
        larger one is at the same place in it."""
        return self.recipe.model_copy(update={"max_steps": None}).stages()

    def _load_checkpoint(self, c) -> None:
        """Learner state, then weights to the rollout workers, then the driver's own state."""
        import ray

        from rl.checkpoint import restore_rng

        t0 = time.time()
        state = ray.put({"weights": c.weights, **c.state["learner"]})  # one copy for every rank
        version = self._learners("load_state_dict", state)[0]
        self._sync_weights(version)  # rollout workers must act with the restored adapters
        self.step = c.step
        self.data_position = int(c.trainer["data_position"])
        self.last_metrics = c.trainer.get("metrics", {})
        self.checkpoint_path, self._saved_step = c.path, c.step
        dropped = _truncate_metrics(os.path.join(self.out_dir, "metrics.jsonl"), c.step)
        _truncate_metrics(os.path.join(self.out_dir, "completions.jsonl"), c.step)
        restore_rng(c.state["driver"]["rng"])
        log.info("resumed from %s at step %d (%s); dropped %d metrics rows of later steps; %.1f s",
                 c.path, c.step, c.trainer["schedule"], dropped, time.time() - t0)

    # ------------------------------------------------------------------------------------------
    # plumbing
    # ------------------------------------------------------------------------------------------
    def _sync_weights(self, version: int) -> None:
        """LoRA weights (and connector) of learner `version` from rank 0 to every rollout worker,
        once via the object store. The reference is kept: a restarted rollout actor gets the same
        weights."""
        import ray

        self.version = version
        self._state_ref = self.learner.trainable_state.remote() if self.rollouts else None
        if self.rollouts:
            refs = [a.set_weights.remote(self._state_ref, self.version) for a in self.rollouts]
            timeout = 2 * self.recipe.rollout.timeout_s  # queued behind a rollout in flight (async_rollouts)
            for index, ref in enumerate(refs):
                try:
                    ray.get(ref, timeout=timeout)
                except ray.exceptions.GetTimeoutError:
                    raise StepTimeout(f"step {self.step}: rollout actor {index} took no weights (version {version}) "
                                      f"within 2 x rollout.timeout_s = {timeout:g} s; last complete checkpoint: "
                                      f"{self.checkpoint_path or 'none'}") from None
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                    # Died (or restarting) mid-sync: Ray restarts it, and its next launch notices the
                    # new process (_check_restarted) and hands it this same `_state_ref`.
                    self._log_failure(self.step, "rollout", index, f"{type(e).__name__} during the weight sync "
                                      f"of version {self.version}; re-synced when it is next used")

    def _learners(self, method: str, *args: Any) -> list[Any]:
        """Call every learner rank and wait; a dead learner ends the run (the last checkpoint stays)."""
        return self._wait_learners([getattr(w, method).remote(*args) for w in self.learners], method)

    def _advantages(self, batch) -> grpo.Advantages:
        g = self.recipe.grpo
        # The decoder stage may scale its own way (Flow-GRPO's batch population std).
        decoder_stage = self.stages[self.step] == "decoder" and g.decoder.advantage_scale is not None
        scale = g.decoder.advantage_scale if decoder_stage else g.scale
        return grpo.combine_rewards(batch.matrix, batch.weights, self.recipe.rollout.group_size,
                                    mode=g.reward_combine, scale=scale, clip=g.adv_clip)

    # ------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------
    def train(self) -> None:
        batches = self.dataset.batches(self.recipe.rollout.batch_size, self.recipe.seed, start=self.data_position)
        overlap = self.recipe.resources.async_rollouts == 1
        total = len(self.stages)
        pending = self._launch(self.step, next(batches), batches.position) if self.step < total else None
        bar, bar_stage = None, None
        while self.step < total:
            stage = self.stages[self.step]
            if stage != bar_stage:  # one progress bar per phase
                bar, bar_stage = self._progress(bar, stage), stage
            t0 = time.time()
            # step 1-2. rollouts and rewards of this step (launched earlier when overlapping)
            rollout, batch = self._collect(pending)
            waited = time.time() - t0  # the learner is idle until its batch is here
            # step 3-4. advantages, then the update on every learner rank (not waited on yet)
            train_refs, extras = self._update(stage, pending, rollout, batch)
            following = None
            if overlap and self.step + 1 < total:
                # rollouts of step t+1 with the weights of step t, while the learner trains step t
                following = self._launch(self.step + 1, next(batches), batches.position)
            stats, extras = self._wait_update(stage, pending, train_refs, extras)
            # step 5. LoRA weights to the rollout workers (queued after any rollout in flight)
            self._sync_weights(stats[0]["version"])
            if not overlap and self.step + 1 < total:
                following = self._launch(self.step + 1, next(batches), batches.position)
            row = self._row(stage, stats, extras)
            row = {"step": self.step, "stage": stage, **row, "learner_wait": round(waited, 4),
                   "seconds": round(time.time() - t0, 4)}
            self.metrics.log(row)
            self._log_completions(stage, extras)
            # timings differ from run to run: keep them out of what checkpoints and model cards hold
            self.last_metrics[stage] = {k: v for k, v in row.items()
                                        if isinstance(v, (int, float)) and k not in ("seconds", "learner_wait")}
            self.data_position = pending.position
            self.step += 1
            pending = following
            if bar is not None:
                bar.set_postfix(reward=f"{row.get('reward_mean', float('nan')):.4f}", loss=f"{row['loss']:.4f}",
                                s=f"{row['seconds']:.1f}")
                bar.update(1)
            if self.recipe.output.save_every and self.step % self.recipe.output.save_every == 0:
                self.save_checkpoint()
        if bar is not None:
            bar.close()

    def _progress(self, bar, stage: str):
        from tqdm import tqdm

        if bar is not None:
            bar.close()
        n = 0
        while self.step + n < len(self.stages) and self.stages[self.step + n] == stage:
            n += 1
        return tqdm(total=n, desc=f"{stage:10s}", disable=not self.recipe.output.progress, dynamic_ncols=True,
                    file=sys.stderr, unit="step")

    def _seed(self, step: int) -> int:
        return self.recipe.seed * 1_000_003 + step

    def _launch(self, step: int, records, position: int) -> "_Pending":
        """Start the rollout of `step` and, chained on its result inside Ray, its rewards."""
        stage = self.stages[step]
        images, ids = [r.image for r in records], [r.image_id for r in records]
        p = _Pending(step=step, records=records, position=position,
                     rollout_actor=None if not self.rollouts else step % len(self.rollouts),
                     reward_actor=step % len(self.rewards))
        restarted = p.rollout_actor is not None and self._check_restarted(step, "rollout", p.rollout_actor)
        if self._check_restarted(step, "reward", p.reward_actor) or restarted:
            self._write_actors()  # after both checks: actors.json shows where every actor runs now
        seed = self._seed(step)
        if stage == "warmup":  # captions from the disk cache; missing ones written by the frozen encoder now
            import ray

            from rl.warmup import CaptionCache, cache_dir, cached_captions

            def caption(missing_images):
                return ray.get(self._rollout_remote(p.rollout_actor, "warmup_captions", 1, missing_images, seed))

            captions, new = cached_captions(CaptionCache(cache_dir(self.recipe)), ids, images, caption)
            p.warmup_new = new
            p.rollout_ref = [ray.put(captions)]
            p.driver_ref = p.rollout_ref[0]
            return p
        # One ObjectRef per returned item, so that each consumer gets only what it reads: the
        # reward actor the captions and renders, the learners the trajectory or caption group,
        # the driver the captions (a trajectory never passes through the driver).
        if stage == "cold_start":
            p.rollout_ref = [self._rollout_remote(p.rollout_actor, "cold_start_rollout", 1, images, seed)]
            p.driver_ref = p.rollout_ref[0]
            return p
        if stage == "encoder":  # (group, renders)
            p.rollout_ref = self._rollout_remote(p.rollout_actor, "encoder_rollout", 2, images, ids, seed,
                                                 self.recipe.rewards.renders_needed())
            captions, renders = p.rollout_ref
            p.driver_ref = p.rollout_ref[0]
        else:  # (trajectory, one caption per image, renders)
            p.rollout_ref = self._rollout_remote(p.rollout_actor, "decoder_rollout", 3, images, seed)
            captions, renders = p.rollout_ref[1:]
            p.driver_ref = captions
        p.reward_ref = self.rewards[p.reward_actor].score_rollout.remote(
            stage, captions, renders, ids, images, [r.elements for r in records], step, _columns(records))
        return p

    def _rollout_remote(self, index: int | None, method: str, num_returns: int, *args: Any):
        """`method` of rollout actor `index`, or of the rollout worker inside learner rank 0 (None):
        one ObjectRef, or a list of `num_returns` > 1 (one per item of the returned tuple)."""
        if index is None:
            return self.learner.rollout_call.options(num_returns=num_returns).remote(method, *args)
        return getattr(self.rollouts[index], method).options(num_returns=num_returns).remote(*args)

    def _collect(self, p: "_Pending"):
        """(rollout, reward batch) of a launched step. A rollout or reward actor that died is
        restarted by Ray; the step is then launched again with the last synced weights."""
        import ray

        timeouts = {"rollout": (self.recipe.rollout.timeout_s, "rollout.timeout_s"),
                    "reward": (len(self.recipe.rewards.functions) * self.recipe.rewards.timeout_s + 60,
                               f"{len(self.recipe.rewards.functions)} x rewards.timeout_s + 60 s")}
        last = ""
        for attempt in range(self.recipe.resources.max_restarts + 1):
            role, index = "rollout", p.rollout_actor
            try:
                rollout = ray.get(p.driver_ref, timeout=timeouts["rollout"][0])
                role, index = "reward", p.reward_actor
                batch = ray.get(p.reward_ref, timeout=timeouts["reward"][0]) if p.reward_ref is not None else None
                return rollout, batch
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                    ray.exceptions.ObjectLostError,  # lost: its node died after the rollout returned
                    ray.exceptions.GetTimeoutError) as e:
                hung = isinstance(e, ray.exceptions.GetTimeoutError)
                what = (f"no {self.stages[p.step]} {role} within {timeouts[role][0]:g} s ({timeouts[role][1]})"
                        if hung else type(e).__name__)
                if role == "rollout" and index is None:  # colocated: the rollout ran in the learner
                    raise (StepTimeout if hung else LearnerDied)(
                        f"the learner (hosting rollouts) at step {p.step}: {'died' if not hung else what}; last "
                        f"complete checkpoint: {self.checkpoint_path or 'none'}") from None
                last = f"{role} actor {index}: {what}"
                self._log_failure(p.step, role, index, f"{what}; retrying the step with weights "
                                  f"version {self.version}", attempt + 1)
                if hung:  # taken for dead: Ray restarts it (max_restarts) and the step is launched again
                    actor = self.rollouts[index] if role == "rollout" else self.rewards[index]
                    ray.kill(actor, no_restart=False)
                _drain([*p.rollout_ref, p.reward_ref])
                try:  # _launch waits for the restart and re-syncs the restarted rollout actor
                    retry = self._launch(p.step, p.records, p.position)
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e2:
                    raise StepFailed(f"step {p.step}: {last}; the actor did not come back ({type(e2).__name__}; "
                                     f"resources.max_restarts = {self.recipe.resources.max_restarts}); last "
                                     f"complete checkpoint: {self.checkpoint_path or 'none'}") from None
                p.rollout_ref, p.driver_ref, p.reward_ref = retry.rollout_ref, retry.driver_ref, retry.reward_ref
        raise StepFailed(f"step {p.step}: failed {self.recipe.resources.max_restarts + 1} times "
                         f"(resources.max_restarts = {self.recipe.resources.max_restarts}); last: {last}; last "
                         f"complete checkpoint: {self.checkpoint_path or 'none'}")

    def _update(self, stage: str, p: "_Pending", rollout, batch):
        """Advantages (UAE eq. 1) and the learner call of this stage; returns (refs, row extras)."""
        from rollouts.actors import image_seed

        if stage == "warmup":  # rollout: the captions; noise per image and step
            ids = [r.image_id for r in p.records]
            seeds = [self._seed(p.step) * 7919 + image_seed(i) for i in ids]
            return (self._train_refs(stage, [r.image for r in p.records], rollout, seeds),
                    {"captions": rollout, "captioned": p.warmup_new})
        if stage == "cold_start":
            ids = [r.image_id for r in p.records]
            args = ([r.image for r in p.records], ids, rollout.completion_ids, rollout.completion_mask,
                    [image_seed(i) for i in ids])
            return self._train_refs(stage, *args), {"captions": rollout.captions}
        adv = self._advantages(batch)
        captions = rollout.captions if stage == "encoder" else rollout
        ref = p.rollout_ref[0]  # the group or trajectory, already in the object store: one copy for every rank
        return self._train_refs(stage, ref, adv.advantages, adv.valid), {"batch": batch, "adv": adv, "captions": captions,
                                                                          "image_ids": [r.image_id for r in p.records]}

    def _log_completions(self, stage: str, extras: dict[str, Any]) -> None:
        """The completions table of an encoder step, every output.log_completions_every steps."""
        every = self.recipe.output.log_completions_every
        if stage != "encoder" or not every or self.step % every:
            return
        self.metrics.log_completions(completions_table(
            self.step, extras["image_ids"], extras["captions"], self.recipe.rollout.group_size,
            extras["batch"].per_reward, extras["adv"].advantages.tolist(), self.recipe.output.num_completions_to_log))

    def _wait_update(self, stage: str, p: "_Pending", refs: list[Any], extras: dict[str, Any]):
        """(learner statistics, row extras) of step `p`. The rollout the learners read lives in the
        object store of the rollout actor's node: when that node died before every rank fetched it
        (ObjectLostError), no rank trained, and the step is launched again (a restarted rollout actor
        takes the last synced weights) instead of ending the run."""
        import ray

        for attempt in range(self.recipe.resources.max_restarts + 1):
            try:
                return self._wait_learners(refs, f"the {stage} update"), extras
            except ray.exceptions.ObjectLostError as e:
                ray.wait(refs, num_returns=len(refs), timeout=60)  # let every rank's call end first
                self._log_failure(p.step, "rollout", p.rollout_actor, f"{type(e).__name__}: the step's rollout was "
                                  f"lost with its node before the learners read it; launching the step again",
                                  attempt + 1)
                retry = self._launch(p.step, p.records, p.position)
                p.rollout_ref, p.driver_ref, p.reward_ref = retry.rollout_ref, retry.driver_ref, retry.reward_ref
                refs, extras = self._update(stage, p, *self._collect(p))
        raise RuntimeError(f"step {p.step}: the rollout was lost {self.recipe.resources.max_restarts + 1} times")

    def _train_refs(self, stage: str, *args: Any) -> list[Any]:
        return [w.train.remote(stage, *args) for w in self.learners]

    def _wait_learners(self, refs: list[Any], what: str) -> list[Any]:
        """The results of one call (`what`) on learner ranks 0..len(refs)-1, within `learner.timeout_s`."""
        import ray

        timeout = self.recipe.learner.timeout_s
        try:
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            busy = [rank for rank, ref in enumerate(refs) if ref not in ready]
            raise StepTimeout(f"step {self.step}: learner rank(s) {busy} did not finish {what} within learner.timeout_s "
                              f"= {timeout:g} s; last complete checkpoint: {self.checkpoint_path or 'none'}") from None
        except ray.exceptions.RayActorError as e:
            raise LearnerDied(f"the learner died at step {self.step} ({type(e).__name__}); last complete "
                              f"checkpoint: {self.checkpoint_path or 'none'}") from None
        except ray.exceptions.RayTaskError as e:
            # A rank that died (with its node) first fails the others' collectives (gloo/NCCL "connection
            # reset"): report the dead rank, not the survivors' error.
            dead = _dead_ranks(refs)
            if not dead:
                raise
            cause = str(getattr(e, "cause", e)).splitlines()[0][:200]
            raise LearnerDied(f"the learner died at step {self.step}: rank(s) {dead} gone (the others: {cause}); "
                              f"last complete checkpoint: {self.checkpoint_path or 'none'}") from None

    def _row(self, stage: str, stats: list[dict[str, Any]], extras: dict[str, Any]) -> dict[str, Any]:
        """One metrics row; rank 0's statistics, rewards over every rank for the cold start."""
        if stage == "warmup":  # no reward: the flow-matching loss (mean over every rank's images)
            losses = [x for s in stats for x in s["losses"]]
            s0 = stats[0]
            return {"loss": sum(losses) / len(losses), **_caption_stats(extras["captions"]),
                    "warmup/captioned": extras["captioned"], "grad_norm": s0["grad_norm"], "version": s0["version"],
                    "layer_weights": s0["layer_weights"], "captions": extras["captions"][:2]}
        if stage == "cold_start":
            rewards = torch.tensor([x for s in stats for x in s["rewards"]])
            s0 = stats[0]
            return {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
                    "loss": s0["loss"], "kl": 0.0, **_caption_stats(extras["captions"]), "grad_norm": s0["grad_norm"],
                    "version": s0["version"], "layer_weights": s0["layer_weights"], "captions": extras["captions"][:2]}
        return _row(extras["batch"], extras["adv"], stats[0], extras["captions"], self.recipe.rollout.group_size)

    # ------------------------------------------------------------------------------------------
    # save / cleanup
    # ------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> str:
        """Everything a resume needs (rl/checkpoint.py), once per step."""
        import ray

        from rl.checkpoint import capture_rng, save_checkpoint, schedule_position

        if self._saved_step == self.step and self.checkpoint_path:
            return self.checkpoint_path  # nothing trained since
        learner = self._learners("state_dict")[0]  # every rank: the optimizer state is gathered from all
        weights = learner.pop("weights")
        trainer = {
            "step": self.step, "stage": self.stages[self.step - 1] if self.step else None,
            "schedule": schedule_position(self._full_schedule(), self.step), "data_position": self.data_position,
            "version": self.version, "total_steps": len(self.stages), "metrics": self.last_metrics,
        }
        path = save_checkpoint(self.checkpoint_root, self.step, weights,
                               {"learner": learner, "driver": {"rng": capture_rng()}}, trainer,
                               self.recipe.model_dump(mode="json"), keep_last=self.recipe.output.keep_last)
        self.checkpoint_path, self._saved_step = path, self.step
        log.info("checkpoint: %s", path)
        return path

    def eval_grid(self, tag: str) -> None:
        """`grid_<tag>.png`: `eval.grid_images` held-out shapes with the greedy caption and its
        render at eval_steps (rl.eval's protocol), captions scored against the ground truth."""
        k = self.recipe.eval.grid_images
        if not k or self.recipe.data.source is not None:
            return
        import ray

        from rl.eval import heldout_examples, render_grid, score_captions

        exs = heldout_examples(self.recipe, k)
        args = ([e.image for e in exs], [e.image_id for e in exs], self.recipe.eval.seed)
        try:
            captions, renders = ray.get(self._rollout_remote(0 if self.rollouts else None, "eval_render", 2, *args),
                                        timeout=self.recipe.rollout.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise StepTimeout(f"grid_{tag}.png: no evaluation render from {'rollout actor 0' if self.rollouts else 'the learner'} "
                              f"within rollout.timeout_s = {self.recipe.rollout.timeout_s:g} s") from None
        coverage = [s["coverage"] for s in score_captions(captions, exs, self.recipe)]
        path = os.path.join(self.out_dir, f"grid_{tag}.png")
        render_grid(args[0], captions, renders, path, title=f"held-out, {tag} (step {self.step})", scores=coverage)
        log.info("grid %s: %s (mean coverage %.2f, e.g. %r)", tag, path, sum(coverage) / k, captions[0])

    def cleanup(self) -> None:
        """Close the logs, draw the plots, stop Ray; safe after a setup that stopped half-way."""
        import ray

        if ray.is_initialized():
            ray.shutdown()
        watcher = getattr(self, "_reaper", None)
        if watcher is not None:  # stops any process of this Ray that outlived its shutdown
            watcher.stdin.close()
            watcher.wait(timeout=30)
            self._reaper = None
        if not hasattr(self, "metrics"):
            return
        self.metrics.close()
        if self.recipe.output.plot:
            from rl.metrics import plot_layer_weights, plot_metrics, read_metrics

            rows = read_metrics(self.metrics.path)
            plot_metrics(rows, os.path.join(self.out_dir, "reward.png"))
            if self.recipe.models.connector.layers == "learned":
                plot_layer_weights(rows, os.path.join(self.out_dir, "layer_weights.png"))


class LearnerDied(RuntimeError):
    """The learner actor is gone: the run ends, its checkpoints stay as they are."""


class BadInput(RuntimeError):
    """Input found unusable during setup, before Ray starts or any model is built: exit 2."""


class OutputDirInUse(BadInput):
    """output.dir holds an earlier run and neither --resume nor --overwrite was given."""


class OutputDirError(BadInput):
    """output.dir cannot be created or written."""


class ClusterUnreachable(BadInput):
    """ray.address does not answer."""


class StepFailed(RuntimeError):
    """A step's rollout or rewards failed more often than resources.max_restarts allows."""


class StepTimeout(StepFailed):
    """An actor did not answer within its timeout and cannot be retried."""


def _host_port(address: str) -> tuple[str, int]:
    """"ray://host:port", "host:port", "[::1]:port" or "host" (Ray's GCS port 6379; ray:// 10001)."""
    rest = address.split("://", 1)[-1].rstrip("/")
    default = 10001 if address.startswith("ray://") else 6379
    if rest.startswith("["):  # IPv6
        host, _, port = rest[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
    try:
        return host, int(port) if port else default
    except ValueError:
        raise ClusterUnreachable(f"ray.address: {address!r} is not local, auto, host:port or ray://host:port") from None




def used_output_dir(path: str) -> bool:
    """Whether an earlier run wrote into `path` (its metrics.jsonl or checkpoints/ exist)."""
    return os.path.exists(os.path.join(path, "metrics.jsonl")) or os.path.exists(os.path.join(path, "checkpoints"))


@dataclass
class _Pending:
    """A launched step: its batch and the ObjectRefs of its rollout and rewards."""

    step: int
    records: list
    position: int  # data position after this step's batch
    rollout_actor: int | None  # None: colocated in learner rank 0
    reward_actor: int
    rollout_ref: Any = None  # one ObjectRef per item the rollout method returns
    driver_ref: Any = None  # the item the driver itself reads: the caption group, or the captions
    reward_ref: Any = None
    warmup_new: int = 0  # warm-up captions written this step (the rest came from the cache)


def _drain(refs: list[Any], wait_s: float = 5.0) -> None:
    """Fetch and drop the results of a launch given up on: Ray prints every failed result that is
    never fetched as an "Unhandled error" with its traceback when it is garbage-collected."""
    import ray

    refs = [r for r in refs if r is not None]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=wait_s)
    for ref in ready:
        try:
            ray.get(ref, timeout=0)
        except Exception:  # noqa: BLE001 - the failure itself is logged by the caller
            pass


def _bundle(cpus: float, gpus: float) -> dict[str, float]:
    return {k: v for k, v in (("CPU", cpus), ("GPU", gpus)) if v > 0}


def _rendezvous_fn() -> tuple[str, int]:
    """(node address, free port) where learner rank 0 will run: the DeepSpeed rendezvous."""
    import ray

    from rl.learner import _free_port

    return ray.util.get_node_ip_address(), _free_port("")


def _dead_ranks(refs: list[Any], timeout: float = 60.0) -> list[int]:
    """Learner ranks whose call in `refs` ended because the actor died (Ray may take some seconds
    to declare a lost node's actors dead)."""
    import ray

    ray.wait(refs, num_returns=len(refs), timeout=timeout)
    dead = []
    for rank, ref in enumerate(refs):
        try:
            ray.get(ref, timeout=0)
        except ray.exceptions.RayActorError:
            dead.append(rank)
        except Exception:  # noqa: BLE001  (its own error, or still running: not dead)
            pass
    return dead


def _whereabouts(_actor: Any) -> tuple[int, str, str]:
    """(process id, Ray node id, node IP) of the actor it runs in (through `__ray_call__`)."""
    import ray

    return os.getpid(), ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()


class ClusterTooSmall(RuntimeError):
    """The Ray cluster cannot hold the run's actors as `resources` asks (bad input: exit code 2)."""


def _describe_nodes(nodes: list[dict[str, Any]]) -> str:
    def one(n: dict[str, Any]) -> str:
        have = {k: v for k, v in n["Resources"].items() if k in ("CPU", "GPU") and v}
        return f"{n['NodeManagerAddress']} {n['NodeID'][:8]} {have or 'no CPU/GPU'}"

    total = {k: sum(n["Resources"].get(k, 0) for n in nodes) for k in ("CPU", "GPU")}
    return f"{len(nodes)} alive node(s), {total['CPU']:g} CPU and {total['GPU']:g} GPU in all: " + "; ".join(map(one, nodes))


def check_cluster(r, kinds: list[str], bundles: dict[str, dict[str, float]], nodes: list[dict[str, Any]]) -> None:
    """Refuse, before any placement group or actor exists, a `resources` section the cluster
    cannot hold: more CPUs/GPUs than it has, an actor larger than any node, or `placement: SPREAD`
    with fewer nodes able to hold a learner rank than `learner_workers` (`nodes`: `ray.nodes()`'s
    alive entries). Ray itself would wait for such resources forever."""
    counts = {k: kinds.count(k) for k in dict.fromkeys(kinds)}
    need = {res: sum(bundles[k].get(res, 0) for k in kinds) for res in ("CPU", "GPU")}
    have = {res: sum(n["Resources"].get(res, 0) for n in nodes) for res in ("CPU", "GPU")}
    cluster = _describe_nodes(nodes)
    actors = ", ".join(f"{n} {k}" for k, n in counts.items())
    for res in ("CPU", "GPU"):
        if need[res] > have[res] + 1e-9:
            field = "cpus_per_actor" if res == "CPU" else "gpus_per_actor"
            raise ClusterTooSmall(
                f"resources: {len(kinds)} actors ({actors}; resources.learner_workers={r.learner_workers}, "
                f"rollout_workers={r.rollout_workers}{' (colocated: none)' if r.colocate else ''}, "
                f"reward_workers={r.reward_workers}) at resources.{field}={getattr(r, field):g} need {need[res]:g} "
                f"{res}, but the Ray cluster has {have[res]:g}: {cluster}. Lower resources.learner_workers (or the "
                f"other counts, or resources.{field}), or add nodes")

    def fits(n: dict[str, Any], b: dict[str, float]) -> bool:
        return all(n["Resources"].get(k, 0) + 1e-9 >= v for k, v in b.items())

    for kind in counts:
        if not any(fits(n, bundles[kind]) for n in nodes):
            raise ClusterTooSmall(f"resources: one {kind} actor needs {bundles[kind]} on a single node, but no node "
                                  f"has that much: {cluster}")
    if r.placement == "none" and r.learner_workers > 1 and len(nodes) > 1:
        raise ClusterTooSmall(
            f"resources.placement: none with resources.learner_workers={r.learner_workers} on a cluster of "
            f"{len(nodes)} nodes: the DeepSpeed rendezvous must know rank 0's node before the ranks start, which "
            f"only a placement group fixes; use PACK or SPREAD ({cluster})")
    if r.placement == "SPREAD" and r.learner_workers > 1:
        able = [n for n in nodes if fits(n, bundles["learner"])]
        if len(able) < r.learner_workers:
            raise ClusterTooSmall(
                f"resources.placement: SPREAD puts each of the resources.learner_workers={r.learner_workers} learner "
                f"ranks on its own node, but only {len(able)} node(s) can hold one ({bundles['learner']}): {cluster}. "
                f"Add nodes, lower resources.learner_workers, or use placement PACK")


def _place(bundles: list[dict[str, float]], strategy: str, kinds: list[str], res: dict[str, Any], field: str,
           timeout: float = 300.0):
    """A ready placement group, or a ClusterTooSmall naming `resources.placement` after `timeout`
    seconds (the group is removed: nothing stays reserved)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group(bundles, strategy=strategy)
    t0 = time.time()
    try:
        while True:  # not silent: say every 30 s what it waits for
            try:
                ray.get(pg.ready(), timeout=min(30.0, max(timeout - (time.time() - t0), 0.1)))
                break
            except ray.exceptions.GetTimeoutError:
                if time.time() - t0 >= timeout:
                    raise
                log.warning("resources.placement: waiting %.0f s so far (up to %.0f s) for a %s placement group of %s",
                            time.time() - t0, timeout, strategy, bundles)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise ClusterTooSmall(
            f"resources.placement: {field}: a {strategy} placement group of {len(bundles)} bundles ({bundles}) for "
            f"the actors ({', '.join(kinds)}; {res}) could not be placed in {timeout:.0f} s: "
            f"{_describe_nodes([n for n in ray.nodes() if n.get('Alive')])}") from None
    return pg


def _truncate_metrics(path: str, step: int) -> int:
    """Drop rows of steps >= `step` (a killed run's steps after its checkpoint, about to be run
    again) and a line cut short by the kill, so that every step appears once; returns how many
    lines were dropped."""
    if not os.path.exists(path):
        return 0
    import json

    def before(line: str) -> bool:
        try:
            return json.loads(line)["step"] < step
        except (ValueError, KeyError, TypeError):
            return False

    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line if line.endswith("\n") else line + "\n" for line in lines if before(line)]
    if len(kept) < len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    return len(lines) - len(kept)


def _caption_stats(captions: list[str]) -> dict[str, float]:
    lengths = [len(c.split()) for c in captions] or [0]
    return {"caption_len_mean": sum(lengths) / len(lengths), "caption_len_min": min(lengths),
            "caption_len_max": max(lengths)}


def _columns(records) -> dict[str, list[Any]]:
    """The dataset's per-image columns for reward functions (as TRL passes dataset columns):
    `references` (reference caption texts or None) and every other column of the source."""
    keys = sorted({k for r in records for k in r.columns})
    return {"references": [r.references for r in records], **{k: [r.columns.get(k) for r in records] for k in keys}}


def _row(batch, adv: grpo.Advantages, stats: dict[str, Any], captions: list[str], group_size: int) -> dict[str, Any]:
    """One metrics row from a reward batch, its advantages and the learner's statistics."""
    weights = torch.tensor(batch.weights).unsqueeze(1)
    # weighted reward per row; a missing score counts as its group's mean, as in the advantages (never 0)
    total = (grpo.fill_missing(batch.matrix, group_size) * weights).sum(0)
    total = total[~torch.isnan(total)]
    row = {
        "reward_mean": float(total.mean()) if len(total) else float("nan"),
        "reward_std": float(total.std()) if len(total) > 1 else 0.0,
        "loss": stats["loss"], "kl": stats.get("kl", 0.0), "clip_frac": stats.get("clip_frac", 0.0),
        "ratio_mean": stats.get("ratio_mean", 1.0), "entropy": stats.get("entropy", 0.0),
        "zero_var_frac": adv.zero_var_frac, "grad_norm": stats.get("grad_norm", 0.0),
        "version": stats.get("version"), "stale": stats.get("stale_rollout", 0.0), **_caption_stats(captions),
        # captions cut at max_new_tokens without EOS (TRL: completions/clipped_ratio); encoder stage only
        **({"caption/truncated_frac": stats["truncated_frac"]} if "truncated_frac" in stats else {}),
        # vLLM rollouts: truncated importance-sampling weights between engine and learner (TRL: sampling/)
        **{f"sampling/{k}": stats[k] for k in ("is_ratio_mean", "is_ratio_min", "is_ratio_max") if k in stats},
        "captions": captions[:2],
    }
    row.update(reward_stats(batch.per_reward))  # reward_<name>_mean / _std (TRL: rewards/<name>/mean, /std)
    row.update(batch.details)  # judged rewards: judge_<name>_contra_frac, judge_<name>_<group>_coverage
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rl.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny.yaml")
    parser.add_argument("--output-dir", help="override output.dir")
    parser.add_argument("--max-steps", type=int, help="stop after N steps in all")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a recipe field, e.g. --set rollout.group_size=4 (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint in the output directory "
                             "(same as output.resume: auto)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start anew in an output directory an earlier run used, after moving that run "
                             "aside to <dir>.old-<UTC timestamp> (nothing is deleted; same as output.overwrite: "
                             "true). Without it or --resume such a directory is refused")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    overrides = args.set + (["output.resume=auto"] if args.resume else []) + (["output.overwrite=true"] if args.overwrite else [])
    try:
        recipe = load_recipe(args.recipe, overrides, output_dir=args.output_dir, max_steps=args.max_steps)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted while checking the recipe", file=sys.stderr)
        return 130
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Relative plugin files resolve against the recipe's folder, in the reward actors too. Passed
    # relative to the working directory when it lies below it: under `ray job submit --working-dir .`
    # every node unpacks the code into its own folder and runs the actors there.
    recipe_dir, cwd = Path(args.recipe).resolve().parent, Path.cwd().resolve()
    trainer = Trainer(recipe, recipe_dir=os.path.relpath(recipe_dir, cwd) if recipe_dir.is_relative_to(cwd) else str(recipe_dir))
    t0 = time.time()
    try:
        trainer.setup()
        if trainer.step == 0:
            trainer.eval_grid("start")  # held-out source | caption | reconstruction before RL
        trainer.train()
        trainer.eval_grid("end")
        path = trainer.save_checkpoint()
    except (CheckpointError, BadInput, RecipeError, DataError, ReferencesError, ClusterTooSmall) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback; checkpoints are written atomically
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        print(f"\ninterrupted at step {trainer.step}; last complete checkpoint: {trainer.checkpoint_path or 'none'}",
              file=sys.stderr)
        return 130
    except (StepFailed, RewardPluginError) as e:
        print(f"error: {getattr(e, 'cause', None) or e}", file=sys.stderr)
        return 1
    except FloatingPointError as e:  # the learner refused a non-finite step (through Ray: e.cause)
        print(f"error: step {trainer.step}: {getattr(e, 'cause', e)}; last complete checkpoint: "
              f"{trainer.checkpoint_path or 'none'}", file=sys.stderr)
        return 1
    except LearnerDied as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        trainer.cleanup()
    print(f"done: {trainer.step} steps in {time.time() - t0:.0f} s; metrics {trainer.metrics.path}; checkpoint {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
