"""tinydiff.Trainer under torchrun and accelerate launch (2 CPU processes, gloo): it equals single-process training
on the combined batch, only rank 0 keeps the EMA and writes checkpoints, and resume from a
checkpoint is exact."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _trainer_ddp_worker import BSZ, MID, STEPS, data, make_model
from safetensors.torch import load_file

from tinydiff import Trainer, warmup_cosine
from tinydiff.checkpoint import read_checkpoint

WORLD = 2
HERE = Path(__file__).parent


def _launch(out: Path, *launcher: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [*launcher, str(HERE / "_trainer_ddp_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _reference() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[float]]:
    """Single-process training on the combined batch of both ranks, with the trainer's
    documented draws: one shared permutation, per-rank t and eps generators."""
    model = make_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0)
    sched = warmup_cosine(opt, 1, STEPS)  # the Trainer's plan: warm-up over 10% (at least 1)
    x_all = data()
    data_gen = torch.Generator().manual_seed(3)
    noise_gens = [torch.Generator().manual_seed(3 + 1 + (r << 32)) for r in range(WORLD)]
    perm, pos, history = None, 0, []
    for _ in range(STEPS):
        if perm is None or pos + WORLD * BSZ > x_all.shape[0]:
            perm, pos = torch.randperm(x_all.shape[0], generator=data_gen), 0
        idx, ts, noises = [], [], []
        for r, g in enumerate(noise_gens):
            idx.append(perm[pos + r * BSZ : pos + (r + 1) * BSZ])
            ts.append(torch.randint(1, 51, (BSZ,), generator=g))
            noises.append(torch.randn(BSZ, 2, generator=g))
        pos += WORLD * BSZ
        loss = model.loss(x_all[torch.cat(idx)], t=torch.cat(ts), noise=torch.cat(noises)).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        sched.step()
        model.update_ema()
        history.append(float(loss.detach()))
    return model.state_dict(), model.ema_state_dict(), history


LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"],
    # on a machine without GPUs accelerate's multi-process launcher runs gloo
    "accelerate": [
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        f"--num_processes={WORLD}",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
    ],
}


@pytest.fixture(scope="module", params=sorted(LAUNCHERS))
def torchrun_out(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if request.param == "accelerate":
        pytest.importorskip("accelerate")
    out = tmp_path_factory.mktemp(request.param)
    _launch(out, sys.executable, *LAUNCHERS[request.param])
    return out


def test_torchrun_equals_single_process_on_the_combined_batch(torchrun_out: Path) -> None:
    ranks = [load_file(str(torchrun_out / f"rank{r}.safetensors")) for r in range(WORLD)]
    assert all(int(r["world_size"]) == WORLD for r in ranks)
    ref_model, ref_ema, ref_history = _reference()
    for name, ref in ref_model.items():
        assert torch.equal(ranks[0][f"model/{name}"], ranks[1][f"model/{name}"]), name
        torch.testing.assert_close(ranks[0][f"model/{name}"], ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        ranks[0]["history"], torch.tensor(ref_history, dtype=torch.float64), rtol=1e-5, atol=0
    )
    # the EMA is updated on rank 0 only, and matches the single-process EMA
    assert int(ranks[0]["ema/num_calls"]) == STEPS and int(ranks[1]["ema/num_calls"]) == 0
    for name, ref in ref_ema.items():
        if name != "num_calls":
            torch.testing.assert_close(ranks[0][f"ema/{name}"], ref, rtol=1e-5, atol=1e-6)


def test_torchrun_checkpoints_once_and_resumes_exactly(torchrun_out: Path) -> None:
    assert (torchrun_out / "ckpt_rank0.safetensors").is_file()
    assert not (torchrun_out / "ckpt_rank1.safetensors").exists()  # rank 1 never writes
    for r in range(WORLD):
        res = load_file(str(torchrun_out / f"rank{r}.safetensors"))
        assert torch.equal(res["resumed_history"], res["history"])  # bitwise, steps 1..STEPS
        for key in [k for k in res if k.startswith("model/")]:
            assert torch.equal(res[key], res["resumed/" + key[len("model/") :]]), key
    extra = read_checkpoint(torchrun_out / "mid.safetensors")["extra"]
    assert extra["world_size"] == WORLD and extra["rank_noise"].shape[0] == WORLD
    assert read_checkpoint(torchrun_out / "mid.safetensors")["step"] == MID
    # a checkpoint of 2 processes cannot be resumed exactly by 1
    single = Trainer(make_model(0), data(), batch_size=BSZ, progress=False)
    with pytest.raises(ValueError, match="2 process"):
        single.resume(torchrun_out / "mid.safetensors")
