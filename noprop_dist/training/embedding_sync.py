"""Synchronising a learned (or prototype) label embedding W_embed across independent units.

In the paper every unit's loss is part of one objective, so W_embed follows the *sum* of the
units' gradients: block t's term is weighted by ``(T/2) eta (SNR(t) - SNR(t-1))``, and the
high-SNR blocks (weights of thousands) dominate the update, the low-SNR ones (about 0.01)
barely move it. Units trained independently cannot share one W_embed step by step; two ways
to synchronise them every ``train.embed_sync_every`` epochs (``train.embed_sync``):

``average``
    Each unit moves its own copy with its own AdamW; the trainer averages the copies. Adam
    normalises each copy's update, which cancels the loss weights: block 1 moves W_embed as
    much as block T.

``summed_gradient``
    Units do not move W_embed at all during the interval. Each records the gradient of its
    loss with respect to W_embed at every optimiser step and hands the sequence over at the
    sync; :class:`EmbeddingOwner` (held by the trainer) sums the units' gradients step by step
    and applies one AdamW step per training step, as joint training would. What is lost to
    independence: within an interval the units see the W_embed of its start (stale by at
    most ``embed_sync_every`` epochs). The head takes ``head_passes`` steps per block step;
    its gradients are averaged over the passes of each step.
"""

from __future__ import annotations

import torch

from noprop_dist.config import TrainConfig
from noprop_dist.training.runner import lr_factor

MODES = ("average", "summed_gradient")


def per_step(grads: torch.Tensor, steps: int) -> torch.Tensor:
    """A unit's recorded gradients (S, m, d) as ``steps`` block steps (K, m, d): the head's
    ``passes * K`` steps are averaged over its passes (pass p, step k is row p * K + k)."""
    if grads.shape[0] == steps:
        return grads
    passes, rest = divmod(grads.shape[0], steps)
    if rest or passes < 1:
        raise ValueError(f"{grads.shape[0]} recorded steps do not divide into {steps} block steps")
    return grads.view(passes, steps, *grads.shape[1:]).mean(0)


class EmbeddingOwner:
    """The one W_embed of a ``summed_gradient`` run and its AdamW (the units' hyperparameters)."""

    def __init__(self, embedding: torch.Tensor, train: TrainConfig):
        self.train = train
        self.weight = torch.nn.Parameter(embedding.detach().float().clone())
        self.optimizer = torch.optim.AdamW([self.weight], lr=train.lr, weight_decay=train.weight_decay)

    def lr_factors(self, epoch: int, steps: int) -> list[float]:
        """The units' ``lr_factor`` at each of the ``steps`` block steps since the last sync
        point: the epochs after the last multiple of ``embed_sync_every`` below ``epoch``,
        each with the same number of steps."""
        every = self.train.embed_sync_every
        first = (epoch - 1) // every * every + 1
        per_epoch = max(1, steps // (epoch - first + 1))
        return [lr_factor(self.train, min(first + j // per_epoch, epoch), 0, 1, j % per_epoch + 1, per_epoch)
                for j in range(steps)]

    def apply(self, unit_grads: list[torch.Tensor], epoch: int) -> torch.Tensor:
        """Sum the units' gradients step by step (units in a fixed order) and take one AdamW
        step per block step (the fewest steps any unit recorded), at the units' learning rate
        of that step (``train.lr_schedule``); returns the new W_embed. ``epoch``: the sync
        point, the last epoch of the steps."""
        steps = min(len(g) for g in unit_grads)
        aligned = [per_step(g.float(), steps) for g in unit_grads]
        total = torch.stack(aligned).sum(0)                                  # (K, m, d)
        for grad, factor in zip(total, self.lr_factors(epoch, steps)):
            self.optimizer.param_groups[0]["lr"] = self.train.lr * factor
            self.weight.grad = grad.clone()
            self.optimizer.step()
        self.weight.grad = None
        return self.weight.detach().clone()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        state = self.optimizer.state.get(self.weight, {})
        out = {"weight": self.weight.detach().clone()}
        out.update({f"optim/{k}": torch.as_tensor(v).clone() for k, v in state.items()})
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.weight.copy_(tensors["weight"])
        state = {k[len("optim/"):]: v.clone() for k, v in tensors.items() if k.startswith("optim/")}
        if state:
            self.optimizer.state[self.weight] = state
