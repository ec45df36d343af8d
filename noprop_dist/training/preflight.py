"""Checks that run before anything is written: does the network accept the data's images, and
does one training step of a unit fit the memory of the worker that will run it?

Both come from one dry run of the unit's forward pass on PyTorch's ``meta`` device: modules
and tensors there have shapes and dtypes but no storage, so a 3x512x512 batch costs nothing
to "run". A shape the network cannot take fails there (not after the run directory exists),
and the tensors autograd saves for backward are counted from their shapes: the same quantity
:class:`~noprop_dist.training.runner.SavedTensorMeter` counts during real training (the estimate is
about 10% above it: views that share storage are counted once each).

Each trainer calls :func:`check_step_fits` with its variant's probe (``dt.step_probe``,
``backprop.step_probe``) and the memory each of its workers has (:func:`host_memory_budget`,
or the Ray cluster's figure).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
from torch import nn

from noprop_dist.config import ClusterConfig
from noprop_dist.errors import ConfigError, DataError
from noprop_dist.variants.base import StepProbe

MEMORY_HEADROOM = 0.8
"""Share of a worker's free memory a unit may plan to use (the rest: Python, torch, data pages)."""


class StepTooLarge(ConfigError):
    """One training step of a unit does not fit the memory of its worker (a config problem:
    the batch size, the block size or the number of workers sharing a machine)."""


@dataclass(frozen=True)
class StepEstimate:
    """Peak bytes of one training step of a unit, from shapes."""

    state_bytes: int          # parameters + gradients + AdamW's two moments
    activation_bytes: int     # tensors saved for backward at the configured batch
    input_bytes: int          # the unit's per-epoch tensors (its target noise)
    batch_size: int
    per_example_bytes: int    # the part of activation_bytes that grows with the batch, per example

    @property
    def total(self) -> int:
        return self.state_bytes + self.activation_bytes + self.input_bytes

    def fits(self, room: float) -> int:
        """The largest batch whose step fits ``room`` bytes (may be < 1)."""
        fixed = self.total - self.per_example_bytes * self.batch_size
        return int((room - fixed) // self.per_example_bytes)


def estimate_step(probe: StepProbe, batch_size: int, what: str) -> StepEstimate:
    """Dry-run one training step of ``probe`` on the meta device; a shape error is a DataError.

    Two dry runs (the batch and a batch of 2) split the saved tensors into a part per example
    and a part that does not grow with the batch (e.g. transposed weights)."""
    try:
        module, saved = _dry_run(probe, batch_size)
        small = _dry_run(probe, 2)[1] if batch_size > 2 else saved
    except (ValueError, RuntimeError, IndexError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{what} do not fit {probe.name} ({text}); use images of at least 4x4 pixels or "
                        "another --model.block") from None
    per_example = (saved - small) // (batch_size - 2) if batch_size > 2 else saved // batch_size
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    return StepEstimate(state_bytes=params + 3 * trainable + buffers, activation_bytes=saved,
                        input_bytes=probe.fixed_bytes, batch_size=batch_size, per_example_bytes=max(1, per_example))


def _dry_run(probe: StepProbe, batch_size: int) -> tuple[nn.Module, int]:
    """(the module, bytes autograd saves for backward in one forward of ``batch_size``)."""
    with torch.device("meta"):
        module = probe.build()
        module.train()
        param_ids = {id(p) for p in module.parameters()}
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in param_ids:
                saved[id(t)] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            probe.forward(module, batch_size)
    return module, sum(saved.values())


def host_memory_budget() -> int:
    """Bytes this machine can still give a process: MemAvailable (Linux), else physical memory."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory_budget(device: torch.device) -> int:
    """Free bytes of ``device`` (a CUDA device's free memory; the host's for the CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return host_memory_budget()


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def check_step_fits(estimate: StepEstimate, budget_bytes: int, workers_sharing: int, where: str) -> None:
    """Refuse (before any work) a unit whose estimated step exceeds its share of ``budget_bytes``.

    ``workers_sharing`` units train at once on that memory (a node's workers, or the units of
    an in-process run that live together); each gets ``MEMORY_HEADROOM`` of an equal share."""
    share = int(budget_bytes * MEMORY_HEADROOM / max(1, workers_sharing))
    if estimate.total <= share:
        return
    fits = estimate.fits(share)
    lower = (f"lower --train.batch_size (about {int(fits)} fits)" if fits >= 2
             else "use smaller images, --model.block=small/tiny or a smaller --model.embed_dim")
    raise StepTooLarge(
        f"one training step needs about {gib(estimate.total)} (batch {estimate.batch_size}: activations "
        f"{gib(estimate.activation_bytes)}, weights and optimizer {gib(estimate.state_bytes)}) but each of "
        f"{workers_sharing} worker(s) on {where} has about {gib(share)}; {lower}, or run fewer workers at "
        "once (--cluster.workers)")


def fitting_batch(estimate: StepEstimate, budget_bytes: int, wanted: int) -> int:
    """The largest batch <= ``wanted`` whose forward pass fits ``budget_bytes`` (at least 1).

    Used for evaluation: no gradients, so the training activations are an upper bound."""
    return max(1, min(wanted, estimate.fits(budget_bytes * MEMORY_HEADROOM)))


def evaluation_batch(probe: StepProbe, wanted: int, budget_bytes: int, where: str) -> int:
    """The forward-pass size for an evaluation in batches of ``wanted``: the largest <= ``wanted``
    whose pass fits ``budget_bytes`` (free memory with the run's weights already loaded).

    A training step's saved activations bound a forward pass's (no gradients); refused in one
    line where not even one example fits."""
    step = estimate_step(probe, wanted, "the run's images")
    forward = replace(step, state_bytes=0, input_bytes=0)     # loaded already; no optimizer, no epoch noise
    room = budget_bytes * MEMORY_HEADROOM
    fits = forward.fits(room)
    if fits < 1:
        one = forward.total - forward.per_example_bytes * (wanted - 1)
        raise StepTooLarge(
            f"one evaluation pass of {probe.name} needs about {gib(one)} for a single example but {where} has "
            f"about {gib(room)} free; free memory (or evaluate on a machine with more) and run eval again")
    return min(wanted, fits)


def check_unit(probe: StepProbe, batch_size: int, input_shape: tuple[int, ...], budget_bytes: int | None,
               workers_sharing: int, where: str, units_held: int = 1) -> StepEstimate:
    """The trainers' one call: dry-run ``probe`` (shape check), then refuse a step that does not
    fit (skipped when ``budget_bytes`` is None: the worker's memory is not known here).
    ``units_held``: units whose weights and optimizer state live together in one worker."""
    estimate = estimate_step(probe, batch_size, "images of shape " + "x".join(str(v) for v in input_shape))
    estimate = replace(estimate, state_bytes=estimate.state_bytes * units_held)
    if budget_bytes is not None:
        check_step_fits(estimate, budget_bytes, workers_sharing, where)
    return estimate


def worker_memory(cluster: ClusterConfig, workers: int, gpus_per_worker: float,
                  resources: dict[str, float]) -> tuple[int | None, int, str]:
    """(bytes, workers sharing them, where) for the memory check of Ray workers.

    CPU workers share memory: this machine's free memory for a private Ray (no address), the
    cluster's ``memory`` resource (``resources``) spread over all workers otherwise. GPU
    workers: this machine's GPU 0 for a private Ray; a remote cluster's GPUs are not known
    from here (None: not checked)."""
    if gpus_per_worker > 0:
        if cluster.address or not torch.cuda.is_available():
            return None, workers, "the cluster's GPUs"
        per_gpu = max(1, round(1 / gpus_per_worker)) if gpus_per_worker < 1 else 1
        return device_memory_budget(torch.device("cuda", 0)), min(per_gpu, workers), "GPU 0"
    if cluster.address:
        memory = resources.get("memory")
        return (int(memory) if memory else None), workers, f"the cluster at {cluster.address}"
    return host_memory_budget(), workers, "this machine"
