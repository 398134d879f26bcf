"""A verl-style reward: compute_score(data_source, solution_str, ground_truth, extra_info=None)."""
from rewards.api import from_verl


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    correct = float(solution_str.strip() == ground_truth)
    bonus = 0.0 if extra_info is None else extra_info.get("bonus", 0.0)
    if data_source == "dict":  # verl allows a dict with a "score" key plus extra metrics
        return {"score": correct + bonus, "acc": correct}
    return correct + bonus


my_reward = from_verl(compute_score)  # the one-line wrap a user adds
