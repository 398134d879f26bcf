"""The learner's optimizer: AdamW that updates only the parameter groups a stage trains.

Unified-GRPO trains one policy at a time (UAE sec. 2.3: stage 2 the encoder, stage 3 the decoder)
with one optimizer over every group. Under DeepSpeed ZeRO >= 1 (and bf16 at ZeRO 0) the optimizer
sees flat fp32 copies of each group, with a gradient for every element: a group the stage does not
train has zero gradient there, not None, so plain AdamW would still decay its moments, advance its
step count (bias correction) and apply weight decay. `GroupAdamW` skips those groups entirely, so
every ZeRO stage gives the ZeRO-0 result (tests/rl/test_zero.py):

    group["active"] False  ->  no moment update, no step count, no weight decay, params unchanged

`init_state()` creates AdamW's state (step 0, zero moments) eagerly, exactly as torch would at the
first step; DeepSpeed links a parameter's optimizer-state fragments once, at its first step, so
groups that start later (the decoder) must already have state then for checkpoints to reach them.
"""

from __future__ import annotations

import torch


class GroupAdamW(torch.optim.AdamW):
    """`torch.optim.AdamW` whose `step()` leaves groups with `group["active"] == False` untouched.

    The flag lives in the param-group dict, which DeepSpeed keeps when it swaps the group's
    params for its flat fp32 partition, so the same switch works at every ZeRO stage.
    """

    def step(self, closure=None):
        groups = self.param_groups
        active = [g for g in groups if g.get("active", True)]
        if not active:
            return closure() if closure is not None else None
        self.param_groups = active
        try:
            return super().step(closure)
        finally:
            self.param_groups = groups

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(group name, tensor) for every tensor this optimizer updates. Under ZeRO-3 DeepSpeed
        fills a group's params only while it steps it: `zero3_flat` then names its fp32 partitions."""
        if self.zero3_flat is not None:
            return self.zero3_flat()
        return [(group.get("name", ""), p) for group in self.param_groups for p in group["params"]]

    zero3_flat = None  # set by the learner under ZeRO-3: () -> [(group name, flat fp32 partition)]

    @torch.no_grad()
    def init_state(self) -> None:
        """AdamW's lazily created state, made now: step 0 and zero moments for every tensor."""
        amsgrad = any(group.get("amsgrad", False) for group in self.param_groups)
        for _, p in self.tensors():
            state = self.state[p]
            if state:
                continue
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if amsgrad:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def set_step(self, name: str, value: int) -> None:
        """Set the step count of every tensor of group `name` (resume)."""
        for group_name, p in self.tensors():
            if group_name == name:
                self.state[p]["step"] = torch.tensor(float(value), dtype=torch.float32)

    def get_step(self, name: str) -> int:
        """The step count of group `name` (0 before its first step)."""
        for group_name, p in self.tensors():
            if group_name == name and "step" in self.state[p]:
                return int(self.state[p]["step"])
        return 0
