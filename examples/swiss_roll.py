"""Train a diffusion model on a 2D swiss roll and make a GIF of samples as training goes on.

Run (2 CPU cores, about a minute)::

    python examples/swiss_roll.py --out examples_out/swiss_roll

Writes ``training.gif`` (samples every ``--snapshot-every`` steps, drawn with the EMA
weights from the same initial noise) and ``final.png``.
"""

from __future__ import annotations

import argparse
import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from PIL import Image

from tinydiff import DiffusionModel, DiffusionModelConfig, Trainer, warmup_cosine
from tinydiff.nn import MLP


def swiss_roll(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 2) points on a noisy 2D swiss roll, scaled to roughly unit variance."""
    u = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator))
    x = torch.stack([u * torch.cos(u), u * torch.sin(u)], dim=1)
    x = x + 0.3 * torch.randn(n, 2, generator=generator)
    return x / 7.0


def scatter_png(points: torch.Tensor, title: str) -> Image.Image:
    fig, ax = plt.subplots(figsize=(4, 4), dpi=80)
    ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.6)
    ax.set_xlim(-2.2, 2.2)
    ax.set_ylim(-2.2, 2.2)
    ax.set_aspect("equal")
    ax.set_title(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("examples_out/swiss_roll"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--snapshot-every", type=int, default=250)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    data = swiss_roll(20_000, torch.Generator().manual_seed(0))
    net = MLP(input_dim=2, hidden_dim=128, num_layers=3)
    model = DiffusionModel(
        net, DiffusionModelConfig(input_shape=(2,), num_timesteps=1000, target_type="pred_v")
    )
    model.enable_ema(decay=0.995)
    init_noise = torch.randn(1000, 2, generator=torch.Generator().manual_seed(1))
    frames: list[Image.Image] = []

    def snapshot(trainer: Trainer, step: int) -> None:
        model.eval()
        x = model.sample(1000, 50, sampler="ddim", init_noise=init_noise, use_ema=True)
        model.train()
        frames.append(scatter_png(x, f"step {step}"))

    trainer = Trainer(
        model,
        data,
        batch_size=256,
        lr=2e-3,
        lr_scheduler=lambda opt: warmup_cosine(opt, 100, args.steps),
        callbacks=[(args.snapshot_every, snapshot)],
    )
    history = trainer.fit(args.steps)
    print(f"final loss (mean of last 100 steps): {sum(history[-100:]) / 100:.4f}")
    frames[0].save(
        args.out / "training.gif", save_all=True, append_images=frames[1:], duration=300, loop=0
    )
    frames[-1].save(args.out / "final.png")
    print(f"wrote {args.out / 'training.gif'} ({len(frames)} frames) and final.png")


if __name__ == "__main__":
    main()
