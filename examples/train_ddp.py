"""Data-parallel training with DistributedDataParallel (gloo on CPU, NCCL on GPUs).

Launch 2 processes on one machine::

    torchrun --nproc_per_node=2 examples/train_ddp.py --out examples_out/train_ddp

Each process trains on its shard of the data (``DistributedSampler``); DDP averages the
gradients, so the run equals single-process training with the global batch
(``--batch-size`` per process times the number of processes). ``DiffusionModel.forward``
is its loss, so the DDP wrapper is called like the model: ``ddp(x, cond=...).mean()``.
Rank 0 keeps the EMA (updated from the synchronised weights), saves the checkpoint and
writes a scatter plot of samples.

With Hugging Face ``accelerate`` instead (``accelerate launch --num_processes 2
examples/train_ddp.py``), the few changes are:

1. drop ``init_process_group`` / ``destroy_process_group``, the ``DistributedSampler`` and
   the DDP wrapper; create ``accelerator = accelerate.Accelerator()``;
2. ``ddp, optimizer, loader = accelerator.prepare(model, optimizer, loader)`` (it shards
   the loader and wraps the model);
3. replace ``loss.backward()`` by ``accelerator.backward(loss)``;
4. use ``accelerator.is_main_process`` for rank-0 work and
   ``accelerator.unwrap_model(ddp)`` to reach the ``DiffusionModel`` (for ``update_ema``,
   ``sample`` and saving).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from tinydiff import DiffusionModel, DiffusionModelConfig, save_checkpoint
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
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128, help="per process")
    args = parser.parse_args()

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if backend == "nccl" else "cpu")
    if backend == "gloo":
        torch.set_num_threads(1)

    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    model = DiffusionModel(
        MLP(input_dim=2, hidden_dim=128), DiffusionModelConfig(input_shape=(2,))
    ).to(device)
    if rank == 0:
        model.enable_ema(decay=0.995)
    ddp = DDP(model, device_ids=[local_rank] if backend == "nccl" else None)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=2e-3, weight_decay=0)

    data = TensorDataset(two_moons(20_000, torch.Generator().manual_seed(0)))
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    # per-rank noise: different t and eps on every rank
    noise_gen = torch.Generator(device).manual_seed(1 + rank)

    step = 0
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)  # reshuffle differently each epoch, consistently across ranks
        total = torch.zeros((), device=device)
        for (x,) in loader:
            loss = ddp(x.to(device), generator=noise_gen).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # gradients are all-reduced (averaged) here
            optimizer.step()
            if rank == 0:
                model.update_ema()
            total += loss.detach()
            step += 1
        dist.all_reduce(total)
        if rank == 0:
            print(f"epoch {epoch + 1}: mean loss {total.item() / (world * len(loader)):.4f}")

    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(args.out / "checkpoint.safetensors", model, optimizer, step=step)
        samples = model.sample(2000, 50, sampler="ddim", use_ema=True).cpu()
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 4), dpi=80)
        ax.scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.6)
        ax.set_aspect("equal")
        ax.set_title(f"DDP, {world} processes, {step} steps")
        fig.savefig(args.out / "samples.png")
        print(f"wrote {args.out / 'samples.png'} and checkpoint.safetensors")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
