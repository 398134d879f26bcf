"""A plugin that checks, in a real run, that it gets TRL's arguments (GRPOTrainer, chat model):
chat prompts with the image in the user turn, one assistant message per completion, dataset
columns as per-completion lists. Any mismatch raises, which stops a run under on_error: fail."""
from PIL import Image


def trl_format(prompts, completions, **kwargs):
    n = len(completions)
    assert len(prompts) == n, (len(prompts), n)
    for prompt, completion, image in zip(prompts, completions, kwargs["images"]):
        assert [m["role"] for m in prompt] == ["system", "user"], prompt
        user = prompt[1]["content"]
        assert [b["type"] for b in user] == ["image", "text"] and user[0]["image"] is image, user
        assert isinstance(image, Image.Image)
        assert isinstance(completion, list) and len(completion) == 1, completion
        assert completion[0]["role"] == "assistant" and isinstance(completion[0]["content"], str), completion
    for key in ("renders", "image_ids", "elements", "group_ids", "references", "text", "source"):
        assert key in kwargs, key
    for key in ("image_ids", "references", "text", "source", "group_ids"):
        assert len(kwargs[key]) == n, key
    # metadata.jsonl columns of the image folder: `text` is the reference caption, `source` a column
    assert all(refs == [text] for refs, text in zip(kwargs["references"], kwargs["text"]))
    assert all(src == f"made for {i}" for src, i in zip(kwargs["source"], kwargs["image_ids"]))
    assert isinstance(kwargs["step"], int)
    return [1.0] * n
