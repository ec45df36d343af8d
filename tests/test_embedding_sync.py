"""The summed-gradient synchronisation of a learned embedding (noprop_dist.training.embedding_sync).

Guards: the owner's update is joint AdamW on the step-by-step sum of the units' gradients;
units in that mode record one W_embed gradient per optimiser step and never move their own
copy; the in-process trainer resumes it exactly (Ray equals in-process: tests/test_ray.py).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from noprop_dist.rundir import RunDir
from noprop_dist.config import TrainConfig
from noprop_dist.training.embedding_sync import EmbeddingOwner, per_step
from noprop_dist.trainers.local import train_local
from noprop_dist.variants.base import HEAD
from noprop_dist.variants.dt import block
from noprop_dist.variants.base import make_setup
from noprop_dist.training.runner import UnitRunner, lr_factor


class SimulatedCrash(Exception):
    pass


def test_owner_applies_adamw_to_the_step_by_step_sum_of_the_units_gradients():
    torch.manual_seed(0)
    train = TrainConfig(lr=0.05, weight_decay=0.01)
    start = torch.randn(3, 4)
    blocks = [torch.randn(5, 3, 4) * scale for scale in (0.01, 100.0)]   # weights 0.01 vs 100
    head = torch.randn(2 * 5, 3, 4)                                       # two passes of 5 steps
    new = EmbeddingOwner(start, train).apply([*blocks, head], epoch=1)
    w = torch.nn.Parameter(start.clone())
    opt = torch.optim.AdamW([w], lr=0.05, weight_decay=0.01)
    for k in range(5):
        w.grad = blocks[0][k] + blocks[1][k] + (head[k] + head[5 + k]) / 2
        opt.step()
    assert torch.equal(new, w.detach())
    # The large-weight unit dominates: the result is (almost) what it alone would give, where
    # averaging per-unit Adam updates would land halfway to the small unit's.
    alone = [EmbeddingOwner(start, train).apply([g], epoch=1) for g in blocks]
    assert (new - alone[1]).norm() < 0.1 * (new - alone[0]).norm()


def test_owner_follows_the_units_cosine_learning_rate():
    """With train.lr_schedule=cosine the owner's AdamW takes each block step at the rate the
    units took it (lr_factor of that epoch and step): an interval of 2 epochs x 3 steps ending
    at epoch 4 of 6 is epochs 3 and 4; the result is that of AdamW run at those rates by hand."""
    torch.manual_seed(0)
    train = TrainConfig(lr=0.05, weight_decay=0.01, epochs=6, embed_sync_every=2, lr_schedule="cosine")
    owner = EmbeddingOwner(torch.randn(3, 4), train)
    expected = [lr_factor(train, e, 0, 1, s, 3) for e in (3, 4) for s in (1, 2, 3)]
    assert owner.lr_factors(4, 6) == expected and expected[0] == pytest.approx(0.5 * (1 + math.cos(math.pi / 3)))
    assert owner.lr_factors(5, 3) == [lr_factor(train, 5, 0, 1, s, 3) for s in (1, 2, 3)]  # one epoch since the last sync
    start = owner.weight.detach().clone()
    grads = torch.randn(6, 3, 4)
    new = owner.apply([grads], epoch=4)
    w = torch.nn.Parameter(start)
    opt = torch.optim.AdamW([w], lr=0.05, weight_decay=0.01)
    for grad, factor in zip(grads, expected):
        opt.param_groups[0]["lr"] = 0.05 * factor
        w.grad = grad
        opt.step()
    assert torch.equal(new, w.detach())
    constant = EmbeddingOwner(start, dataclasses.replace(train, lr_schedule="constant"))
    assert constant.lr_factors(4, 6) == [1.0] * 6
    assert not torch.equal(constant.apply([grads], epoch=4), new)


def test_per_step_refuses_steps_that_do_not_align():
    with pytest.raises(ValueError, match="do not divide"):
        per_step(torch.zeros(7, 2, 2), 3)


def test_owner_state_round_trips():
    train = TrainConfig()
    owner = EmbeddingOwner(torch.randn(3, 4), train)
    owner.apply([torch.randn(4, 3, 4)], epoch=1)
    copy = EmbeddingOwner(torch.zeros(3, 4), train)
    copy.load_state_tensors(owner.state_tensors())
    grads = [torch.randn(2, 3, 4)]
    assert torch.equal(owner.apply(grads, epoch=2), copy.apply(grads, epoch=2))


@pytest.mark.parametrize("unit", [block(1), HEAD], ids=["block", "head"])
def test_summed_gradient_units_record_one_gradient_per_step_and_keep_their_copy(unit, tiny_config, digits):
    cfg = tiny_config({"model.embedding": "learned", "train.embed_sync": "summed_gradient"})
    setup = make_setup(cfg, digits)
    runner = UnitRunner(unit, setup, digits.train)
    before = runner.embedding.detach().clone()
    runner.run_epoch(1)
    grads = runner.take_embedding_grads()
    steps = -(-len(digits.train) // cfg.train.batch_size)
    passes = cfg.train.head_passes if unit == HEAD else 1
    assert grads.shape == (passes * steps, *before.shape)
    assert bool((grads.abs().sum((1, 2)) > 0).all())
    assert torch.equal(runner.embedding.detach(), before)
    assert runner.take_embedding_grads().numel() == 0
    averaging = UnitRunner(unit, make_setup(tiny_config({"model.embedding": "learned"}), digits), digits.train)
    averaging.run_epoch(1)
    assert not torch.equal(averaging.embedding.detach(), before)   # the other mode moves its copy


@pytest.mark.slow  # several seconds: full suite only (the fast tier stays near a minute)
def test_summed_gradient_run_resumes_exactly(tiny_config, tmp_path, monkeypatch):
    """Crash in epoch 3 after the epoch-2 sync; the resumed run ends with the same unit files
    (owner state included) as the uninterrupted one."""
    cfg = tiny_config({"model.embedding": "learned", "train.embed_sync": "summed_gradient", "train.epochs": "3"})
    clean = train_local(cfg, tmp_path / "clean", show_progress=False)
    original = UnitRunner.run_epoch

    def crashing(self, epoch, *args, **kwargs):
        if (self.unit, epoch) == (block(2), 3):
            raise SimulatedCrash
        return original(self, epoch, *args, **kwargs)

    monkeypatch.setattr(UnitRunner, "run_epoch", crashing)
    with pytest.raises(SimulatedCrash):
        train_local(cfg, tmp_path / "crashed", show_progress=False)
    monkeypatch.undo()
    resumed = train_local(cfg, tmp_path / "crashed", resume=True, show_progress=False)
    a, b = RunDir(tmp_path / "clean"), RunDir(tmp_path / "crashed")
    for name in a.manifest()["units"]:
        ta, tb = a.load_unit(name), b.load_unit(name)
        assert ta.keys() == tb.keys() and any(k.startswith("owner/") for k in ta)
        for key in ta:
            assert torch.equal(ta[key], tb[key]), (name, key)
    assert resumed["test_accuracy"] == clean["test_accuracy"]
