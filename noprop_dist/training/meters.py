"""What a training step costs, measured: the activations autograd saves (:class:`SavedTensorMeter`),
parameters + gradients + optimizer state (:func:`training_state_bytes`), the process's peak RSS."""

from __future__ import annotations

import resource

import torch
from torch import nn


class SavedTensorMeter:
    """Counts the bytes autograd saves for backward (activations), excluding parameters."""

    def __init__(self, enabled: bool, module: nn.Module):
        self.enabled = enabled
        self.bytes = 0
        self._seen: set[int] = set()
        self._module = module
        self._param_ptrs: set[int] = set()
        self._ctx = None

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in self._seen and ptr not in self._param_ptrs:
            self._seen.add(ptr)
            self.bytes += tensor.untyped_storage().nbytes()
        return tensor

    def __enter__(self) -> "SavedTensorMeter":
        if self.enabled:
            self._param_ptrs = {p.untyped_storage().data_ptr() for p in self._module.parameters()}
            self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


def training_state_bytes(params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> int:
    """Parameters + their gradients + optimizer state, in bytes."""
    total = sum(t.numel() * t.element_size() for t in params)
    total += sum(t.numel() * t.element_size() for t in params if t.requires_grad)
    return total + sum(v.numel() * v.element_size() for st in optimizer.state.values()
                       for v in st.values() if torch.is_tensor(v))


def rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
