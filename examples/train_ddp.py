"""Data-parallel training with tinydiff.Trainer (gloo on CPU, NCCL on GPUs).

Launch 2 processes on one machine with torchrun::

    torchrun --nproc_per_node=2 examples/train_ddp.py --out examples_out/train_ddp

or with Hugging Face accelerate (the same script, unchanged)::

    accelerate launch --multi_gpu --num_processes=2 examples/train_ddp.py --out examples_out/train_ddp

The Trainer notices the launcher (``WORLD_SIZE`` > 1), joins the process group, wraps the model
in DistributedDataParallel and shards the data: every process trains on its own
``--batch-size`` slice of each global batch, so the run equals single-process training with
the global batch (``--batch-size`` times the number of processes). Rank 0 alone updates the
EMA and writes the checkpoint; this script then has rank 0 draw a scatter plot of samples.
Run it again with ``--resume`` to continue from the checkpoint (same number of processes).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.distributed as dist

from tinydiff import DiffusionModel, DiffusionModelConfig, Trainer
from tinydiff.nn import MLP


def two_moons(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 2) points of two interleaved half circles."""
    u = math.pi * torch.rand(n, generator=generator)
    upper = torch.rand(n, generator=generator) < 0.5
    x = torch.where(
        upper[:, None],
        torch.stack([torch.cos(u), torch.sin(u)], 1),
        torch.stack([1 - torch.cos(u), 0.5 - torch.sin(u)], 1),
    )
    return (x - torch.tensor([0.5, 0.25])) * 1.5 + 0.05 * torch.randn(n, 2, generator=generator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("examples_out/train_ddp"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=128, help="per process")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # one core per process on CPU

    torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    # pred_v: with the cosine schedule alpha_bar_T is ~0, where an eps prediction says little
    config = DiffusionModelConfig(input_shape=(2,), target_type="pred_v")
    model = DiffusionModel(MLP(input_dim=2, hidden_dim=128), config)
    model.enable_ema(decay=0.995)
    checkpoint = args.out / "checkpoint.safetensors"

    def log(trainer: Trainer, step: int) -> None:
        if trainer.is_main_process:  # history holds the loss averaged over the processes
            print(f"step {step}: loss {trainer.history[-1]:.4f}")

    trainer = Trainer(
        model,
        two_moons(20_000, torch.Generator().manual_seed(0)),
        batch_size=args.batch_size,
        lr_scheduler="warmup_cosine",  # the default: warm-up, cosine decay from 2e-3
        checkpoint_path=checkpoint,
        checkpoint_every=500,
        callbacks=[(500, log)],
        progress=False,
    )
    if args.resume and checkpoint.is_file():
        trainer.resume(checkpoint)
    if trainer.is_main_process:
        print(f"{trainer.world_size} process(es), {args.batch_size} samples each per step")
    history = trainer.fit(args.steps)

    if trainer.is_main_process:
        args.out.mkdir(parents=True, exist_ok=True)
        print(f"final loss (mean of the last 100 steps): {sum(history[-100:]) / 100:.4f}")
        samples = model.sample(2000, 50, sampler="ddim", use_ema=True).cpu()
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 4), dpi=80)
        ax.scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.6)
        ax.set_aspect("equal")
        ax.set_title(f"{trainer.world_size} processes, {trainer.step} steps")
        fig.savefig(args.out / "samples.png")
        print(f"wrote {args.out / 'samples.png'} and {checkpoint.name}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
