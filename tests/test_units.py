"""Tests of noprop_dist.training.runner (training one unit) and of the networks in noprop_dist.nets.blocks.

Guards the heart of NoProp-DT: block t learns from its own closed-form target only, training
is a pure function of (seed, unit, epoch), and a checkpointed unit resumes bit-exactly.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from noprop_dist.rundir import tensors_from_bytes, tensors_to_bytes
from noprop_dist.config import apply_overrides, validate
from noprop_dist.data import load_dataset, normalize
from noprop_dist.nets.blocks import BLOCK_SIZES, DTBlock
from noprop_dist.variants.base import HEAD
from noprop_dist.variants.dt import DTObjective, block
from noprop_dist.variants.base import DROPOUT, average_embeddings, derive_seed, epoch_order, make_setup
from noprop_dist.config import TrainConfig
from noprop_dist.training.runner import UnitRunner, lr_factor, train_unit


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
    """Block t's loss on the examples ``idx``: the DT variant's own ``batch_loss`` on the batch
    run_epoch builds (normalised images, labels, the epoch noise's rows). Its value is checked
    against Eq. 8 worked out by hand in test_dt_block_loss_is_eq8_by_hand."""
    train, setup = runner.train, runner.setup
    x = normalize(np.asarray(train.x[idx.numpy()]), setup.mean, setup.std)       # (B, C, H, W)
    y = torch.from_numpy(np.asarray(train.y)[idx.numpy()])                        # (B,)
    return DTObjective().batch_loss(runner, x, y, noise[idx])


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
    """block_loss (above: DTObjective.batch_loss on a batch built by hand) is exactly the loss
    run_epoch descends: one full-batch step by hand equals one epoch of run_epoch. This makes
    the gradient-locality tests meaningful."""
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


# ------------------------------------------------------------------ the loss, worked out by hand (Eq. 8)

class Recorder(nn.Module):
    """A stand-in unit module: records its inputs and returns the given logits."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits, self.calls = logits, []

    def forward(self, *inputs):
        self.calls.append(inputs)
        return self.logits


def fake_runner(setup, unit, logits, embedding):
    """What ``batch_loss`` reads from a runner: its setup, unit, module and W_embed copy."""
    return SimpleNamespace(setup=setup, unit=unit, module=Recorder(logits), embedding=embedding)


def softmax64(row) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def test_dt_block_loss_is_eq8_by_hand(small):
    """Block t's loss, worked out from Eq. 8 in float64 plain Python: the block sees
    z_{t-1} = sqrt(ab_{t-1}) u_y + sqrt(1 - ab_{t-1}) eps (and the images unchanged), and the
    loss is (T/2) eta (SNR(t) - SNR(t-1)) * mean_b ||softmax(logits_b) W_embed - u_y||^2,
    with SNR(s) = ab_s / (1 - ab_s). A general W_embed (m x d, d != m) and logits."""
    _, _, setup = small
    gen = torch.Generator().manual_seed(7)
    m, d, t = setup.num_classes, 3, 2
    W = torch.randn(m, d, generator=gen)
    logits = torch.randn(4, m, generator=gen) * 2
    eps = torch.randn(4, d, generator=gen)
    y = torch.tensor([3, 0, 9, 3])
    x = torch.randn(4, *setup.input_shape, generator=gen)
    runner = fake_runner(setup, block(t), logits, W)
    loss = DTObjective().batch_loss(runner, x, y, eps)

    ab, T, eta = setup.alpha_bar, setup.T, setup.train.eta
    weight = T / 2 * eta * (ab[t] / (1 - ab[t]) - ab[t - 1] / (1 - ab[t - 1]))
    Wl, el, ll = W.double().tolist(), eps.double().tolist(), logits.double().tolist()
    per_example = []
    for b, label in enumerate(y.tolist()):
        p = softmax64(ll[b])
        u_hat = [sum(p[k] * Wl[k][j] for k in range(m)) for j in range(d)]
        per_example.append(sum((u_hat[j] - Wl[label][j]) ** 2 for j in range(d)))
    expected = weight * sum(per_example) / len(per_example)
    assert weight > 0 and expected > 0
    assert float(loss) == pytest.approx(expected, rel=1e-5)

    (z_seen, x_seen), = runner.module.calls
    z_expected = [[math.sqrt(ab[t - 1]) * Wl[label][j] + math.sqrt(1 - ab[t - 1]) * el[b][j] for j in range(d)]
                  for b, label in enumerate(y.tolist())]
    torch.testing.assert_close(z_seen.double(), torch.tensor(z_expected, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    assert x_seen is x


def test_dt_block_loss_identities(small):
    """Two closed forms of block t's loss with the one-hot embedding: logits sure of the true
    class give u_hat = u_y (loss 0); uniform logits give u_hat = (1/m, ..., 1/m), so
    ||u_hat - e_y||^2 = (1 - 1/m)^2 + (m - 1)/m^2 = (m - 1)/m for every example."""
    _, _, setup = small
    m, T, eta = setup.num_classes, setup.T, setup.train.eta
    W = torch.eye(m)
    y = torch.tensor([1, 4, 4, 8, 0])
    eps = torch.randn(len(y), m, generator=torch.Generator().manual_seed(1))
    x = torch.zeros(len(y), *setup.input_shape)
    for t in range(1, T + 1):
        ab = setup.alpha_bar
        weight = T / 2 * eta * (ab[t] / (1 - ab[t]) - ab[t - 1] / (1 - ab[t - 1]))
        sure = torch.nn.functional.one_hot(y, m).float() * 60.0
        assert float(DTObjective().batch_loss(fake_runner(setup, block(t), sure, W), x, y, eps)) <= 1e-12
        uniform = torch.full((len(y), m), 0.3)
        got = float(DTObjective().batch_loss(fake_runner(setup, block(t), uniform, W), x, y, eps))
        assert got == pytest.approx(weight * (m - 1) / m, rel=1e-6), t


@pytest.mark.parametrize("embedding", ["one_hot", "learned"])
def test_dt_head_loss_is_eq8_by_hand(small, embedding):
    """The head's loss, from Eq. 8 in float64 plain Python: the head sees only
    z_T = sqrt(ab_T) u_y + sqrt(1 - ab_T) eps (no image) and its loss is the cross-entropy
    -logit_y + log sum_k exp(logit_k), plus, for a learned W_embed only,
    KL(N(sqrt(ab_0) u_y, (1 - ab_0) I) || N(0, I)) = 0.5 sum_j (ab_0 u_j^2 + (1 - ab_0) - 1 - log(1 - ab_0))."""
    setup = small[2] if embedding == "one_hot" else setup_for(small, **{"model.embedding": embedding})
    assert setup.learnable_embedding == (embedding == "learned")
    gen = torch.Generator().manual_seed(11)
    m, d = setup.num_classes, 6
    W = torch.randn(m, d, generator=gen)
    logits = torch.randn(5, m, generator=gen) * 3
    eps = torch.randn(5, d, generator=gen)
    y = torch.tensor([2, 2, 7, 0, 5])
    runner = fake_runner(setup, HEAD, logits, W)
    loss = DTObjective().batch_loss(runner, None, y, eps)

    ab, Wl, ll = setup.alpha_bar, W.double().tolist(), logits.double().tolist()
    ce = [-ll[b][label] + math.log(sum(math.exp(v) for v in ll[b])) for b, label in enumerate(y.tolist())]
    expected = sum(ce) / len(ce)
    if embedding == "learned":
        kl = [0.5 * sum(ab[0] * Wl[label][j] ** 2 + (1 - ab[0]) - 1 - math.log(1 - ab[0]) for j in range(d))
              for label in y.tolist()]
        assert min(kl) > 0
        expected += sum(kl) / len(kl)
    assert float(loss) == pytest.approx(expected, rel=1e-5)

    (z_seen,), = runner.module.calls
    el = eps.double().tolist()
    z_expected = [[math.sqrt(ab[-1]) * Wl[label][j] + math.sqrt(1 - ab[-1]) * el[b][j] for j in range(d)]
                  for b, label in enumerate(y.tolist())]
    torch.testing.assert_close(z_seen.double(), torch.tensor(z_expected, dtype=torch.float64), rtol=1e-6, atol=1e-6)


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


@pytest.mark.parametrize("lr_schedule", ["constant", "cosine"])
@pytest.mark.parametrize("unit", [block(1), HEAD], ids=["block", "head"])
def test_resume_from_state_tensors_is_exact(small, unit, lr_schedule):
    """Save after epoch 1 (through safetensors bytes), load into a fresh runner, train epoch 2:
    bit-identical to two uninterrupted epochs (weights, optimizer moments, epochs_done), with
    either learning-rate schedule (the cosine one is a function of the step counters alone)."""
    _, data, _ = small
    setup = setup_for(small, **{"train.lr_schedule": lr_schedule, "train.epochs": "3"})
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


def all_factors(train: TrainConfig, passes: int, steps: int) -> list[float]:
    """lr_factor at every step of a run, in the order the runner takes them."""
    return [lr_factor(train, e, p, passes, s, steps)
            for e in range(1, train.epochs + 1) for p in range(passes) for s in range(1, steps + 1)]


@pytest.mark.parametrize("passes,steps", [(1, 7), (10, 3)])
def test_lr_factor_constant_and_cosine(passes, steps):
    """constant: 1 at every step. cosine: 1 at the first step, strictly decreasing over the run
    (a multi-pass head's passes included), 0.5 halfway, just above 0 at the last step."""
    assert set(all_factors(TrainConfig(epochs=4, lr_schedule="constant"), passes, steps)) == {1.0}
    cosine = TrainConfig(epochs=4, lr_schedule="cosine")
    factors = all_factors(cosine, passes, steps)
    assert factors[0] == 1.0
    assert all(b < a for a, b in zip(factors, factors[1:]))
    assert lr_factor(cosine, 3, 0, passes, 1, steps) == pytest.approx(0.5, abs=1e-12)
    n = len(factors)
    assert factors[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * (n - 1) / n)), abs=1e-12)
    assert 0 < factors[-1] < 1e-2
    assert lr_factor(cosine, 5, 0, passes, 1, steps) == 0.0   # a resumed run past train.epochs: no step


def test_cosine_schedule_drives_the_optimizer(small):
    """The runner sets lr = train.lr * lr_factor before each step: after a cosine run the
    optimizer holds the last step's rate, the weights differ from a constant run's after
    the first step, and a constant run keeps train.lr."""
    _, data, _ = small
    runs = {}
    for kind in ("constant", "cosine"):
        setup = setup_for(small, **{"train.lr_schedule": kind, "train.epochs": "2"})
        runner = train_unit(block(1), setup, data.train, epochs=2)
        steps = math.ceil(len(data.train) / setup.train.batch_size)
        expected = setup.train.lr * lr_factor(setup.train, 2, 0, 1, steps, steps)
        assert [g["lr"] for g in runner.optimizer.param_groups] == [expected] * len(runner.optimizer.param_groups)
        runs[kind] = runner.state_tensors()
    assert states_differ(runs["constant"], runs["cosine"])


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
    """data_parallel.shard (the one definition every data-parallel unit uses): contiguous
    shares, in rank order, sizes differing by at most one."""
    from noprop_dist.training.data_parallel import shard

    idx = torch.randperm(n)
    parts = [shard(idx, r, world) for r in range(world)]
    assert torch.equal(torch.cat(parts), idx)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
