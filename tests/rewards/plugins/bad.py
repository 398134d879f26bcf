"""Misbehaving reward plugins: each breaks one rule the API checks."""
import math


def raises(prompts, completions, **kwargs):
    raise RuntimeError("boom")


def wrong_length(prompts, completions, **kwargs):
    return [0.5] * (len(completions) - 2)


def non_number(prompts, completions, **kwargs):
    return [0.5, "0.5"] + [0.5] * (len(completions) - 2)


def returns_bool(prompts, completions, **kwargs):
    return [True] + [0.5] * (len(completions) - 1)


def nan_at_1(prompts, completions, **kwargs):
    return [0.5, math.nan] + [0.5] * (len(completions) - 2)


def inf_at_0(prompts, completions, **kwargs):
    return [math.inf] + [0.5] * (len(completions) - 1)


def returns_none(prompts, completions, **kwargs):
    return None


def some_none(prompts, completions, **kwargs):
    """None is a valid "no score" (not an error): index 0 has none."""
    return [None] + [1.0] * (len(completions) - 1)
