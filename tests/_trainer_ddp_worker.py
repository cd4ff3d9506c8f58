"""Run by tests/test_trainer_distributed.py under torchrun (2 processes, gloo).

Trains with tinydiff.Trainer, saves a resume checkpoint at MID steps, resumes from it in a
second trainer (fresh weights and RNG), and writes what the test compares to
``out/rank{r}.safetensors``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from _nets import CondNet

from tinydiff import DiffusionModel, DiffusionModelConfig, Trainer

STEPS, MID, BSZ, N = 6, 3, 8, 64


def make_model(seed: int) -> DiffusionModel:
    torch.manual_seed(seed)
    model = DiffusionModel(CondNet(2, 16), DiffusionModelConfig(input_shape=(2,), num_timesteps=50))
    model.enable_ema(0.9, warmup=False)
    return model


def data() -> torch.Tensor:
    return torch.randn(N, 2, generator=torch.Generator().manual_seed(7))


def make_trainer(model: DiffusionModel, out: Path, **kw: object) -> Trainer:
    rank = int(os.environ["RANK"])
    return Trainer(
        model,
        data(),
        batch_size=BSZ,
        lr=1e-2,
        lr_scheduler="warmup_cosine",  # planned over fit(STEPS), resumed from the checkpoint
        grad_clip=0.5,
        progress=False,
        seed=3,
        checkpoint_path=out / f"ckpt_rank{rank}.safetensors",  # only rank 0 may write one
        checkpoint_every=MID,
        **kw,  # type: ignore[arg-type]
    )


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    first = make_trainer(make_model(0), out)  # joins the process group torchrun set up
    rank = first.rank

    def keep(trainer: Trainer, step: int) -> None:
        if step == MID:
            trainer.save(out / "mid.safetensors")  # on every rank: rank 0 writes it

    first.callbacks.append((MID, keep))
    history = first.fit(STEPS)
    dist.barrier()
    torch.manual_seed(1234 + rank)  # different weights and global RNG until resume
    second = make_trainer(make_model(5 + rank), out)
    assert second.resume(out / "mid.safetensors") == MID
    resumed = second.fit(STEPS)
    ema = first.model.ema
    assert ema is not None
    result = {f"model/{k}": v.contiguous() for k, v in first.model.state_dict().items()}
    result.update({f"resumed/{k}": v.contiguous() for k, v in second.model.state_dict().items()})
    result.update({f"ema/{k}": v.contiguous() for k, v in ema.state_dict().items()})
    result["history"] = torch.tensor(history, dtype=torch.float64)
    result["resumed_history"] = torch.tensor(resumed, dtype=torch.float64)
    result["world_size"] = torch.tensor(first.world_size)
    save_file(result, str(out / f"rank{rank}.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
