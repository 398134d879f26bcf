"""The learner as several DeepSpeed ranks: each rank trains its shard of whole groups, DeepSpeed
averages the gradients, and the result equals one rank training the whole batch."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from rl.config import Recipe

RECIPE = {
    "device": "cpu",
    "models": {"encoder": {"adapter": {"r": 4, "alpha": 8}}, "decoder": {"adapter": {"r": 4, "alpha": 8}}},
    "rollout": {"batch_size": 4, "group_size": 2, "caption": {"max_new_tokens": 6},
                "trajectory": {"num_steps": 3, "render_steps": 3, "sde_window": 1}},
    # sequence_mean: the mean over a rank's sequences, averaged over equal shards, is the batch mean
    "grpo": {"loss_agg": "sequence_mean", "encoder": {"lr": 1e-2, "beta": 0.04}, "decoder": {"lr": 1e-2, "beta": 0.04}},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(rank: int, world_size: int, port: int, out: str, zero: int = 0) -> None:
    torch.set_num_threads(1)
    os.environ["HF_HUB_OFFLINE"] = "1"
    from rl import grpo
    from rl.learner import Learner
    from rl.shapes import generate_shapes
    from rollouts.actors import RolloutWorker

    recipe = Recipe.model_validate({**RECIPE, "learner": {"zero_stage": zero}})
    learner = Learner(recipe, rank=rank, world_size=world_size, port=port)
    worker = RolloutWorker(recipe, models=learner.models)
    images = [r.image for r in generate_shapes(4, seed=5)]
    ids = [f"img{i}" for i in range(4)]
    # Every rank makes the same full batch (same weights, same seed) and trains its shard of it.
    group, _ = worker.encoder_rollout(images, ids, seed=1, render=False)
    adv = grpo.group_advantages(torch.arange(len(group.captions), dtype=torch.float32) % 2, 2)
    rows = [learner.train_encoder(group, adv.advantages, adv.valid)["rows"]]
    traj, _, _ = worker.decoder_rollout(images, seed=2)
    adv = grpo.group_advantages(torch.arange(traj.log_probs.shape[0], dtype=torch.float32) % 2, 2)
    rows.append(learner.train_decoder(traj, adv.advantages, adv.valid)["rows"])
    assert rows == [8 // world_size, 8 // world_size], rows  # whole groups, split across ranks
    state = learner.state_dict()  # a collective: every rank's optimizer partition is gathered
    if rank == 0:
        from safetensors.torch import save_file

        save_file(learner.trainable_state(), out)
        # the gathered AdamW moments are the full tensors, whatever the partitioning
        save_file({f"exp_avg.{k}": v for k, v in state["optimizer"]["exp_avg"].items()}, out + ".opt")


def _spawn(world_size: int, out: str, zero: int = 0) -> None:
    port = _free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_run, args=(r, world_size, port, out, zero)) for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0, f"rank exited with {p.exitcode}"


@pytest.mark.parametrize("zero", [0, 2])
def test_two_ranks_equal_one_rank_on_the_same_batch(tmp_path, zero):
    from safetensors.torch import load_file

    _spawn(1, str(tmp_path / "one.safetensors"))
    _spawn(2, str(tmp_path / "two.safetensors"), zero)
    one, two = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    opt_one, opt_two = (load_file(str(tmp_path / f"{n}.safetensors.opt")) for n in ("one", "two"))
    assert opt_one.keys() == opt_two.keys()
    for k in opt_one:  # every rank's partition is in the checkpoint state, not only rank 0's
        assert torch.allclose(opt_one[k], opt_two[k], atol=1e-6, rtol=1e-4), k
    trained = [k for k in one if "lora_B" in k]
    assert trained and any(one[k].abs().sum() > 0 for k in trained)  # the updates did something
    for k in one:
        assert torch.allclose(one[k], two[k], atol=2e-5, rtol=1e-4), k
