"""Well-behaved reward plugins, loaded by tests through the file route ("plugins/basic.py:fn")."""
import asyncio

NOT_A_FUNCTION = 42


def _text(completion):
    """Plain text, or TRL's conversational completion [{"role": "assistant", "content": ...}]."""
    return completion if isinstance(completion, str) else completion[0]["content"]


def length_reward(prompts, completions, **kwargs):
    """len(completion) / 10: easy to compute by hand in the tests."""
    return [len(_text(c)) / 10 for c in completions]


def step_echo(prompts, completions, step, **kwargs):
    """Returns the step it was called at, for every completion (checks `step` reaches plugins)."""
    return [float(step)] * len(completions)


async def async_length_reward(prompts, completions, **kwargs):
    await asyncio.sleep(0)
    return [len(c) / 10 for c in completions]


def no_kwargs(prompts, completions):
    return [0.0] * len(completions)


class Holder:
    @staticmethod
    def first_char_is_a(prompts, completions, **kwargs):
        return [1.0 if c.startswith("a") else 0.0 for c in completions]
