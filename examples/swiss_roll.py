"""Train a diffusion model on a 2D swiss roll and make a GIF of samples as training goes on.

Run (2 CPU cores, about a minute)::

    python examples/swiss_roll.py --out examples_out/swiss_roll

Writes ``training.gif`` (samples every ``--snapshot-every`` steps, drawn with the EMA
weights from the same initial noise) and ``final.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from tinydiff import DiffusionModel, DiffusionModelConfig, Trainer
from tinydiff.datasets import swiss_roll
from tinydiff.nn import MLP
from tinydiff.plotting import save_gif, scatter_frame


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
    frames: list[Any] = []

    def snapshot(trainer: Trainer, step: int) -> None:
        model.eval()
        x = model.sample(1000, 50, sampler="ddim", init_noise=init_noise, use_ema=True)
        model.train()
        frames.append(scatter_frame([(f"step {step}", x)], lim=2.5))

    trainer = Trainer(
        model,
        data,
        batch_size=256,
        lr_scheduler="warmup_cosine",  # the default: warm-up, cosine decay from 2e-3
        callbacks=[(args.snapshot_every, snapshot)],
    )
    history = trainer.fit(args.steps)
    print(f"final loss (mean of last 100 steps): {sum(history[-100:]) / 100:.4f}")
    save_gif(args.out / "training.gif", frames)
    frames[-1].save(args.out / "final.png")
    print(f"wrote {args.out / 'training.gif'} ({len(frames)} frames) and final.png")


if __name__ == "__main__":
    main()
