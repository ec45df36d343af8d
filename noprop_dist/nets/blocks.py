"""Networks: the NoProp-DT block (paper Figure 6), the output head, and label embeddings.

Modules here only compute; training lives in :mod:`noprop_dist.training.runner`, the inference chain
in :mod:`noprop_dist.nets.chain`. The block returns class logits; the denoised embedding is
``softmax(logits) @ W_embed`` (:func:`denoised_embedding`), computed by the caller because
the embedding is shared state that the block does not own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from noprop_dist.core.schedule import denoised_embedding


@dataclass(frozen=True)
class BlockSize:
    """Widths of one block: three conv layers, then fully connected layers of ``width``."""

    channels: tuple[int, int, int]
    width: int


# `paper` is Figure 6 exactly; the others keep its structure with fewer channels for CPU demos.
BLOCK_SIZES = {
    "paper": BlockSize(channels=(32, 64, 128), width=256),
    "small": BlockSize(channels=(16, 32, 64), width=128),
    "tiny": BlockSize(channels=(8, 16, 16), width=32),
}


class DTBlock(nn.Module):
    """One NoProp-DT block u_hat_t(z_{t-1}, x) -> class logits (Figure 6).

    image path: conv-ReLU-maxpool-dropout, conv-ReLU-dropout, conv-ReLU-maxpool-dropout,
    flatten, FC, BN.  label path: FC-BN-ReLU plus a residual FC-BN-ReLU-FC-BN.
    fused: concat, FC-BN-ReLU, FC(width/2)-BN-ReLU, FC(num_classes).
    Padding 1 (not stated in the paper); flatten after the second max-pool, no global pooling.
    """

    def __init__(self, input_shape: tuple[int, int, int], embed_dim: int, num_classes: int,
                 size: BlockSize, dropout: float = 0.2):
        super().__init__()
        width = size.width
        self.image_path = image_path(input_shape, size, dropout)
        self.label_in = nn.Sequential(nn.Linear(embed_dim, width), nn.BatchNorm1d(width), nn.ReLU())
        self.label_residual = nn.Sequential(
            nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(),
            nn.Linear(width, width), nn.BatchNorm1d(width),
        )
        self.fused = nn.Sequential(
            nn.Linear(2 * width, width), nn.BatchNorm1d(width), nn.ReLU(),
            nn.Linear(width, width // 2), nn.BatchNorm1d(width // 2), nn.ReLU(),
            nn.Linear(width // 2, num_classes),
        )

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        image = self.image_path(x)                          # (B, width)
        label = self.label_in(z)                            # (B, width)
        label = label + self.label_residual(label)          # (B, width)
        return self.fused(torch.cat([image, label], dim=1))  # (B, m) logits


def image_path(input_shape: tuple[int, int, int], size: BlockSize, dropout: float) -> nn.Sequential:
    """The image path of Figure 6: (B, C, H, W) -> (B, width)."""
    c_in, h, w = input_shape
    c1, c2, c3 = size.channels
    if h < 4 or w < 4:
        raise ValueError(f"input {input_shape} is too small for two 2x2 max-pools (need H, W >= 4)")
    return nn.Sequential(
        nn.Conv2d(c_in, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(dropout),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.Dropout(dropout),
        nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(dropout),
        nn.Flatten(),
        nn.Linear(c3 * (h // 4) * (w // 4), size.width), nn.BatchNorm1d(size.width),
    )


class OutputHead(nn.Module):
    """p_out(y | z_T): a linear layer on z_T (softmax is applied by the loss)."""

    def __init__(self, embed_dim: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(embed_dim, num_classes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z)                               # (B, m) logits


BACKPROP_ALPHA_INIT = 0.5
"""Initial mixing weight alpha_t = tanh(w_t) of the structure-matched baseline (not stated
in the paper): each block starts by moving z halfway to its prediction."""


class BackpropChain(nn.Module):
    """The paper's structure-matched back-propagation baseline (Eqs. 17-19).

    The same T blocks as NoProp-DT chained end to end and trained with cross-entropy
    through all of them::

        z_0 ~ N(0, I);  z_t = (1 - alpha_t) z_{t-1} + alpha_t u_hat_t(z_{t-1}, x),  alpha_t = tanh(w_t)
        logits = head(z_T)

    z_0 is not stated in the paper; we start from noise as NoProp's chain does (Eq. 3). A
    constant z_0 would feed block 1's label path a constant, which its BatchNorm turns into
    amplified rounding noise. The caller passes z_0 (seeded), so the forward is a pure
    function. The embedding is a buffer when fixed (one-hot) and a parameter when learned.
    """

    def __init__(self, input_shape: tuple[int, int, int], embedding: torch.Tensor, num_classes: int,
                 size: BlockSize, T: int, dropout: float, learn_embedding: bool):
        super().__init__()
        d = embedding.shape[1]
        self.blocks = nn.ModuleList(DTBlock(input_shape, d, num_classes, size, dropout) for _ in range(T))
        self.w = nn.Parameter(torch.full((T,), float(np.arctanh(BACKPROP_ALPHA_INIT))))
        self.head = OutputHead(d, num_classes)
        if learn_embedding:
            self.embedding = nn.Parameter(embedding.detach().float().clone())
        else:
            self.register_buffer("embedding", embedding.detach().float().clone())

    def forward(self, x: torch.Tensor, z_0: torch.Tensor) -> torch.Tensor:
        z = z_0                                                              # (B, d)
        alpha = torch.tanh(self.w)                                           # (T,)
        for t, block in enumerate(self.blocks):
            u_hat = denoised_embedding(block(z, x), self.embedding)          # (B, d)
            z = (1 - alpha[t]) * z + alpha[t] * u_hat                        # Eq. 17
        return self.head(z)                                                  # (B, m)


class SingleTowerCNN(nn.Module):
    """A plain CNN: the Figure-6 image path, ReLU, and a linear classifier."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, size: BlockSize, dropout: float):
        super().__init__()
        self.image_path = image_path(input_shape, size, dropout)
        self.classifier = nn.Sequential(nn.ReLU(), nn.Linear(size.width, num_classes))

    def forward(self, x: torch.Tensor, z_0: torch.Tensor | None = None) -> torch.Tensor:
        """``z_0`` is ignored: the same call signature as :class:`BackpropChain`."""
        return self.classifier(self.image_path(x))                          # (B, m)


def embedding_dim(kind: str, num_classes: int, input_shape: tuple[int, int, int], learned_dim: int) -> int:
    """d for each embedding kind (Sec. 2.2.1): one_hot d = m, learned d = config, prototype d = C*H*W."""
    if kind == "one_hot":
        return num_classes
    if kind == "learned":
        return learned_dim
    if kind == "prototype":
        return int(np.prod(input_shape))
    raise ValueError(f"unknown embedding kind {kind!r}")


def initial_embedding(kind: str, num_classes: int, dim: int, seed: int,
                      prototype_images: torch.Tensor | None = None) -> torch.Tensor:
    """Initial W_embed (m, d), float32.

    one_hot: the identity. learned: orthogonal (orthonormal rows when m <= d). prototype: the
    per-class medoid images from :func:`class_medoids`, flattened.
    """
    if kind == "one_hot":
        return torch.eye(num_classes)
    if kind == "learned":
        gen = torch.Generator().manual_seed(seed)
        weight = torch.empty(num_classes, dim)
        # nn.init.orthogonal_ has no generator argument: build the QR ourselves from seeded noise.
        q, r = torch.linalg.qr(torch.randn(max(num_classes, dim), min(num_classes, dim), generator=gen))
        q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
        weight.copy_(q if num_classes >= dim else q.T)
        return weight
    if kind == "prototype":
        if prototype_images is None:
            raise ValueError("prototype embedding needs the class medoid images")
        return prototype_images.reshape(num_classes, -1).float().clone()
    raise ValueError(f"unknown embedding kind {kind!r}")


def class_medoids(x: torch.Tensor, y: torch.Tensor, num_classes: int, max_per_class: int,
                  seed: int) -> torch.Tensor:
    """Per class, the image whose median distance to the other images of its class is smallest.

    ``x`` (N, ...) normalised images. Classes with more than ``max_per_class`` images use a
    seeded subsample (pairwise distances are quadratic). Returns (m, ...) images.
    """
    gen = torch.Generator().manual_seed(seed)
    flat = x.reshape(len(x), -1).double()
    out = []
    for k in range(num_classes):
        idx = torch.nonzero(y == k).flatten()
        if len(idx) == 0:
            raise ValueError(f"class {k} has no training images: cannot build its prototype")
        if len(idx) > max_per_class:
            idx = idx[torch.randperm(len(idx), generator=gen)[:max_per_class]]
        members = flat[idx]                                   # (n_k, D)
        dist = torch.cdist(members, members)                  # (n_k, n_k)
        if len(idx) > 1:
            # Exclude each image's zero distance to itself.
            dist = dist + torch.diag(torch.full((len(idx),), float("nan"), dtype=dist.dtype))
            score = torch.nanmedian(dist, dim=1).values
        else:
            score = torch.zeros(1, dtype=dist.dtype)
        out.append(x[idx[int(torch.argmin(score))]])
    return torch.stack(out)
