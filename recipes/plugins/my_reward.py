"""An example reward plugin: copy this file, edit the function, name it in your recipe.

Recipe:

    rewards:
      functions:
        - {name: clip, weight: 1.0}
        - {name: recipes/plugins/my_reward.py:shape_words, weight: 0.5}

The signature is TRL's: `fn(prompts, completions, **kwargs) -> list[float | None]`, one score per
completion (caption), None for "no score" (left out of its group's statistics, never counted as 0).
kwargs carry what the stack knows about the batch, one entry per completion:
`images` (source PIL images), `renders` (reconstructions, PIL), `image_ids`, `elements` (reference
elements {"user": [...], "detail": [...], "supplementary": [...]} or None), `group_ids`, and `step`.
Accept **kwargs so new keys never break your function. `async def` works too.
"""

WORDS = {"circle", "square", "triangle", "cross", "red", "green", "blue", "yellow", "white",
         "small", "large", "top", "bottom", "left", "right", "center"}


def shape_words(prompts, completions, **kwargs) -> list[float | None]:
    """Fraction of a caption's words that name a shape, colour, size or position (0 for empty)."""
    scores = []
    for caption in completions:
        words = caption.lower().replace(".", " ").replace(",", " ").split()
        scores.append(sum(w in WORDS for w in words) / len(words) if words else None)
    return scores


def from_verl_example(data_source, solution_str, ground_truth, extra_info=None) -> float:
    """A verl-style `compute_score`; name it in a recipe as
    `verl:recipes/plugins/my_reward.py:from_verl_example` (the `verl:` prefix adapts it)."""
    return float(str(ground_truth or "").lower() in solution_str.lower())
