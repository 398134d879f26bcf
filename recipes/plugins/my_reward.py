"""An example reward plugin: copy this file, edit the function, name it in your recipe.

Recipe (a relative path is relative to the recipe file: this one sits in recipes/plugins/, so a
recipe in recipes/ names it `plugins/my_reward.py:...`):

    rewards:
      functions:
        - {name: clip, weight: 1.0}
        - {name: plugins/my_reward.py:shape_words, weight: 0.5}   # logged as reward_shape_words_mean / _std

The signature and the arguments are TRL's (GRPOTrainer with a chat model): `fn(prompts, completions,
**kwargs) -> list[float | None]`, one score per completion (caption), None for "no score" (left out of
its group's statistics, never counted as 0). Each completion is one assistant message,
`[{"role": "assistant", "content": "a red circle ..."}]`; each prompt is the caption request as chat
messages with the image in them (`[{"role": "system", ...}, {"role": "user", "content": [{"type":
"image", "image": <PIL>}, {"type": "text", "text": "Describe the image."}]}]`). kwargs carry what the
stack knows about the batch, one entry per completion: `images` (source PIL images), `renders`
(reconstructions, PIL), `image_ids`, `elements` (reference elements {"user": [...], "detail": [...],
"supplementary": [...]} or None), `references` (the dataset's reference captions or None), every
other dataset column by name, `group_ids`, and `step`. Accept **kwargs so new keys never break your
function. `async def` works too.
"""

WORDS = {"circle", "square", "triangle", "cross", "red", "green", "blue", "yellow", "white",
         "small", "large", "top", "bottom", "left", "right", "center"}


def shape_words(prompts, completions, **kwargs) -> list[float | None]:
    """Fraction of a caption's words that name a shape, colour, size or position (0 for empty)."""
    scores = []
    for completion in completions:
        caption = completion[0]["content"]  # TRL's conversational completion: one assistant message
        words = caption.lower().replace(".", " ").replace(",", " ").split()
        scores.append(sum(w in WORDS for w in words) / len(words) if words else None)
    return scores


def from_verl_example(data_source, solution_str, ground_truth, extra_info=None) -> float:
    """A verl-style `compute_score`; name it in a recipe as
    `verl:plugins/my_reward.py:from_verl_example` from a recipe in recipes/ (the `verl:` prefix adapts it)."""
    return float(str(ground_truth or "").lower() in solution_str.lower())
