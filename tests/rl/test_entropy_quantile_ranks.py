"""top_entropy_quantile over several learner ranks: the threshold is the quantile of every rank's
masked entropies (TRL pads, gathers and drops its sentinel), with ranks holding different token counts.
Two real gloo processes run `rl.grpo.gather_ragged` (the learner's gather); the reference is one
process on the union."""
from __future__ import annotations

import socket

import torch
import torch.multiprocessing as mp

from rl import grpo


def _inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + rank)
    entropies = torch.rand(3 + rank, 4, generator=g) + rank  # rank 1: more rows, higher entropies
    mask = (torch.rand(3 + rank, 4, generator=g) > 0.4 - 0.3 * rank).float()
    return entropies, mask


def _rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        entropies, mask = _inputs(rank)
        gathered = grpo.gather_ragged(entropies[mask.bool()])
        keep = grpo.high_entropy_mask(entropies, mask, 0.3, grpo.gather_ragged)
        torch.save({"gathered": gathered, "keep": keep}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_quantile_threshold_is_over_every_ranks_tokens(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "r")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    inputs = [_inputs(r) for r in range(2)]
    union = torch.cat([e[m.bool()] for e, m in inputs])
    assert inputs[0][1].sum() != inputs[1][1].sum()  # ragged
    for r in range(2):
        got = torch.load(f"{out}.{r}")
        assert torch.equal(got["gathered"], union)  # rank order, no padding left
        threshold = torch.quantile(union, 0.7)
        e, m = inputs[r]
        assert torch.equal(got["keep"], (e * m >= threshold) & m.bool())
        # not the rank's own quantile: rank 0's tokens are all below rank 1's, so it keeps none
        assert got["keep"].any() == bool(r) and grpo.high_entropy_mask(e, m, 0.3).any()
