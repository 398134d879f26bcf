"""The format reward of ReaDe (sec. 3.2.1, eq. 2): think-then-answer, with a structured answer.

    R_format = 1    if both the think and the answer format hold
               0.2  if exactly one holds
               0    if neither holds

The paper names the two formats but does not spell them out as rules; these are ours, read from
its text (R1-style tags, sec. 3.1; "the <answer> section is required to produce a six-part
structured caption", sec. 3.2.1; the six parts of the gold caption in Table 8):

- think format: the completion (leading whitespace ignored) opens with `<think>`, has exactly one
  `<think>` and one `</think>`, in that order, with non-blank reasoning between them.
- answer format: exactly one `<answer>` and one `</answer>`, in that order, with nothing but
  whitespace after `</answer>`, and a body that holds the six numbered parts in order, each
  non-blank: "1. Dense caption: ... 2. Main object caption: ... 3. Background caption: ...
  4. Movement caption: ... 5. Style caption: ... 6. Camera caption: ..." (case-insensitive;
  parts may share a line, as in Table 8). Nothing but whitespace may come before part 1.

Registered as `format` (tags only, for free-form captions: `format_score(text, sections=None)`) and
`format_reade` (tags and the six parts). For another set of parts, register a three-line plugin
that calls `format_score(text, MY_PARTS)`.
"""
from __future__ import annotations

import re
from typing import Sequence

from rewards.api import completion_text, register

READE_SECTIONS: tuple[str, ...] = (
    "Dense caption",
    "Main object caption",
    "Background caption",
    "Movement caption",
    "Style caption",
    "Camera caption",
)

BOTH, ONE, NEITHER = 1.0, 0.2, 0.0  # ReaDe eq. 2

_THINK = re.compile(r"\s*<think>(.*?)</think>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>\s*\Z", re.DOTALL)


def think_ok(text: str) -> bool:
    if text.count("<think>") != 1 or text.count("</think>") != 1:
        return False
    m = _THINK.match(text)
    return m is not None and m.group(1).strip() != ""


def answer_ok(text: str, sections: Sequence[str] | None = READE_SECTIONS) -> bool:
    if text.count("<answer>") != 1 or text.count("</answer>") != 1:
        return False
    m = _ANSWER.search(text)
    if m is None or m.group(1).strip() == "":
        return False
    return sections is None or _has_sections(m.group(1), sections)


def _has_sections(body: str, sections: Sequence[str]) -> bool:
    """`body` is "1. <sections[0]>: text 2. <sections[1]>: text ...", in order, each text non-blank."""
    starts, ends = [], []  # where each header starts / where its text starts
    pos = 0
    for k, name in enumerate(sections, start=1):
        header = re.compile(rf"(?<!\S){k}\.\s*{re.escape(name)}\s*:", re.IGNORECASE)
        m = header.search(body, pos)
        if m is None:
            return False
        starts.append(m.start())
        ends.append(m.end())
        pos = m.end()
    if body[: starts[0]].strip():
        return False
    texts = [body[ends[i] : starts[i + 1]] for i in range(len(sections) - 1)] + [body[ends[-1] :]]
    return all(t.strip() for t in texts)


def format_score(text: str, sections: Sequence[str] | None = READE_SECTIONS) -> float:
    """ReaDe eq. 2 for one completion: 1.0 both formats, 0.2 exactly one, 0.0 neither."""
    n_ok = think_ok(text) + answer_ok(text, sections)
    return (NEITHER, ONE, BOTH)[n_ok]


@register("format")
def format_reward(prompts, completions, **kwargs) -> list[float]:
    """Reward plugin "format": think + answer tags only (1 / 0.2 / 0), for free-form captions."""
    return [format_score(completion_text(c), sections=None) for c in completions]


@register("format_reade")
def format_reade_reward(prompts, completions, **kwargs) -> list[float]:
    """Reward plugin "format_reade": the tags and ReaDe's six-part structured answer (Table 8)."""
    return [format_score(completion_text(c)) for c in completions]
