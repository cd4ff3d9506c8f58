"""The benchmarks' digits data and small digits classifier (shared by ``defaults.py`` and
``few_step_digits.py``): scikit-learn's 8x8 digits in [-1, 1], and an MLP classifier trained
on them whose penultimate-layer features give a Frechet distance for generated digits."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def digits_data() -> tuple[Tensor, Tensor]:
    """sklearn's digits as (N, 1, 8, 8) in [-1, 1], and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    return x, torch.tensor(digits.target, dtype=torch.int64)


def train_classifier(x: Tensor, y: Tensor, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """A small classifier trained on the real digits (1500 Adam steps of batch 256): its body
    (n, 1, 8, 8) -> (n, 64) penultimate features and its head (n, 64) -> (n, 10) logits,
    both frozen, in eval mode."""
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU())
    head = nn.Linear(64, 10)
    opt = torch.optim.Adam([*body.parameters(), *head.parameters()], 1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(1500):
        idx = torch.randint(0, len(x), (256,), generator=gen)
        loss = nn.functional.cross_entropy(head(body(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = float((head(body(x)).argmax(1) == y).float().mean())
    print(f"feature classifier: training accuracy {acc:.3f}")
    body.requires_grad_(False).eval()
    head.requires_grad_(False).eval()
    return body, head


def feature_net(x: Tensor, y: Tensor, seed: int = 0) -> Callable[[Tensor], Tensor]:
    """A small classifier trained on the real digits; returns its penultimate-layer features
    (n, 1, 8, 8) -> (n, 64) float64 (inputs clamped to [-1, 1])."""
    body, _ = train_classifier(x, y, seed)

    def features(images: Tensor) -> Tensor:
        with torch.no_grad():
            return body(images.float().clamp(-1, 1)).double()

    return features
