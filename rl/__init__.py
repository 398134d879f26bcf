"""Unified-GRPO: the driver, the recipe schema, the learner and the pure GRPO math."""
