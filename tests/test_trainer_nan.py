"""NaN injection: a diverging run never writes a non-finite checkpoint and never continues
silently; a single bad batch is skipped and counted."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _nets import CondNet

from tinydiff import DiffusionModel, DiffusionModelConfig, Trainer, load_checkpoint
from tinydiff.checkpoint import read_checkpoint


def _model(seed: int = 0, ema: bool = True) -> DiffusionModel:
    torch.manual_seed(seed)
    model = DiffusionModel(CondNet(2, 16, 3), DiffusionModelConfig(input_shape=(2,)))
    if ema:
        model.enable_ema(0.9)
    return model


def _data(scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 2, generator=g) * scale, torch.randint(0, 3, (64,), generator=g)


def _trainer(model: DiffusionModel, scale: float = 1.0, **kw: object) -> Trainer:
    x, y = _data(scale)
    kw.setdefault("lr_scheduler", None)  # a constant LR: the tests set it by hand
    return Trainer(model, x, cond=y, batch_size=16, progress=False, **kw)  # type: ignore[arg-type]


def _finite_on_disk(path: Path) -> bool:
    state = read_checkpoint(path)
    tensors = [*state["model"].values(), *(state["ema"] or {}).values()]
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


def _good_checkpoint(path: Path) -> Trainer:
    trainer = _trainer(_model(), checkpoint_path=path, checkpoint_every=2)
    trainer.fit(4)
    assert _finite_on_disk(path)
    return trainer


def test_nan_parameter_never_overwrites_the_last_good_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "run.safetensors"
    trainer = _good_checkpoint(path)
    with torch.no_grad():
        next(trainer.model.parameters())[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="refusing to write a checkpoint at step 6"):
        trainer.fit(10)
    assert trainer.skipped_steps == [5, 6]  # skipped, counted, and no update made
    assert math.isnan(trainer.history[-1])
    assert _finite_on_disk(path) and read_checkpoint(path)["step"] == 4


def test_infinite_learning_rate(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lr must be a finite number"):
        _trainer(_model(), lr=float("inf"))
    # an optimizer built by the user: the first update makes the weights inf / NaN
    path = tmp_path / "run.safetensors"
    trainer = _good_checkpoint(path)
    for group in trainer.optimizer.param_groups:
        group["lr"] = float("inf")
    with pytest.raises(FloatingPointError, match="refusing to write"):
        trainer.fit(10)
    assert _finite_on_disk(path) and read_checkpoint(path)["step"] == 4
    # without checkpoints: it stops after max_consecutive_skips skipped steps in a row
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=float("inf"))
    run = _trainer(model, optimizer=opt, max_consecutive_skips=3)
    with pytest.raises(FloatingPointError, match="training diverged.*last 4 steps"):
        run.fit(50)
    assert run.step == 5 and run.skipped_steps == [2, 3, 4, 5]


def test_huge_data_is_skipped_then_stops(tmp_path: Path) -> None:
    path = tmp_path / "run.safetensors"
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = _trainer(model, scale=1e20, checkpoint_path=path, checkpoint_every=1)
    with pytest.raises(FloatingPointError, match="training diverged"):
        trainer.fit(20)
    assert trainer.skipped_steps == list(range(1, 12))  # max_consecutive_skips=10, then stop
    assert not any(math.isfinite(v) and v < 1e30 for v in trainer.history)
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b)  # never updated from a non-finite gradient
    assert _finite_on_disk(path)  # the checkpoints hold the (unchanged) finite weights


def test_one_bad_batch_is_skipped_and_counted() -> None:
    x, y = _data()
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    batches[2] = (batches[2][0] * 1e20, batches[2][1])
    model = _model()
    trainer = Trainer(model, batches, progress=False, max_consecutive_skips=0)
    with pytest.raises(FloatingPointError, match="max_consecutive_skips=0"):
        trainer.fit(8)
    model = _model()
    trainer = Trainer(model, batches, progress=False)
    history = trainer.fit(8)
    assert trainer.skipped_steps == [3, 7]  # the bad batch, in both epochs
    assert [math.isfinite(v) and v < 1e30 for v in history] == [1, 1, 0, 1, 1, 1, 0, 1]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(v).all() for v in model.ema_state_dict().values())


def test_skips_survive_a_resume(tmp_path: Path) -> None:
    x, y = _data()
    x[16:32] *= 1e20  # the second batch of the first epoch's order is not known: scale many
    path = tmp_path / "run.safetensors"
    trainer = Trainer(
        _model(), x, cond=y, batch_size=16, progress=False, checkpoint_path=path, checkpoint_every=3
    )
    trainer.fit(6)
    assert trainer.skipped_steps  # some batch held a huge sample
    resumed = Trainer(_model(1), x, cond=y, batch_size=16, progress=False)
    assert resumed.resume(path) == 6
    assert resumed.skipped_steps == trainer.skipped_steps
    assert len(resumed.history) == 6
    load_checkpoint(path, _model(2))  # weights-only loading is unchanged
