"""The learner at every DeepSpeed ZeRO stage (0-3), fp32 and bf16, one rank, on the tiny models.

What must hold whatever the stage (issue: "ZeRO 0-3 correct"):
- a stage moves only its own parameters, and a group it does not train takes no optimizer step
  (its AdamW moments and step count are untouched);
- the reported gradient norm is the true global norm (the same as ZeRO-0's, where the model's .grad
  is the gradient);
- the connector's learned layer weights stop moving after `freeze_after_steps`;
- the same run gives the same adapters at ZeRO 0 and 1/2/3 (1e-5 in fp32);
- micro-batches give the full-batch step;
- a checkpoint's state resumes exactly (bitwise in fp32 at ZeRO 0/1/2).
"""

import pytest
import torch

from rl import grpo
from rl.checkpoint import flatten_state, unflatten_state
from rl.config import Recipe
from rl.learner import Learner
from rl.shapes import generate_shapes
from rollouts.actors import RolloutWorker, image_seed

STAGES = [0, 1, 2, 3]


def recipe(zero: int = 0, bf16: bool = False, micro: int | None = None, **connector) -> Recipe:
    return Recipe.model_validate({
        "device": "cpu",
        "models": {"encoder": {"adapter": {"r": 4, "alpha": 8}}, "decoder": {"adapter": {"r": 4, "alpha": 8}},
                   "connector": connector},
        "rollout": {"batch_size": 2, "group_size": 2, "caption": {"max_new_tokens": 6},
                    "trajectory": {"num_steps": 3, "render_steps": 3, "sde_window": 2}},
        # weight decay on: an idle group stepped with zero gradient would shrink (caught below)
        "grpo": {"encoder": {"lr": 1e-2, "beta": 0.04, "weight_decay": 0.1},
                 "decoder": {"lr": 1e-2, "beta": 0.04, "weight_decay": 0.1}},
        "cold_start": {"lr": 1e-2, "grad_steps": 1},
        "learner": {"zero_stage": zero, "bf16": bf16, "micro_batch_size": micro},
    })


@pytest.fixture(scope="module")
def data():
    records = generate_shapes(2, seed=1)
    return [r.image for r in records], [r.image_id for r in records]


class Run:
    """A learner with a colocated rollout worker, stepping cold start / encoder / decoder."""

    def __init__(self, r: Recipe, data):
        torch.manual_seed(0)
        self.learner = Learner(r)
        self.worker = RolloutWorker(r, models=self.learner.models)
        self.images, self.ids = data
        self.seed = 0

    def step(self, stage: str) -> dict:
        L, W = self.learner, self.worker
        W.version = L.version
        self.seed += 1
        adv = grpo.group_advantages(torch.tensor([0.0, 1.0, 1.0, 0.0]), 2)
        if stage == "cold_start":
            g = W.cold_start_rollout(self.images, seed=self.seed)
            return L.train_cold_start(self.images, self.ids, g.completion_ids, g.completion_mask,
                                      [image_seed(i) for i in self.ids])
        if stage == "encoder":
            g, _ = W.encoder_rollout(self.images, self.ids, seed=self.seed, render=False)
            return L.train_encoder(g, adv.advantages, adv.valid)
        traj, _, _ = W.decoder_rollout(self.images, seed=self.seed)
        return L.train_decoder(traj, adv.advantages, adv.valid)

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.float().clone() for k, v in self.learner.trainable_state().items()}

    def optimizer(self) -> dict:
        return self.learner.state_dict()["optimizer"]


SEQUENCE = ["cold_start", "encoder", "encoder", "encoder", "decoder", "decoder", "decoder"]


@pytest.fixture(scope="module")
def reference(data):
    """ZeRO-0 in fp32 and in bf16: per-step stats and final adapters of SEQUENCE."""
    cache = {}

    def get(bf16: bool):
        if bf16 not in cache:
            run = Run(recipe(0, bf16), data)
            cache[bf16] = ([run.step(stage) for stage in SEQUENCE], run.weights())
        return cache[bf16]

    return get


def moved(before: dict, after: dict) -> dict[str, bool]:
    return {part: any(not torch.equal(before[k], after[k]) for k in before if k.startswith(part + "."))
            for part in ("encoder", "decoder", "connector")}


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("zero", STAGES)
def test_each_stage_moves_only_its_groups_and_idle_groups_take_no_step(zero, bf16, data, reference):
    run = Run(recipe(zero, bf16), data)
    expected = {"cold_start": {"encoder": True, "decoder": True, "connector": True},
                "encoder": {"encoder": True, "decoder": False, "connector": False},
                "decoder": {"encoder": False, "decoder": True, "connector": False}}
    ref_stats, ref_weights = reference(bf16)
    for i, stage in enumerate(SEQUENCE):
        before_w, before_opt = run.weights(), run.optimizer()
        stats = run.step(stage)
        after_opt = run.optimizer()
        assert moved(before_w, run.weights()) == expected[stage], (stage, i)
        active = {"cold_start": ("encoder", "decoder", "connector"), "encoder": ("encoder",), "decoder": ("decoder",)}[stage]
        for group, count in after_opt["step"].items():
            assert count == before_opt["step"][group] + (group in active), (stage, group)
        for key in before_opt["exp_avg"]:  # an idle group's moments are untouched
            if key.split(".")[0] not in active:
                assert torch.equal(before_opt["exp_avg"][key], after_opt["exp_avg"][key]), key
                assert torch.equal(before_opt["exp_avg_sq"][key], after_opt["exp_avg_sq"][key]), key
                assert torch.equal(before_opt["master"][key], after_opt["master"][key]), key
        # DeepSpeed's global norm is the true one: ZeRO-0's within float tolerance (bf16: ZeRO-0 keeps
        # bf16 gradients, ZeRO >= 1 accumulates them in fp32, and the runs drift apart by round-off)
        tol = 1e-5 if not bf16 else 5e-2
        assert stats["grad_norm"] == pytest.approx(ref_stats[i]["grad_norm"], rel=tol, abs=1e-9), (stage, i)
        assert stats["grad_norm"] > 0
    if not bf16:  # the same adapters as ZeRO-0 after a cold start, 3 encoder and 3 decoder steps
        for k, v in run.weights().items():
            assert torch.allclose(v, ref_weights[k], atol=1e-5, rtol=0), k


@pytest.mark.parametrize("zero", STAGES)
def test_learned_layer_weights_stop_after_freeze(zero, data):
    run = Run(recipe(zero, layers="learned", freeze_after_steps=2), data)
    logits = lambda: run.weights()["connector.layer_logits"]  # noqa: E731
    history = [logits()]
    for stage in ["cold_start", "cold_start", "encoder", "cold_start", "cold_start"]:
        run.step(stage)
        history.append(logits())
    changed = [not torch.equal(a, b) for a, b in zip(history, history[1:])]
    assert changed == [True, True, False, False, False]
    assert run.optimizer()["step"]["layer_weights"] == 2


def _gradients(run: Run, stage: str) -> dict[str, torch.Tensor]:
    """One step of `stage` with the optimizer step replaced by a grab of the accumulated gradient
    (ZeRO-0 fp32: the model's .grad is the gradient), so the weights do not move."""
    engine, grabbed = run.learner.engine, {}
    real = engine.step

    def grab():
        for k, (_, p) in run.learner.named_params.items():
            if p.grad is not None:
                grabbed[k] = p.grad.detach().clone()
        engine.zero_grad()

    engine.step = grab
    try:
        run.step(stage)
    finally:
        engine.step = real
    return grabbed


def test_micro_batches_accumulate_the_full_batch_gradient(data):
    full, micro = Run(recipe(0), data), Run(recipe(0, micro=1), data)
    for stage in ["cold_start", "encoder", "decoder"]:
        a, b = _gradients(full, stage), _gradients(micro, stage)
        assert a.keys() == b.keys() and a, stage
        for k in a:
            scale = float(a[k].abs().max())  # float32 sums in another order: error relative to the tensor
            assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5 * scale + 1e-12), (stage, k, float((a[k] - b[k]).abs().max()), scale)


@pytest.mark.parametrize("zero", [0, 2])
def test_micro_batches_give_the_full_batch_step(zero, data):
    full, micro = Run(recipe(zero), data), Run(recipe(zero, micro=1), data)
    for stage in SEQUENCE[:2] + SEQUENCE[4:5]:
        a, b = full.step(stage), micro.step(stage)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-7), stage
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), stage
        assert a.get("kl", 0.0) == pytest.approx(b.get("kl", 0.0), rel=1e-4, abs=1e-9), stage


def _through_checkpoint_format(state: dict) -> dict:
    """What rl.checkpoint writes and reads back: tensors (safetensors) and a JSON skeleton."""
    import json

    tensors, skeleton = flatten_state(state)
    return unflatten_state(json.loads(json.dumps(skeleton)), {k: v.clone() for k, v in tensors.items()})


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("zero", STAGES)
def test_resume_continues_exactly(zero, bf16, data):
    """Train, save the learner state, load it into a fresh learner: the next encoder and decoder
    steps give what the uninterrupted learner gives (bitwise at ZeRO 0/1/2 in fp32)."""
    from rl.checkpoint import capture_rng, restore_rng

    straight = Run(recipe(zero, bf16), data)
    for stage in SEQUENCE[:3] + SEQUENCE[4:5]:
        straight.step(stage)
    state = _through_checkpoint_format(straight.learner.state_dict())
    rng = capture_rng()
    resumed = Run(recipe(zero, bf16), data)
    resumed.learner.load_state_dict(state)
    resumed.seed = straight.seed
    for stage in ("encoder", "decoder"):
        restore_rng(rng)
        a = straight.step(stage)
        restore_rng(rng)
        b = resumed.step(stage)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6), stage
    exact = zero in (0, 1, 2) and not bf16
    for k, v in straight.weights().items():
        w = resumed.weights()[k]
        assert torch.equal(v, w) if exact else torch.allclose(v, w, atol=1e-6), k
    assert straight.optimizer()["step"] == resumed.optimizer()["step"]


def test_out_of_memory_names_the_stage_and_the_field_to_lower(monkeypatch, data):
    from rl.learner import LearnerWorker

    worker = LearnerWorker(recipe(0, micro=2))

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(worker.learner, "train_decoder", oom)
    with pytest.raises(RuntimeError, match=r"decoder stage \(learner\) with learner.micro_batch_size = 2"):
        worker.train("decoder", None, None, None)
    rollout = RolloutWorker(worker.learner.recipe, models=worker.learner.models)
    monkeypatch.setattr(rollout, "captions", oom)
    with pytest.raises(RuntimeError, match=r"encoder stage \(rollout\) .*lower rollout.micro_batch_size"):
        rollout.encoder_rollout(*data, seed=0)
