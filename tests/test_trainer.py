"""Trainer: loss decreases, callbacks, exact (bitwise) resume after a killed run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _nets import CondNet

from tinydiff import DiffusionModel, DiffusionModelConfig, Trainer, warmup_cosine


def _model(seed: int, ema: bool = True) -> DiffusionModel:
    torch.manual_seed(seed)
    net = CondNet(2, 32, 3)
    net.out.insert(1, torch.nn.Dropout(0.1))  # uses torch's global RNG: must be restored too
    model = DiffusionModel(
        net, DiffusionModelConfig(input_shape=(2,), num_timesteps=100, cond_drop_prob=0.2)
    )
    if ema:
        model.enable_ema(0.95, update_every=2)
    return model


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (200,), generator=g)
    x = torch.randn(200, 2, generator=g) * 0.1 + labels[:, None].float() - 1
    return x, labels


def _trainer(model: DiffusionModel, **kw: object) -> Trainer:
    x, y = _data()
    return Trainer(
        model,
        x,
        cond=y,
        batch_size=32,
        lr=3e-3,
        grad_clip=1.0,
        progress=False,
        lr_scheduler=lambda opt: warmup_cosine(opt, 5, 40),
        seed=3,
        **kw,  # type: ignore[arg-type]
    )


class Killed(Exception):
    pass


def test_resume_reproduces_loss_curve_bitwise(tmp_path: Path) -> None:
    full = _trainer(_model(0)).fit(40)
    ckpt = tmp_path / "run.safetensors"

    def kill(trainer: Trainer, step: int) -> None:
        if step == 27:
            raise Killed

    first = _trainer(_model(0), checkpoint_path=ckpt, checkpoint_every=10, callbacks=[(1, kill)])
    with pytest.raises(Killed):
        first.fit(40)
    # a fresh process: different initial weights and global RNG until resume
    torch.manual_seed(1234)
    resumed = _trainer(_model(5), checkpoint_path=ckpt, checkpoint_every=10)
    assert resumed.resume(ckpt) == 20
    history = resumed.fit(40)
    assert history == full  # bitwise-equal floats, steps 1..40
    ref = _trainer(_model(0))
    ref.fit(40)
    for a, b in zip(ref.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    for k, v in ref.model.ema_state_dict().items():
        assert torch.equal(v, resumed.model.ema_state_dict()[k]), k


def test_state_dict_round_trip() -> None:
    a = _trainer(_model(0))
    a.fit(10)
    state = a.state_dict()
    expected = a.fit(15)
    b = _trainer(_model(1))
    b.load_state_dict(state)  # restores torch's global RNG too
    assert b.fit(15) == expected


def test_training_learns_and_callbacks_run() -> None:
    calls: list[int] = []
    trainer = _trainer(_model(0, ema=False), callbacks=[(25, lambda tr, s: calls.append(s))])
    history = trainer.fit(150)
    assert calls == [25, 50, 75, 100, 125, 150]
    assert len(history) == 150
    assert sum(history[-30:]) / 30 < sum(history[:30]) / 30


def test_loader_batches() -> None:
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=50)
    trainer = Trainer(_model(0), loader, progress=False)
    assert len(trainer.fit(7)) == 7  # restarts the loader after 4 batches


def test_bad_arguments() -> None:
    x, _ = _data()
    with pytest.raises(ValueError, match="checkpoint_path"):
        Trainer(_model(0), x, checkpoint_every=5)
    with pytest.raises(ValueError, match="leading dim"):
        Trainer(_model(0), x, cond=torch.zeros(3))
    with pytest.raises(TypeError, match="DiffusionModel"):
        Trainer(torch.nn.Linear(2, 2), x)  # type: ignore[arg-type]
