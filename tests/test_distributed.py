"""DistributedDataParallel on 2 CPU processes (gloo): gradients agree across ranks and
training on two halves of a batch equals single-process training on the whole batch, for
the diffusion objective and for MeanFlow (whose forward-mode jvp runs inside the wrapped
loss)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).parent))
from _nets import CondNet

from tinydiff import DiffusionModel, DiffusionModelConfig
from tinydiff.nn import MLP

STEPS, BSZ, LR = 3, 16, 0.05


def _model(objective: str) -> DiffusionModel:
    torch.manual_seed(0)
    if objective == "meanflow":
        return DiffusionModel(
            MLP(2, 16, 1, end_time=True),
            input_shape=(2,),
            num_timesteps=50,
            noise_schedule_type="rectified_flow",
            target_type="pred_velocity",
            training_objective="meanflow",
        )
    return DiffusionModel(CondNet(2, 16), DiffusionModelConfig(input_shape=(2,), num_timesteps=50))


def _batches(objective: str) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        x = torch.randn(BSZ, 2, generator=g)
        if objective == "meanflow":  # real times, end times r <= t
            t = 50 * torch.rand(BSZ, generator=g, dtype=torch.float64)
            extra = {"t": t, "r": t * torch.rand(BSZ, generator=g, dtype=torch.float64)}
        else:
            extra = {"t": torch.randint(1, 51, (BSZ,), generator=g)}
        out.append({"x": x, "noise": torch.randn(BSZ, 2, generator=g), **extra})
    return out


def _worker(rank: int, world: int, out_dir: str, objective: str) -> None:
    torch.set_num_threads(1)
    # a file rendezvous: no TCP port that a parallel test could take between choice and bind
    init = "file://" + os.path.join(out_dir, "rendezvous")
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = _model(objective)
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=LR)
        half = BSZ // world
        grads_agree = True
        for batch in _batches(objective):
            sl = slice(rank * half, (rank + 1) * half)
            opt.zero_grad()
            ddp(**{k: v[sl] for k, v in batch.items()}).mean().backward()
            for p in model.parameters():
                assert p.grad is not None
                gathered = [torch.empty_like(p.grad) for _ in range(world)]
                dist.all_gather(gathered, p.grad)
                grads_agree &= all(torch.equal(gathered[0], g) for g in gathered)
            opt.step()
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        state["grads_agree"] = torch.tensor(grads_agree)
        save_file(state, os.path.join(out_dir, f"rank{rank}.safetensors"))
        # no rank tears gloo down while its peer may still be in a collective
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
@pytest.mark.parametrize("objective", ["diffusion", "meanflow"])
def test_ddp_matches_single_process(tmp_path: Path, objective: str) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path), objective), nprocs=2, join=True)
    model = _model(objective)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for batch in _batches(objective):
        opt.zero_grad()
        model(**batch).mean().backward()
        opt.step()
    results = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    for res in results:
        assert bool(res.pop("grads_agree"))
    for name, ref in model.state_dict().items():
        assert torch.equal(results[0][name], results[1][name]), name
        assert torch.allclose(results[0][name], ref, atol=1e-6), name
