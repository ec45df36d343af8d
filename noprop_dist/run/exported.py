"""Calling an exported predictor (``noprop-dist export RUN model.pt2``, :func:`~noprop_dist.run.results.export_run`).

The program takes raw images ``(N, C, H, W)`` of the training data's dtype (uint8 0..255 for
the builtin datasets; channels first, whatever ``data.layout`` the run read) and the noise of
its inference chain, which :func:`inference_noise` draws in the shape the program was
exported with::

    program = torch.export.load("model.pt2")
    noise = inference_noise(program, len(images), seed=0)
    logits = program.module()(images, noise)

``logits`` is ``(N, classes)``; ``logits.argmax(-1)`` are the predicted classes. The noise
shapes: DT ``(T+1, N, d)`` (z_0, then the eps_t of Eq. 3), CT ``(S+1, N, d)``, FM ``(1, N, d)``,
a back-propagation baseline ``(N, d)`` (its z_0); ``d`` is the embedding width (the number of
classes for the one-hot embedding). The draws are those of ``noprop-dist eval`` for one
evaluation batch of N images with ``eval.seed = seed``.
"""

from __future__ import annotations

import torch


def noise_shape(program: torch.export.ExportedProgram, batch: int) -> tuple[int, ...]:
    """The shape of ``program``'s noise input (its second) for ``batch`` images: the exported
    shape with its batch dimension (the one torch.export keeps symbolic) set to ``batch``."""
    names = program.graph_signature.user_inputs
    if len(names) != 2:
        raise ValueError(f"not a noprop_dist predictor: it takes {len(names)} inputs, not (images, noise)")
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == names[1])
    return tuple(size if isinstance(size, int) else batch for size in node.meta["val"].shape)


def inference_noise(program: torch.export.ExportedProgram, batch: int, seed: int = 0,
                    with_noise: bool = True) -> torch.Tensor:
    """Standard normal noise of the shape ``program`` takes for ``batch`` images, from a CPU
    generator seeded with ``seed``. ``with_noise=False`` zeroes the chain's step noise (rows
    1.. of DT's and CT's noise: the deterministic chain), keeping its starting point z_0."""
    shape = noise_shape(program, batch)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if not with_noise and len(shape) == 3:
        noise[1:] = 0.0
    return noise
