"""The reward plugin API: one signature, four ways to name a function, strict checking.

A reward function has TRL's signature and is called with keywords, as TRL's GRPOTrainer does:

    fn(prompts=..., completions=..., **kwargs) -> list[float | None]     # one score per completion

Arguments are in TRL's format (trl 1.16 `GRPOTrainer._calculate_rewards`): the caption prompt is a
chat, so each prompt is the chat messages with the image in them (TRL's `prepare_multimodal_messages`
form: `[{"role": "system", "content": [{"type": "text", ...}]}, {"role": "user", "content":
[{"type": "image", "image": <PIL>}, {"type": "text", ...}]}]`) and each completion is one assistant
message, `[{"role": "assistant", "content": caption}]` (`completion_text` reads either form). Every
list in kwargs is aligned with `completions` (one entry per completion), as TRL repeats dataset
columns: the stack passes `images` (source PIL images), `renders` (reconstructed PIL images, when
any), `image_ids`, `elements` (reference elements dicts), `references` (reference caption texts of
the dataset, or None), every other dataset column by its name, `group_ids` and `step` (int), and
may add keys later, so a function must accept **kwargs. `None` means "no score": it is excluded
from means and advantages, never silently turned into 0. `async def` functions are allowed.

A recipe names a reward by a spec string, resolved by `load_reward` in this order:

    "format"                          a name registered with @register("format")
    "package.module:function"         importable module (attribute path after the colon)
    "path/to/file.py:function"        a file; a relative path is relative to `base_dir`: the recipe
                                      file's folder for a recipe (validation and reward workers alike),
                                      the current directory when None
    "my_reward"                       an entry point in group "unified_grpo.rewards" of an
                                      installed package:  [project.entry-points."unified_grpo.rewards"]
                                                          my_reward = "my_pkg.rewards:my_reward"
    "verl:<any spec above>"           a verl `compute_score(data_source, solution_str,
                                      ground_truth, extra_info=None)`, adapted by `from_verl`

A reward's `name` (its metrics keys, `reward_<name>_mean` / `_std`) is the function's name (`reward_name`: the
registered or entry-point name, or the attribute after the colon), with `_2`, `_3`, ... when two of a
recipe's rewards share it (`unique_names`). `load_reward` returns a `RewardFn`, itself callable with
TRL's signature (`step` optional), so it can be handed to TRL's GRPOTrainer as is.

`RewardFn` wraps the function and checks every output (length, numbers, finite); a bad output or
an exception raises `RewardPluginError` naming the plugin and the step, or, with
on_error="skip_sample", turns the affected scores into None and logs a warning.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import math
import numbers
import sys
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple, Sequence

import torch

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "unified_grpo.rewards"
BUILTIN_MODULES = ("rewards.format", "rewards.judge")  # imported on first lookup so their @register calls run
_F32_MAX = 3.4028234663852886e38  # a finite float64 above this becomes inf in the float32 matrix

OnError = Literal["fail", "skip_sample"]


class RewardSpecError(ValueError):
    """A reward spec does not resolve to a usable function (raised before any expensive work)."""

    def __init__(self, message: str, spec: str | None = None):
        super().__init__(message)
        self.spec = spec


class RewardPluginError(RuntimeError):
    """A reward function raised or returned something unusable at a given step."""

    def __init__(self, plugin: str, step: int, reason: str):
        super().__init__(plugin, step, reason)  # positional args keep the error picklable (Ray)
        self.plugin, self.step, self.reason = plugin, step, reason

    def __str__(self) -> str:
        at = "" if self.step is None else f" at step {self.step}"
        return f"reward plugin {self.plugin!r} failed{at}: {self.reason}"


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

_REGISTRY: dict[str, Callable] = {}


def register(name: str) -> Callable[[Callable], Callable]:
    """Decorator: make `fn` loadable as `load_reward(name)`. Returns `fn` unchanged."""

    def decorator(fn: Callable) -> Callable:
        old = _REGISTRY.get(name)
        # Re-running the same definition (a module imported twice, e.g. by pytest) is not a clash.
        same = old is fn or (old is not None and _definition(old) == _definition(fn))
        if old is not None and not same:
            raise ValueError(
                f"reward name {name!r} is already registered to {_qualname(old)}; "
                f"cannot register {_qualname(fn)} under the same name (pick another name)"
            )
        _REGISTRY[name] = fn
        return fn

    return decorator


def registered_names() -> list[str]:
    _import_builtins()
    return sorted(_REGISTRY)


def _qualname(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _definition(fn: Callable) -> tuple:
    """Where a function is defined; objects without code are only ever equal to themselves."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return (id(fn),)
    return _qualname(fn), code.co_filename, code.co_firstlineno


def _import_builtins() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


# ---------------------------------------------------------------------------------------------
# Resolving a spec
# ---------------------------------------------------------------------------------------------


def load_reward(spec: str, *, weight: float = 1.0, base_dir: str | Path | None = None,
                name: str | None = None) -> "RewardFn":
    """Resolve a spec string (see the module docstring) to a checked `RewardFn`, named `name` or
    `reward_name(spec)`. A relative file path is resolved against `base_dir` (the recipe's folder)."""
    if spec.startswith("verl:"):
        fn = from_verl(_resolve(spec[len("verl:"):], spec, base_dir))
    else:
        fn = _resolve(spec, spec, base_dir)
    _check_accepts_kwargs(fn, spec)
    return RewardFn(fn, name=name or reward_name(spec), weight=weight, spec=spec)


def reward_name(spec: str) -> str:
    """The short name of a spec, its metric key: a registered or entry-point name as is, else the
    last attribute after the colon ("recipes/plugins/my_reward.py:shape_words" -> "shape_words",
    "verl:pkg.mod:compute_score" -> "compute_score"); never a path."""
    target = spec[len("verl:"):] if spec.startswith("verl:") else spec
    return target.rsplit(":", 1)[-1].rsplit(".", 1)[-1] if ":" in target else target


def unique_names(names: Sequence[str]) -> list[str]:
    """`names` with `_2`, `_3`, ... appended to the second, third, ... use of a name (recipe order),
    skipping suffixed names already taken: ["a", "a", "a_2"] -> ["a", "a_3", "a_2"]."""
    taken, out = set(names), []
    seen: set[str] = set()
    for name in names:
        if name not in seen:
            seen.add(name)
            out.append(name)
            continue
        k = 2
        while f"{name}_{k}" in taken or f"{name}_{k}" in seen:
            k += 1
        seen.add(f"{name}_{k}")
        out.append(f"{name}_{k}")
    return out


def validate_specs(specs: Sequence[str], base_dir: str | Path | None = None) -> list["RewardFn"]:
    """Resolve every spec up front (config validation); one error listing every bad spec."""
    loaded, errors = [], {}
    for spec in specs:
        try:
            loaded.append(load_reward(spec, base_dir=base_dir))
        except RewardSpecError as e:
            errors[spec] = str(e)
    if errors:  # `.spec` is the first bad spec; the message lists all of them
        raise RewardSpecError("\n".join(errors.values()), spec=next(iter(errors)))
    return loaded


def _resolve(target: str, spec: str, base_dir: str | Path | None) -> Callable:
    _import_builtins()
    tried = [f"registered names ({', '.join(sorted(_REGISTRY)) or 'none'})"]
    if target in _REGISTRY:
        return _REGISTRY[target]
    if ":" in target:
        where, attr = target.rsplit(":", 1)
        is_file = where.endswith(".py") or "/" in where or "\\" in where
        try:
            module = _import_file(where, base_dir) if is_file else importlib.import_module(where)
            obj = _getattr_path(module, attr)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - any import failure (sys.exit too) is a spec error
            tried.append(f"{'file' if is_file else 'module'} {where!r} ({type(e).__name__}: {e})")
        else:
            return _check_callable(obj, spec)
    else:
        group = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        eps = list(group.select(name=target))
        if len(eps) > 1:
            raise RewardSpecError(
                f"reward spec {spec!r} is ambiguous: entry point {target!r} is installed by "
                f"{[ep.dist.name if ep.dist else ep.value for ep in eps]}; "
                "name it as 'module:function' instead",
                spec,
            )
        if not eps:
            names = ", ".join(sorted(group.names)) or "none"
            tried.append(f"entry points in group {ENTRY_POINT_GROUP!r} ({names})")
        else:
            try:
                obj = eps[0].load()
            except (Exception, SystemExit) as e:  # noqa: BLE001
                tried.append(f"entry point {target} = {eps[0].value!r} ({type(e).__name__}: {e})")
            else:
                return _check_callable(obj, spec)
    raise RewardSpecError(
        f"cannot resolve reward spec {spec!r}; tried: " + "; ".join(tried) + ". A spec is a "
        "registered name, 'package.module:function', 'path/to/file.py:function', an entry-point "
        "name, or 'verl:' followed by one of these.",
        spec,
    )


def _import_file(path: str, base_dir: str | Path | None):
    file = Path(path).expanduser()
    relative = not file.is_absolute()
    if relative:
        file = Path(base_dir or Path.cwd()) / file
    file = file.resolve()
    if not file.is_file():
        where = (f" (a relative path is resolved against {'the recipe file' if base_dir else 'the current'}"
                 f" folder {Path(base_dir or Path.cwd()).resolve()})") if relative else ""
        raise FileNotFoundError(f"no such file: {file}{where}")
    # One module per file, so loading a plugin twice reuses it (and its @register calls).
    name = f"_unified_grpo_plugin_{file.stem}_{hashlib.sha1(str(file).encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # before exec: dataclasses and pickling look the module up
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _getattr_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _check_callable(obj: Any, spec: str) -> Callable:
    if inspect.isclass(obj) or not callable(obj):
        raise RewardSpecError(
            f"reward spec {spec!r} resolves to {obj!r}, which is not a reward function; name a "
            "function (or an instance) with signature fn(prompts, completions, **kwargs)",
            spec,
        )
    return obj


def _check_accepts_kwargs(fn: Callable, spec: str) -> None:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        raise RewardSpecError(
            f"reward spec {spec!r}: {_qualname(fn)} does not accept **kwargs; the stack passes "
            "images, renders, step, ... as keywords, so write fn(prompts, completions, **kwargs)",
            spec,
        )


# ---------------------------------------------------------------------------------------------
# Adapters
# ---------------------------------------------------------------------------------------------


def completion_text(completion: Any) -> str:
    """A completion as text: plain str, or TRL's conversational form [{"role", "content"}, ...]."""
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"]


def from_verl(compute_score: Callable) -> Callable:
    """Adapt a verl `compute_score(data_source, solution_str, ground_truth, extra_info=None)`
    returning a float or a dict with a "score" key. Per-completion kwargs used: `data_source`,
    `ground_truth` (or TRL's `solution`), `extra_info`; a missing one is passed as None."""

    def reward(prompts, completions, **kwargs) -> list[float | None]:
        n = len(completions)
        truth = kwargs.get("ground_truth", kwargs.get("solution"))
        columns = [kwargs.get("data_source"), truth, kwargs.get("extra_info")]
        data_source, ground_truth, extra_info = [c if c is not None else [None] * n for c in columns]
        scores = []
        for i, completion in enumerate(completions):
            out = compute_score(  # keywords, as verl's reward managers call it
                data_source=data_source[i],
                solution_str=completion_text(completion),
                ground_truth=ground_truth[i],
                extra_info=extra_info[i],
            )
            scores.append(out["score"] if isinstance(out, dict) else out)
        return scores

    reward.__name__ = getattr(compute_score, "__name__", "verl_reward")
    reward.__qualname__ = f"from_verl({_qualname(compute_score)})"
    reward.compute_score = compute_score  # not __wrapped__: inspect.signature would follow it
    return reward


# ---------------------------------------------------------------------------------------------
# Calling and checking
# ---------------------------------------------------------------------------------------------


def run_awaitable(result: Any) -> Any:
    """Return `result`, awaiting it first if it is awaitable (an `async def` reward)."""
    if not inspect.isawaitable(result):
        return result

    async def wait():
        return await result

    try:
        asyncio.get_running_loop()
    except RuntimeError:  # no loop in this thread: the common case
        return asyncio.run(wait())
    # Called from inside a running loop (a notebook, an async driver): asyncio.run would refuse,
    # so run the coroutine on a fresh loop in a helper thread and block on it.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, wait()).result()


def _bad_score(x: Any) -> str | None:
    """Why `x` is not a usable score (None if it is fine; None itself is a valid 'no score')."""
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return f"a {type(x).__name__} ({x!r:.40}), not a number"
    if not math.isfinite(x) or abs(float(x)) > _F32_MAX:
        return f"{float(x)} (not finite)"
    return None


class RewardFn:
    """A reward function plus its `name` (metrics key), `weight` and `spec` (how the recipe named it,
    used in error messages), with checked outputs. Callable with TRL's reward signature."""

    def __init__(self, fn: Callable, name: str | None = None, weight: float = 1.0, spec: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self.weight = float(weight)
        self.spec = spec or self.name

    @property
    def __name__(self) -> str:  # TRL's GRPOTrainer names a reward function by its __name__
        return self.name

    def __repr__(self) -> str:
        return f"RewardFn({self.name!r}, weight={self.weight}, spec={self.spec!r})"

    def __call__(
        self, prompts, completions, *, step: int | None = None, on_error: OnError = "fail", **kwargs
    ) -> list[float | None]:
        """Scores for the N completions: floats, or None where absent (or skipped). `step` is passed
        on to the function when given (TRL passes `trainer_state` instead)."""
        n = len(completions)
        if step is not None:
            kwargs["step"] = step
        try:
            out = run_awaitable(self.fn(prompts=prompts, completions=completions, **kwargs))
        except Exception as e:  # noqa: BLE001 - a plugin may raise anything
            return self._fail(step, f"raised {type(e).__name__}: {e}", on_error, cause=e, n=n)
        if hasattr(out, "tolist"):  # a tensor or an array is fine too
            out = out.tolist()
        if not isinstance(out, (list, tuple)):
            reason = f"returned {type(out).__name__}, not a list of scores"
            return self._fail(step, reason, on_error, n=n)
        if len(out) != n:
            return self._fail(step, f"returned {len(out)} scores for {n} completions", on_error, n=n)
        scores: list[float | None] = []
        for i, x in enumerate(out):
            why = _bad_score(x)
            if why is not None:
                self._fail(step, f"score {i} is {why}", on_error, n=1)  # raises under "fail"
                scores.append(None)
            else:
                scores.append(None if x is None else float(x))
        return scores

    def _fail(self, step, reason, on_error, *, n, cause=None) -> list[None]:
        if on_error == "fail":
            raise RewardPluginError(self.spec, step, reason) from cause
        if on_error != "skip_sample":
            raise ValueError(f"on_error must be 'fail' or 'skip_sample', got {on_error!r}")
        logger.warning(
            "reward plugin %r failed at step %s: %s; %d score(s) set to None", self.spec, step, reason, n
        )
        return [None] * n


class RewardBatch(NamedTuple):
    per_reward: dict[str, list[float | None]]  # name -> N scores, None = missing
    matrix: torch.Tensor  # (K, N) float32; NaN marks a missing score and nothing else
    weights: list[float]  # (K,) one per reward, in the order of `matrix` rows
    means: dict[str, float | None]  # name -> mean over present scores; None if none present
    # flat metrics some rewards explain themselves with (a judged reward: judge_<name>_contra_frac,
    # judge_<name>_<group>_coverage; `RewardWorker.score`), {} for the others
    details: dict[str, float] = {}


def compute_rewards(
    fns: Sequence[RewardFn], prompts, completions, *, step: int, on_error: OnError = "fail", **kwargs
) -> RewardBatch:
    """Run the K reward functions on N completions and stack their scores into a (K, N) matrix."""
    names = [f.name for f in fns]
    if len(set(names)) != len(names):
        raise ValueError(f"reward names must be unique, got {names}")
    n = len(completions)
    per_reward = {f.name: f(prompts, completions, step=step, on_error=on_error, **kwargs) for f in fns}
    rows = [[math.nan if s is None else s for s in scores] for scores in per_reward.values()]
    matrix = torch.tensor(rows, dtype=torch.float32).reshape(len(fns), n)  # (K, N)
    means = {}
    for name, scores in per_reward.items():
        present = [s for s in scores if s is not None]
        means[name] = sum(present) / len(present) if present else None
    return RewardBatch(per_reward, matrix, [f.weight for f in fns], means)
