"""Verifiable judge for the shapes world: a caption's stated facts checked against the scene's truth.

The offline judge (MiniLM similarity) never answers "contradicted", so ReaDe's consistency term
R_contra (eq. 4, `rewards/judge.py`) is always 0 with it and a caption that names "a red circle"
for a green one costs nothing. In the generated shapes world (rl/shapes/world.py) every fact of an image
is known, and its reference elements state all of them in fixed templates (`rl.shapes.describe`):

    user:          "a circle"                          (one per shape; kinds are distinct per image)
    detail:        "the circle is green", "the circle is large"
    supplementary: "the circle is at the top left", "there are two shapes", "the background is black"

So this judge needs no model: it reads the scene back from the elements, parses the caption with a
small deterministic parser over the same closed vocabulary (kinds, colours, sizes, cells, number
words, backgrounds: `rl.shapes` KINDS, COLORS, SIZES, CELLS, NUMBER_WORDS, BACKGROUNDS), and answers
per element, through the same `JudgedCaptionReward` (eq. 3-4, same weights) as the other judges:

- "supported"    the caption states the fact, and nothing conflicting about it;
- "contradicted" the caption states a conflicting fact about the same thing: another colour, size
                 or cell for a shape it names, another count, another background. A caption that
                 states both the true and a wrong value ("a red circle. a green circle.") is
                 contradicted: ReaDe adds R_contra for captions that contradict themselves (sec.
                 3.2.1, "longer outputs often introduce contradictions or internal inconsistencies");
- "unsupported"  otherwise (not mentioned).

Hallucinated shapes. ReaDe's eq. 4 has no term of its own for stated objects that are absent; its
one consistency slot is R_contra = 1[contradict(y)], so a hallucinated shape counts as a
contradiction (our choice, documented in README's judge section). Kinds are distinct within an image,
so the elements name every shape ("a circle", "a square") and the count ("there are two shapes")
closes the list: a stated kind outside it conflicts with that inventory. The verdict lands on
  1) the "a <kind>" element of the true shape in the cell the caption gives the absent shape (a
     misnamed shape: "a square at the top left" where the circle is), else
  2) the count element (an extra shape).
R_contra is binary, so which element carries it changes only that element's coverage (a contradicted
element is not supported): the reward loses lambda once, plus at most one element's share.

Parsing (`parse_statements`). Words as `rl.shapes.caption_words` splits them; phrases end at ".",
",", ";" and "and", and inside a phrase a new noun phrase starts at each article ("a", "an", "the")
or number word; a piece without a kind word ("at the top left", "is green") continues the piece
before it. Each piece with a kind word states that shape (plurals read as the kind: "two circles" is
a circle) and every colour, size and cell word in it. A count is a number word followed by "shape"
or "shapes"; a background is the colour word just before "background" (never a shape's colour).
Repeating a phrase states nothing new, so it changes no verdict ("three shapes on a three shapes on
a ..." states the count once). Cells read as in CELLS: "top left", "top" (the top middle cell), "left", "center" (also
"centre", "middle"); "at the top" for a shape at the top left is a wrong cell.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

from rl.shapes import BACKGROUNDS, CELLS, COLORS, KINDS, NUMBER_WORDS, SIZES, caption_words

_PLURALS = {k + ("es" if k.endswith("s") else "s"): k for k in KINDS}
_VERTICAL = ("top", "bottom")
_HORIZONTAL = ("left", "right")
_CENTER = ("center", "centre", "middle")
_PHRASE_END = {".", ",", ";", "!", "?", "and"}
_PIECE_START = {"a", "an", "the", *NUMBER_WORDS}


# ---------------------------------------------------------------------------------------------
# What a caption states
# ---------------------------------------------------------------------------------------------


@dataclass
class StatedShape:
    """Everything a caption says about one kind of shape (merged over all its mentions)."""

    colors: set[str] = field(default_factory=set)
    sizes: set[str] = field(default_factory=set)
    cells: set[str] = field(default_factory=set)


@dataclass
class Statements:
    """A caption's stated facts: shapes by kind, counts (number words), backgrounds."""

    shapes: dict[str, StatedShape] = field(default_factory=dict)
    counts: set[str] = field(default_factory=set)
    backgrounds: set[str] = field(default_factory=set)


def _cells(words: list[str]) -> set[str]:
    """Cells named by runs of position words: "top left" -> top left, "top" -> top, "middle" -> center."""
    cells, run = set(), []
    for w in words + [""]:
        if w in _VERTICAL or w in _HORIZONTAL or w in _CENTER:
            run.append(w)
            continue
        if run:
            v = next((x for x in run if x in _VERTICAL), None)
            h = next((x for x in run if x in _HORIZONTAL), None)
            cells.add(" ".join(x for x in (v, h) if x) or "center")
            run = []
    return cells


def _pieces(phrase: list[str]) -> list[list[str]]:
    """Split a phrase into noun-phrase pieces holding one kind word each (module docstring)."""
    pieces: list[list[str]] = []
    for w in phrase:
        if w in _PIECE_START or not pieces:
            pieces.append([w])
        else:
            pieces[-1].append(w)
    merged: list[list[str]] = []
    for piece in pieces:
        has_kind = any(_PLURALS.get(w, w) in KINDS for w in piece)
        if merged and not has_kind:
            merged[-1] += piece  # "at the top left", "the top left" continue the piece before
        elif merged and not any(_PLURALS.get(w, w) in KINDS for w in merged[-1]):
            merged[-1] += piece  # "two shapes on a red circle": the kindless lead-in joins the shape
        else:
            merged.append(piece)
    return merged


def parse_statements(caption: str) -> Statements:
    """The facts a shapes-world caption states (see the module docstring for the grammar)."""
    out = Statements()
    phrase: list[str] = []
    for w in caption_words(caption) + ["."]:
        if w not in _PHRASE_END:
            phrase.append(w)
            continue
        for i, x in enumerate(phrase):
            if x in NUMBER_WORDS and i + 1 < len(phrase) and phrase[i + 1] in ("shape", "shapes"):
                out.counts.add(x)
        about_background = set()  # "a black background": the word before it, never a shape's colour
        for i, x in enumerate(phrase):
            if x == "background":
                about_background.add(i)
                if i and (phrase[i - 1] in BACKGROUNDS or phrase[i - 1] in COLORS):
                    out.backgrounds.add(phrase[i - 1])
                    about_background.add(i - 1)
        phrase = [x for i, x in enumerate(phrase) if i not in about_background]
        for piece in _pieces(phrase):
            kinds = [_PLURALS.get(x, x) for x in piece if _PLURALS.get(x, x) in KINDS]
            if not kinds:
                continue
            # two kind words in one piece ("a circle square"): each is stated, attributes go to the first
            for k in kinds[1:]:
                out.shapes.setdefault(k, StatedShape())
            s = out.shapes.setdefault(kinds[0], StatedShape())
            s.colors |= {x for x in piece if x in COLORS}
            s.sizes |= {x for x in piece if x in SIZES}
            s.cells |= _cells(piece)
        phrase = []
    return out


# ---------------------------------------------------------------------------------------------
# The scene, read back from its reference elements
# ---------------------------------------------------------------------------------------------

_K, _C, _S = "|".join(KINDS), "|".join(COLORS), "|".join(SIZES)
_CELL = "|".join(sorted(CELLS, key=len, reverse=True))
_ELEMENT_PATTERNS = (  # the templates of rl.shapes.describe
    (re.compile(rf"a ({_K})"), "kind"),
    (re.compile(rf"the ({_K}) is ({_C})"), "color"),
    (re.compile(rf"the ({_K}) is ({_S})"), "size"),
    (re.compile(rf"the ({_K}) is at the ({_CELL})"), "cell"),
    (re.compile(rf"there (?:is|are) ({'|'.join(NUMBER_WORDS)}) shapes?"), "count"),
    (re.compile(rf"the background is ({'|'.join(BACKGROUNDS)})"), "background"),
)


def parse_element(element: str) -> tuple[str, ...]:
    """The fact one shapes-world element states, as a `rl.shapes.Fact` tuple ("color", "circle",
    "red"). ValueError for text outside rl.shapes.describe's templates."""
    text = element.strip().lower().rstrip(".")
    for pattern, name in _ELEMENT_PATTERNS:
        m = pattern.fullmatch(text)
        if m:
            return (name, *m.groups())
    raise ValueError(
        f"the verifiable judge reads only the shapes world's reference elements (rl.shapes.describe), got "
        f"{element!r}: use rewards.judge.backend offline or http for other data")


# ---------------------------------------------------------------------------------------------
# The judge
# ---------------------------------------------------------------------------------------------


def _verdict(stated: set[str], truth: str) -> str:
    if not stated:
        return "unsupported"
    return "supported" if stated == {truth} else "contradicted"


class VerifiableJudge:
    """`JudgeBackend` for the generated shapes world: verdicts by checking parsed caption facts
    against the facts of the elements (module docstring). Deterministic, no model, microseconds."""

    def __repr__(self) -> str:
        return "VerifiableJudge()"

    def judge(self, caption: str, elements: Sequence[str]) -> list[str]:
        facts = [parse_element(e) for e in elements]
        said = parse_statements(caption)
        verdicts = []
        for fact in facts:
            name, *args = fact
            if name == "kind":
                verdicts.append("supported" if args[0] in said.shapes else "unsupported")
            elif name in ("color", "size", "cell"):
                shape = said.shapes.get(args[0])
                stated = getattr(shape, name + "s") if shape else set()
                verdicts.append(_verdict(stated, args[1]))
            elif name == "count":
                verdicts.append(_verdict(said.counts, args[0]))
            else:  # background
                verdicts.append(_verdict(said.backgrounds, args[0]))
        # hallucinated shapes: stated kinds that are not in the scene (module docstring)
        truth_kinds = {f[1] for f in facts if f[0] == "kind"}
        kind_at = {f[2]: f[1] for f in facts if f[0] == "cell"}
        for kind, shape in said.shapes.items():
            if kind in truth_kinds:
                continue
            misnamed = [kind_at[c] for c in sorted(shape.cells) if c in kind_at]
            target = next((i for i, f in enumerate(facts) if misnamed and f == ("kind", misnamed[0])), None)
            if target is None:
                target = next((i for i, f in enumerate(facts) if f[0] == "count"), None)
            if target is None:  # no count element: the first "a <kind>" element closes the inventory
                target = next((i for i, f in enumerate(facts) if f[0] == "kind"), None)
            if target is None:
                raise ValueError(f"the verifiable judge found a shape ({kind!r}) in the caption but no count or "
                                 f"kind element among {list(elements)!r} to hold its contradiction")
            verdicts[target] = "contradicted"
        return verdicts
