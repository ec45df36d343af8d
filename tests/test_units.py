"""Tests of noprop_dist.training.runner (training one unit) and of the networks in noprop_dist.nets.blocks.

Guards the heart of NoProp-DT: block t learns from its own closed-form target only, training
is a pure function of (seed, unit, epoch), and a checkpointed unit resumes bit-exactly.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from noprop_dist.core import schedule
from noprop_dist.run.rundir import tensors_from_bytes, tensors_to_bytes
from noprop_dist.config import apply_overrides, validate
from noprop_dist.data import load_dataset, normalize
from noprop_dist.nets.blocks import BLOCK_SIZES, DTBlock, denoised_embedding
from noprop_dist.variants.dt import HEAD, block
from noprop_dist.variants.base import DROPOUT, average_embeddings, derive_seed, epoch_order, make_setup
from noprop_dist.training.runner import UnitRunner, train_unit


def epoch_noise(setup, unit, epoch, n):
    """The variant's noise recipe of ``unit`` (a block index or a UnitSpec) for one epoch."""
    return setup.objective.epoch_noise(block(unit) if isinstance(unit, int) else unit, setup, epoch, n)

LIMIT = 256  # training examples used by the unit tests: enough to learn, fast to run


@pytest.fixture(scope="module")
def small(tiny_config):
    """(config, dataset, setup) of the tiny preset on the first 256 digits, one-hot embedding."""
    cfg = tiny_config({"data.limit_train": str(LIMIT)})
    data = load_dataset(cfg.data)
    return cfg, data, make_setup(cfg, data)


def setup_for(small, **overrides):
    """A UnitSetup of the small data with config overrides (e.g. another seed or embedding)."""
    cfg, data, _ = small
    new = apply_overrides(cfg, overrides, "test")
    validate(new)
    return make_setup(new, data)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def states_differ(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a if k.startswith("model/") and a[k].is_floating_point())


def block_loss(runner: UnitRunner, idx: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Block t's weighted L2 loss on the examples ``idx``, written out as in _block_epoch (Eq. 8)."""
    train, setup = runner.train, runner.setup
    x = normalize(np.asarray(train.x[idx.numpy()]), setup.mean, setup.std)       # (B, C, H, W)
    y = torch.from_numpy(np.asarray(train.y)[idx.numpy()])                        # (B,)
    u_y = runner.embedding[y]                                                     # (B, d)
    z_prev = schedule.sample_marginal(u_y, setup.alpha_bar[runner.unit.index - 1], noise[idx])  # (B, d)
    u_hat = denoised_embedding(runner.module(z_prev, x), runner.embedding)       # (B, d)
    weight = schedule.dt_loss_weights(np.array(setup.alpha_bar), setup.train.eta)[runner.unit.index]
    return weight * ((u_hat - u_y) ** 2).sum(-1).mean()


def graph_leaves(loss: torch.Tensor) -> set[int]:
    """ids of the tensors that ``loss.backward()`` accumulates gradient into (its graph's leaves)."""
    leaves, seen, todo = set(), set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):  # AccumulateGrad: a leaf that requires grad
            leaves.add(id(node.variable))
        todo.extend(next_node for next_node, _ in node.next_functions)
    return leaves


# ------------------------------------------------------------------ locality of the gradient

def test_block_loss_reproduction_is_the_training_step(small):
    """block_loss (below) is exactly the loss run_epoch descends: one full-batch step by hand
    equals one epoch of run_epoch. This makes the gradient-locality test meaningful."""
    _, data, setup0 = small
    setup = dataclasses.replace(setup0, train=dataclasses.replace(setup0.train, batch_size=LIMIT))
    by_hand, reference = UnitRunner(block(2), setup, data.train), UnitRunner(block(2), setup, data.train)
    reference.run_epoch(1)
    by_hand.module.train()
    order = epoch_order(setup, block(2), 1, LIMIT)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(setup.train.seed, 2, 1, DROPOUT))
        loss = block_loss(by_hand, order, epoch_noise(setup, 2, 1, LIMIT))
    by_hand.optimizer.zero_grad()
    loss.backward()
    by_hand.optimizer.step()
    by_hand.epochs_done = 1
    assert_same_state(by_hand.state_tensors(), reference.state_tensors())


def test_block_gradient_reaches_only_its_own_block(small):
    """Block 1's loss gives gradient to every parameter of block 1 and to nothing else: the
    leaves of its graph are exactly block 1's parameters, so neither the fixed one-hot embedding
    nor anything its input z_0 is built from (it is sampled from the label) requires grad.
    Other units' states are checked untouched by test_training_one_block_leaves_other_units_untouched."""
    _, data, setup = small
    block1 = UnitRunner(block(1), setup, data.train)
    idx = torch.arange(64)
    loss = block_loss(block1, idx, epoch_noise(setup, 1, 1, LIMIT))
    assert graph_leaves(loss) == {id(p) for p in block1.module.parameters()}
    assert not block1.embedding.requires_grad
    loss.backward()
    grads = [p.grad for p in block1.module.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_training_one_block_leaves_other_units_untouched(small):
    """Epochs of block 1 change block 1 only: block 2's and the head's weights and optimizer
    state, and the one-hot embedding, stay bit-identical."""
    _, data, setup = small
    block1, block2, head = (UnitRunner(u, setup, data.train) for u in (block(1), block(2), HEAD))
    block2.run_epoch(1)  # so that block 2 has optimizer state that could be disturbed
    before1, before2, before_head = block1.state_tensors(), block2.state_tensors(), head.state_tensors()
    block1.run_epoch(1)
    block1.run_epoch(2)
    assert states_differ(before1, block1.state_tensors())
    assert_same_state(before2, block2.state_tensors())
    assert_same_state(before_head, head.state_tensors())
    assert torch.equal(block1.embedding.detach(), torch.eye(data.num_classes))
    assert torch.equal(setup.embedding, torch.eye(data.num_classes))


def test_learned_embedding_gets_gradient_and_is_averaged(small):
    """With a learned embedding, block t's loss reaches its block and its own copy of W_embed
    and nothing else; each unit's copy moves, and average_embeddings is their mean."""
    _, data, _ = small
    setup = setup_for(small, **{"model.embedding": "learned"})
    assert setup.embedding.shape == (data.num_classes, 20)
    block1, head = UnitRunner(block(1), setup, data.train), UnitRunner(HEAD, setup, data.train)
    loss = block_loss(block1, torch.arange(64), epoch_noise(setup, 1, 1, LIMIT))
    assert graph_leaves(loss) == {id(p) for p in block1.module.parameters()} | {id(block1.embedding)}
    loss.backward()
    assert block1.embedding.grad is not None and float(block1.embedding.grad.abs().sum()) > 0
    block1.optimizer.zero_grad()
    block1.run_epoch(1)
    head.run_epoch(1)
    assert not torch.equal(block1.embedding.detach(), setup.embedding)
    assert not torch.equal(head.embedding.detach(), setup.embedding)
    avg = average_embeddings([block1.embedding, head.embedding])
    torch.testing.assert_close(avg, (block1.embedding.detach() + head.embedding.detach()) / 2)
    block1.set_embedding(avg)
    assert torch.equal(block1.embedding.detach(), avg)


def test_prototype_embedding_is_a_training_image_of_each_class(small):
    """Prototype init (Sec. 2.2.1): row k of W_embed is one of class k's (normalised) images."""
    _, data, _ = small
    setup = setup_for(small, **{"model.embedding": "prototype"})
    images = normalize(np.asarray(data.train.x), data.mean, data.std).reshape(len(data.train), -1)
    assert setup.embedding.shape == (data.num_classes, images.shape[1])
    for k in range(data.num_classes):
        own = images[torch.from_numpy(data.train.y == k)]
        others = images[torch.from_numpy(data.train.y != k)]
        assert (own == setup.embedding[k]).all(1).any(), f"class {k}"
        assert not (others == setup.embedding[k]).all(1).any(), f"class {k}"


# ------------------------------------------------------------------ learning

def test_block_loss_falls(small):
    """Block 1's weighted denoising loss falls over six epochs on 256 digits."""
    _, data, setup = small
    runner = UnitRunner(block(1), setup, data.train)
    losses = [runner.run_epoch(e)["loss"] for e in range(1, 7)]
    assert losses[-1] < 0.85 * losses[0], losses


def test_head_cross_entropy_falls(small):
    """The head's CE on z_T ~ q(z_T|y) falls from about log(10) within three epochs."""
    _, data, setup = small
    runner = UnitRunner(HEAD, setup, data.train)
    losses = [runner.run_epoch(e)["loss"] for e in range(1, 4)]
    assert losses[0] < np.log(10) + 0.5
    assert losses[-1] < 0.8 * losses[0], losses


# ------------------------------------------------------------------ determinism and resume

@pytest.mark.parametrize("unit", [block(1), HEAD], ids=["block", "head"])
def test_same_seed_same_weights_other_seed_other_weights(small, unit):
    """train_unit is a pure function of (seed, unit, epochs): bit-identical state twice."""
    _, data, setup = small
    first = train_unit(unit, setup, data.train, epochs=2).state_tensors()
    second = train_unit(unit, setup, data.train, epochs=2).state_tensors()
    assert_same_state(first, second)
    other = train_unit(unit, setup_for(small, **{"train.seed": "1"}), data.train, epochs=2).state_tensors()
    assert states_differ(first, other)


def test_units_do_not_depend_on_the_global_rng(small):
    """Reseeding or consuming the global torch RNG between runs changes nothing."""
    _, data, setup = small
    torch.manual_seed(0)
    first = train_unit(block(2), setup, data.train, epochs=1).state_tensors()
    torch.manual_seed(999)
    torch.rand(1000)
    second = train_unit(block(2), setup, data.train, epochs=1).state_tensors()
    assert_same_state(first, second)


@pytest.mark.parametrize("unit", [block(1), HEAD], ids=["block", "head"])
def test_resume_from_state_tensors_is_exact(small, unit):
    """Save after epoch 1 (through safetensors bytes), load into a fresh runner, train epoch 2:
    bit-identical to two uninterrupted epochs (weights, optimizer moments, epochs_done)."""
    _, data, setup = small
    straight = train_unit(unit, setup, data.train, epochs=2).state_tensors()
    first = UnitRunner(unit, setup, data.train)
    first.run_epoch(1)
    saved = tensors_from_bytes(tensors_to_bytes(first.state_tensors()), "test")
    resumed = UnitRunner(unit, setup, data.train)
    resumed.load_state_tensors(saved)
    assert resumed.epochs_done == 1
    assert_same_state(resumed.state_tensors(), first.state_tensors())
    resumed.run_epoch(2)
    assert_same_state(resumed.state_tensors(), straight)
    assert int(straight["epochs_done"]) == 2
    assert any(k.startswith("optim/") for k in straight)


def test_run_epoch_rejects_out_of_order_epochs(small):
    _, data, setup = small
    runner = UnitRunner(block(1), setup, data.train)
    with pytest.raises(RuntimeError):
        runner.run_epoch(2)


@pytest.mark.parametrize("unit", [block(2), HEAD], ids=["block", "head"])
def test_epoch_noise_is_the_noise_run_epoch_uses(small, unit):
    """The noise recipe: run_epoch(noise=epoch_noise(...)) equals run_epoch() bit for bit, and
    other noise gives other weights (so the argument is really used)."""
    _, data, setup = small
    implicit, explicit, other = (UnitRunner(unit, setup, data.train) for _ in range(3))
    noise = epoch_noise(setup, unit, 1, LIMIT)
    expected_shape = (setup.train.head_passes, LIMIT, 10) if unit == HEAD else (LIMIT, 10)
    assert noise.shape == expected_shape
    implicit.run_epoch(1)
    explicit.run_epoch(1, noise=noise.clone())
    assert_same_state(implicit.state_tensors(), explicit.state_tensors())
    other.run_epoch(1, noise=epoch_noise(setup, unit, 2, LIMIT))
    assert states_differ(implicit.state_tensors(), other.state_tensors())


def test_epoch_noise_differs_between_units_and_epochs(small):
    _, _, setup = small
    a = epoch_noise(setup, 1, 1, LIMIT)
    assert torch.equal(a, epoch_noise(setup, 1, 1, LIMIT))
    assert not torch.equal(a, epoch_noise(setup, 2, 1, LIMIT))
    assert not torch.equal(a, epoch_noise(setup, 1, 2, LIMIT))


# ------------------------------------------------------------------ the block (Figure 6)

@pytest.mark.parametrize("preset", sorted(BLOCK_SIZES))
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8)], ids=lambda s: "x".join(map(str, s)))
def test_block_shapes(shape, preset):
    """Every block preset takes MNIST, CIFAR and 8x8 digits and gives (B, m) logits."""
    torch.manual_seed(0)
    m, d = 10, 20
    block = DTBlock(shape, d, m, BLOCK_SIZES[preset], dropout=0.2)
    x, z = torch.randn(3, *shape), torch.randn(3, d)
    assert block(z, x).shape == (3, m)
    block.eval()
    out = block(z[:1], x[:1])
    assert out.shape == (1, m) and torch.isfinite(out).all()


def test_block_rejects_inputs_too_small_for_two_pools():
    with pytest.raises(ValueError):
        DTBlock((1, 3, 3), 10, 10, BLOCK_SIZES["tiny"])


def test_paper_block_matches_figure_6():
    """paper preset = Figure 6: convs 32/64/128 (3x3, pad 1), two max-pools, three dropouts 0.2,
    FC 256 + BN on the image; FC-BN-ReLU + residual FC-BN-ReLU-FC-BN on the label; fused
    512 -> 256 -> 128 -> m; flatten after the second pool (no global pooling)."""
    m, d = 10, 10
    block = DTBlock((1, 28, 28), d, m, BLOCK_SIZES["paper"], dropout=0.2)
    img = list(block.image_path)
    convs = [l for l in img if isinstance(l, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 32, (3, 3), (1, 1)), (32, 64, (3, 3), (1, 1)), (64, 128, (3, 3), (1, 1))]
    assert [type(l).__name__ for l in img] == [
        "Conv2d", "ReLU", "MaxPool2d", "Dropout", "Conv2d", "ReLU", "Dropout",
        "Conv2d", "ReLU", "MaxPool2d", "Dropout", "Flatten", "Linear", "BatchNorm1d"]
    assert all(l.p == 0.2 for l in img if isinstance(l, nn.Dropout))
    fc_image = img[-2]
    assert (fc_image.in_features, fc_image.out_features) == (128 * 7 * 7, 256)
    assert not any(isinstance(l, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)) for l in block.modules())

    def linears(seq):
        return [(l.in_features, l.out_features) for l in seq if isinstance(l, nn.Linear)]

    assert linears(block.label_in) == [(d, 256)]
    assert [type(l).__name__ for l in block.label_in] == ["Linear", "BatchNorm1d", "ReLU"]
    assert linears(block.label_residual) == [(256, 256), (256, 256)]
    assert [type(l).__name__ for l in block.label_residual] == [
        "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert linears(block.fused) == [(512, 256), (256, 128), (128, m)]
    assert [type(l).__name__ for l in block.fused] == [
        "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert sum(isinstance(l, nn.BatchNorm1d) for l in block.modules()) == 6



@pytest.mark.parametrize("n, world", [(64, 2), (63, 2), (10, 3), (5, 4)])
def test_data_parallel_shards_partition_each_global_batch(n, world):
    """units.shard (one definition, also the backprop trainer's): contiguous shares, in rank
    order, sizes differing by at most one."""
    from noprop_dist.variants import backprop
    from noprop_dist.training import runner as units

    assert backprop.shard is units.shard and backprop.RANK_STREAM_STRIDE == units.RANK_STREAM_STRIDE
    idx = torch.randperm(n)
    parts = [units.shard(idx, r, world) for r in range(world)]
    assert torch.equal(torch.cat(parts), idx)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
