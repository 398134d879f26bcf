"""Reward workers: a pool of Ray actors that score rollout batches.

`RewardWorker` holds the CLIP reconstruction reward (when the recipe names `clip`; on the GPU the
actor was given, `reward_device`) and every plugin of the recipe, resolved once at start. `score`
runs them all on one batch through `rewards.api.compute_rewards` and returns plain data (the
(K, N) matrix, weights, means). Each function runs under `rewards.timeout_s` (`TimedReward`).

Plugins get TRL's arguments (trl 1.16 `GRPOTrainer._calculate_rewards`, chat prompts): `prompts`
the caption request as chat messages with the row's image in them (`trl.data_utils.
prepare_multimodal_messages`, as TRL builds a multimodal prompt), `completions` one assistant
message per caption, and the per-row columns as keyword lists. A relative `path/to/file.py:fn`
is resolved against the recipe's folder (`base_dir`), the same rule as recipe validation.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
from typing import Any, Sequence

import torch

from rewards.api import (OnError, RewardBatch, RewardFn, RewardPluginError, compute_rewards, load_reward, reward_name,
                         unique_names)
from rl.config import Recipe

logger = logging.getLogger(__name__)


class TimedReward:
    """A `RewardFn` called in a thread of its own and waited on for at most `timeout_s` per call.

    A call that overruns, or that calls sys.exit (which would otherwise end the actor's process),
    fails naming the function and the step; then `on_error` applies as for any plugin failure
    (`fail`: RewardPluginError; `skip_sample`: None scores and a warning). Python cannot stop a
    thread, so an overrunning call goes on in the background (a daemon thread: it does not hold the
    process's exit back); while it does, the next calls fail at once rather than queue behind it (at
    most one call per function is ever left running)."""

    def __init__(self, fn: RewardFn, timeout_s: float):
        self.fn, self.name, self.weight, self.timeout_s = fn, fn.name, fn.weight, timeout_s
        self.spec = getattr(fn, "spec", fn.name)  # how the recipe named it: what errors say
        self._overran: tuple[int, concurrent.futures.Future] | None = None  # (step, call) still running

    def __repr__(self) -> str:
        return f"TimedReward({self.fn!r}, timeout_s={self.timeout_s:g})"

    def __call__(self, prompts, completions, *, step: int, on_error: OnError = "fail", **kwargs) -> list[float | None]:
        n = len(completions)
        if self._overran is not None and not self._overran[1].done():
            return self._fail(step, f"its call of step {self._overran[0]} is still running (it took longer than "
                              f"rewards.timeout_s = {self.timeout_s:g} s)", on_error, n)
        call: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                call.set_result(self.fn(prompts, completions, step=step, on_error=on_error, **kwargs))
            except BaseException as e:  # noqa: BLE001 - SystemExit too: handed to the caller below
                call.set_exception(e)

        threading.Thread(target=run, daemon=True, name=f"reward {self.name} step {step}").start()
        try:
            return call.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            self._overran = (step, call)
            return self._fail(step, f"took longer than rewards.timeout_s = {self.timeout_s:g} s", on_error, n)
        except SystemExit as e:  # RewardFn turns every Exception into its own failure; not this one
            return self._fail(step, f"called sys.exit({e.code!r})", on_error, n)

    def _fail(self, step: int, reason: str, on_error: OnError, n: int) -> list[None]:
        if on_error == "fail":
            raise RewardPluginError(self.spec, step, reason)
        logger.warning("reward plugin %r failed at step %s: %s; %d score(s) set to None", self.spec, step, reason, n)
        return [None] * n


def judge_details(fns: Sequence[Any]) -> dict[str, float]:
    """What the judged caption rewards among `fns` saw in their latest call (ReaDe eq. 3-4 terms),
    as flat metrics: judge_<name>_contra_frac (captions with a contradicted element, R_contra) and
    judge_<name>_<group>_coverage (mean R_g of the user / detail / supplementary elements), over the
    captions the judge scored. Read from `JudgedCaptionReward.last_components`: no second judging."""
    from rewards.judge import GROUPS, JudgedCaptionReward

    out: dict[str, float] = {}
    for f in fns:
        inner = f
        while not isinstance(inner, JudgedCaptionReward) and hasattr(inner, "fn"):
            inner = inner.fn  # TimedReward -> RewardFn -> the function
        if not isinstance(inner, JudgedCaptionReward):
            continue
        scored = [c for c in inner.last_components if c is not None]
        if not scored:
            continue
        out[f"judge_{f.name}_contra_frac"] = sum(c["contra"] for c in scored) / len(scored)
        for g in GROUPS:
            present = [c[g] for c in scored if c.get(g) is not None]
            if present:
                out[f"judge_{f.name}_{g}_coverage"] = sum(present) / len(present)
    return out


def trl_prompt(image: Any) -> list[dict]:
    """The caption request of one image as TRL passes a conversational multimodal prompt: the
    encoder's chat messages (`caption_messages`) with `image` filled in, through TRL's own
    `prepare_multimodal_messages` (every content a list of typed blocks)."""
    from trl.data_utils import prepare_multimodal_messages

    from rl.models.encoder import caption_messages

    return prepare_multimodal_messages(caption_messages(), images=[image])  # fills the {"type": "image"} placeholder


def trl_completion(caption: str) -> list[dict]:
    """One caption as TRL passes a conversational completion (no response schema)."""
    return [{"role": "assistant", "content": caption}]


def reward_device(recipe: Recipe) -> torch.device:
    """Where this process's CLIP reward runs: the recipe's device (`resolve_device`) when this
    process sees a GPU, else the CPU. Inside a Ray actor CUDA is visible only when the actor was
    given GPUs (`resources.gpus_per_actor` > 0: reward actors take half), so an actor without one
    runs CLIP on its CPU even in a `device: cuda` recipe."""
    from rl.models.unified import resolve_device

    if not torch.cuda.is_available():
        return torch.device("cpu")
    return resolve_device(recipe.device)


class RewardWorker:
    def __init__(self, recipe: Recipe, base_dir: str | None = None):
        self.recipe = recipe
        self.device = reward_device(recipe)
        fns: list[RewardFn] = []
        specs = recipe.rewards.functions
        names = unique_names([reward_name(spec.name) for spec in specs])  # metric keys: reward_<name>_mean / _std
        for spec, name in zip(specs, names):
            if spec.name == "clip":
                from rl.learner import make_clip_reward

                fns.append(RewardFn(make_clip_reward(recipe, self.device), name=name, weight=spec.weight, spec="clip"))
            elif spec.name == "judge":  # ReaDe's judged caption reward, as `rewards.judge` configures it
                from rewards.judge import judge_from_config

                fns.append(RewardFn(judge_from_config(recipe.rewards.judge), name=name, weight=spec.weight,
                                    spec="judge"))
            else:
                fns.append(load_reward(spec.name, weight=spec.weight, base_dir=base_dir, name=name))
        # each under rewards.timeout_s, sys.exit included (TimedReward)
        self.fns = [TimedReward(fn, recipe.rewards.timeout_s) for fn in fns]

    def ready(self) -> bool:
        return True

    def pid(self) -> int:
        return os.getpid()

    def names(self) -> list[str]:
        return [f.name for f in self.fns]

    def score(self, prompts: Sequence[Any], completions: Sequence[str], *, step: int, **kwargs: Any) -> RewardBatch:
        batch = compute_rewards(self.fns, prompts, completions, step=step, on_error=self.recipe.rewards.on_error, **kwargs)
        return batch._replace(details=judge_details(self.fns))

    def score_rollout(self, stage: str, captions: Sequence[Any], renders: Sequence[Any] | None,
                      image_ids: Sequence[str], images: Sequence[Any], elements: Sequence[Any], step: int,
                      columns: dict[str, Sequence[Any]] | None = None) -> RewardBatch:
        """Score a rollout worker's result directly: the driver passes the ObjectRefs of its
        captions (the encoder's CaptionGroup, or the decoder's one caption per image) and renders,
        so rollout and reward chain inside Ray without the driver waiting in between. Per-image
        data (`columns`: the dataset's other columns, `references` included, one entry per image)
        are repeated to the N = B * G rows, as TRL repeats dataset columns per generation."""
        g = self.recipe.rollout.group_size
        rep = lambda xs: [x for x in xs for _ in range(g)]  # noqa: E731
        if stage == "encoder":
            captions = captions.captions
        elif stage == "decoder":
            captions = rep(captions)
        else:
            raise ValueError(f"no rewards for stage {stage!r}")
        prompts = [trl_prompt(image) for image in images]  # one chat per image, shared by its G rows
        known = dict(images=rep(images), renders=renders, image_ids=rep(image_ids), elements=rep(elements),
                     group_ids=rep(range(len(image_ids))))
        # A column named like an argument of the call (images, step, ...) is not passed: the stack's wins.
        reserved = {*known, "prompts", "completions", "step", "on_error"}
        extra = {k: rep(v) for k, v in (columns or {}).items() if k not in reserved}
        return self.score(rep(prompts), [trl_completion(c) for c in captions], step=step, **known, **extra)


def remote_reward_actor(recipe: Recipe, num_cpus: float = 1.0, max_restarts: int = 0, base_dir: str | None = None):
    import ray

    return ray.remote(num_cpus=num_cpus, max_restarts=max_restarts)(RewardWorker).remote(recipe, base_dir)
