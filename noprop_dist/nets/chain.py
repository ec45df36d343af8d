"""The sequential inference chain (Eq. 3) and evaluation.

Inference is the only place where blocks are chained::

    z_0 ~ N(0, I)
    z_t = a_t * u_hat_t(z_{t-1}, x) + b_t * z_{t-1} + sqrt(c_t) * eps_t      t = 1..T
    prediction = argmax p_out(y | z_T)        (also reported: nearest class embedding to z_T)

:class:`NoPropChain` takes the noise as an input tensor so that it is a pure function that
``torch.export``/TorchScript can capture; :func:`draw_noise` makes that tensor. Evaluation
never builds any ``z`` from a label: labels are used only to score finished predictions.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from noprop_dist.core import schedule
from noprop_dist.data import ArraySplit, normalize
from noprop_dist.nets.blocks import denoised_embedding


class NoPropChain(nn.Module):
    """T trained blocks, the head and the embedding, chained as in Eq. 3."""

    def __init__(self, blocks: list[nn.Module], head: nn.Module, embedding: torch.Tensor,
                 alpha_bar: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        coef = schedule.posterior_coefficients(np.asarray(alpha_bar, dtype=np.float64))
        self.register_buffer("embedding", embedding.detach().float().clone())              # (m, d)
        self.register_buffer("a", torch.tensor(coef.a[1:], dtype=torch.float32))           # (T,)
        self.register_buffer("b", torch.tensor(coef.b[1:], dtype=torch.float32))           # (T,)
        self.register_buffer("sqrt_c", torch.tensor(np.sqrt(coef.c[1:]), dtype=torch.float32))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    @property
    def T(self) -> int:
        return len(self.blocks)

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Head logits for normalised images ``x`` (B, C, H, W).

        ``noise`` (T+1, B, d): row 0 is z_0, rows 1..T are eps_t (pass zeros there to drop
        the sqrt(c_t) term).
        """
        return self.head(self.final_latent(x, noise))                      # (B, m)

    def final_latent(self, x: torch.Tensor, noise: torch.Tensor,
                     trace: list[torch.Tensor] | None = None) -> torch.Tensor:
        """z_T of the chain (same arguments as :meth:`forward`); ``trace`` (if given) receives
        each block's logits inside the chain, block 1 first."""
        z = noise[0]                                                       # (B, d)
        for t, block in enumerate(self.blocks):
            logits = block(z, x)                                           # (B, m)
            if trace is not None:
                trace.append(logits)
            u_hat = denoised_embedding(logits, self.embedding)             # (B, d)
            z = self.a[t] * u_hat + self.b[t] * z + self.sqrt_c[t] * noise[t + 1]
        return z                                                           # (B, d)


class RawImageChain(nn.Module):
    """The exported predictor: raw images (uint8 0..255 or float) in, class logits out."""

    def __init__(self, chain: NoPropChain):
        super().__init__()
        self.chain = chain

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if images.dtype == torch.uint8:
            x = x / 255.0
        x = (x - self.chain.mean) / self.chain.std
        return self.chain(x, noise)


def draw_noise(T: int, batch: int, d: int, generator: torch.Generator, with_eps: bool) -> torch.Tensor:
    """(T+1, B, d): z_0 and, when ``with_eps``, the eps_t of Eq. 3 (else zeros)."""
    noise = torch.randn(T + 1, batch, d, generator=generator)
    if not with_eps:
        noise[1:] = 0.0
    return noise


@torch.no_grad()
def evaluate(chain: NoPropChain, split: ArraySplit, batch_size: int, seed: int,
             device: torch.device | str = "cpu", max_batch: int | None = None) -> dict:
    """Accuracies of the chain (head and nearest-embedding, with and without the Eq. 3 noise)
    and of each block alone fed fresh noise z ~ N(0, I). Labels only score the predictions.

    The noise is drawn per ``batch_size`` examples (so the scores depend on the seed and
    ``eval.batch_size`` only); ``max_batch`` splits each batch into forward passes that fit
    the device's memory without changing any draw."""
    chain = chain.to(device).eval()
    n, d, T = len(split), chain.embedding.shape[1], chain.T
    mean = tuple(chain.mean.flatten().tolist())
    std = tuple(chain.std.flatten().tolist())
    keys = ["head_noise", "head_no_noise", "nearest_noise", "nearest_no_noise"]
    predictions = {k: [] for k in keys + [f"block_{t:02d}" for t in range(1, T + 1)]
                   + [f"in_chain_{t:02d}" for t in range(1, T + 1)]}
    gen = torch.Generator().manual_seed(seed)
    step = min(batch_size, max_batch or batch_size)
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        noise = draw_noise(T, b, d, gen, with_eps=True)                               # (T+1, B, d)
        fresh = torch.randn(b, d, generator=gen)                                      # (B, d)
        for lo in range(0, b, step):
            hi = min(b, lo + step)
            x = normalize(np.asarray(split.x[start + lo:start + hi]), mean, std).to(device)
            for with_eps in (True, False):
                tag = "noise" if with_eps else "no_noise"
                part = noise[:, lo:hi]
                run_noise = part if with_eps else torch.cat([part[:1], torch.zeros_like(part[1:])])
                trace: list[torch.Tensor] = []
                z_T = chain.final_latent(x, run_noise.to(device), trace)              # (b, d)
                if with_eps:
                    for t, logits in enumerate(trace, start=1):
                        predictions[f"in_chain_{t:02d}"].append(logits.argmax(-1).cpu())
                predictions[f"head_{tag}"].append(chain.head(z_T).argmax(-1).cpu())
                dist = torch.cdist(z_T, chain.embedding)                              # (b, m)
                predictions[f"nearest_{tag}"].append(dist.argmin(-1).cpu())
            z = fresh[lo:hi].to(device)
            for t, block in enumerate(chain.blocks, start=1):
                predictions[f"block_{t:02d}"].append(block(z, x).argmax(-1).cpu())
    y = torch.from_numpy(np.array(split.y))
    acc = {k: float((torch.cat(v) == y).float().mean()) for k, v in predictions.items()}
    return {
        "chain_accuracy_noise": acc["head_noise"],
        "chain_accuracy_no_noise": acc["head_no_noise"],
        "nearest_accuracy_noise": acc["nearest_noise"],
        "nearest_accuracy_no_noise": acc["nearest_no_noise"],
        "block_alone_accuracy": {k: v for k, v in acc.items() if k.startswith("block_")},
        # Block t's own prediction inside the chain (with the Eq. 3 noise), fed the chain's z_{t-1}.
        "block_in_chain_accuracy": {k.replace("in_chain", "block"): v for k, v in acc.items()
                                    if k.startswith("in_chain_")},
    }


@torch.no_grad()
def predict(chain: NoPropChain, x: torch.Tensor, seed: int, with_eps: bool = True) -> torch.Tensor:
    """Class predictions for normalised images (B, C, H, W)."""
    chain = chain.eval()
    gen = torch.Generator().manual_seed(seed)
    noise = draw_noise(chain.T, x.shape[0], chain.embedding.shape[1], gen, with_eps)
    return chain(x, noise.to(x.device)).argmax(-1)
