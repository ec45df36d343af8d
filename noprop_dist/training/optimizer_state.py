"""An optimizer's per-parameter state as flat, tensors-only checkpoint entries (and back)."""

from __future__ import annotations

import torch


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as flat ``optim/<param index>/<name>`` tensors."""
    return {f"optim/{idx}/{key}": torch.as_tensor(value)
            for idx, state in optimizer.state_dict()["state"].items() for key, value in state.items()}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`optimizer_state_tensors` flattened (hyperparameters stay the optimizer's)."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
