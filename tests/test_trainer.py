"""Trainer: loss decreases, callbacks, exact (bitwise) resume after a killed run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

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


# -- argument validation -------------------------------------------------------------------------
def _fn(trainer: Trainer, step: int) -> None:
    pass


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"grad_clip": -1.0}, ValueError, "grad_clip must be a max gradient norm > 0"),
        ({"grad_clip": 0}, ValueError, "grad_clip must be a max gradient norm > 0"),
        ({"grad_clip": float("nan")}, ValueError, "grad_clip must be a finite"),
        ({"grad_clip": True}, TypeError, "grad_clip must be a real number"),
        (
            {"checkpoint_every": 0, "checkpoint_path": "c.safetensors"},
            ValueError,
            "checkpoint_every >= 1",
        ),
        (
            {"checkpoint_every": -1, "checkpoint_path": "c.safetensors"},
            ValueError,
            "checkpoint_every >= 1",
        ),
        (
            {"checkpoint_every": 2.5, "checkpoint_path": "c.safetensors"},
            TypeError,
            "checkpoint_every as an int",
        ),
        ({"batch_size": 2.5}, TypeError, "batch_size as an int"),
        ({"batch_size": True}, TypeError, "batch_size as an int"),
        ({"batch_size": 0}, ValueError, "batch_size >= 1"),
        ({"batch_size": 201}, ValueError, "exceeds the 200 training samples"),
        ({"seed": 2**70}, ValueError, "seed in"),
        ({"seed": 1.5}, TypeError, "seed as an int"),
        ({"lr": 0}, ValueError, "lr must be > 0"),
        ({"lr": -1e-3}, ValueError, "lr must be >= 0"),
        ({"lr": float("inf")}, ValueError, "lr must be a finite number"),
        ({"lr": "1e-3"}, TypeError, "lr must be a real number"),
        ({"optimizer": "adam"}, TypeError, "optimizer must be a torch.optim.Optimizer"),
        ({"lr_scheduler": "cosine"}, ValueError, "lr_scheduler must be .default., .warmup_cosine."),
        ({"lr_scheduler": 3}, TypeError, "lr_scheduler must be None"),
        ({"callbacks": [(0, _fn)]}, ValueError, "every_n_steps >= 1"),
        ({"callbacks": [(True, _fn)]}, ValueError, "every_n_steps >= 1"),
        ({"callbacks": [(5, "fn")]}, ValueError, "every_n_steps >= 1"),
        ({"device": "nonsense"}, ValueError, "not a device name"),
        ({"progress": "yes"}, TypeError, "progress must be True or False"),
        ({"cond_key": 3}, TypeError, "cond_key must be a str"),
        ({"max_consecutive_skips": -1}, ValueError, "max_consecutive_skips >= 0"),
    ],
)
def test_every_argument_is_checked(kwargs: dict[str, object], error: type, match: str) -> None:
    x, _ = _data()
    with pytest.raises(error, match=match):
        Trainer(_model(0, ema=False), x, progress=kwargs.pop("progress", False), **kwargs)  # type: ignore[arg-type]


def test_data_and_fit_arguments(tmp_path: Path) -> None:
    x, _ = _data()
    model = _model(0, ema=False)
    with pytest.raises(ValueError, match="N >= 1 samples"):
        Trainer(model, x[:0], progress=False)
    with pytest.raises(TypeError, match="floating-point"):
        Trainer(model, torch.arange(10), progress=False)
    with pytest.raises(TypeError, match="iterable of batches"):
        Trainer(model, 3, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="is a directory"):
        Trainer(model, x, checkpoint_path=tmp_path, checkpoint_every=1, progress=False)
    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:0]), batch_size=4)
    with pytest.raises(ValueError, match="yielded no batches"):
        Trainer(model, empty, progress=False).fit(1)
    trainer = Trainer(model, x, batch_size=8, progress=False)
    for bad, error in ((2.5, TypeError), (True, TypeError), (-1, ValueError), ("3", TypeError)):
        with pytest.raises(error, match="num_steps"):
            trainer.fit(bad)  # type: ignore[arg-type]
    assert trainer.step == 0
    with pytest.raises(TypeError, match="path must be a str"):
        trainer.resume(None)  # type: ignore[arg-type]


# -- atomic resume -------------------------------------------------------------------------------
def _snapshot(trainer: Trainer) -> dict[str, object]:
    return {
        "params": [p.detach().clone() for p in trainer.model.parameters()],
        "ema": {k: v.clone() for k, v in trainer.model.ema_state_dict().items()},
        "opt": repr(trainer.optimizer.state_dict()),
        "sched": repr(trainer.scheduler.state_dict()) if trainer.scheduler else None,
        "rng": torch.get_rng_state(),
        "data": trainer.data_generator.get_state(),
        "noise": trainer.noise_generator.get_state(),
        "step": trainer.step,
        "history": list(trainer.history),
    }


def _assert_unchanged(trainer: Trainer, before: dict[str, object]) -> None:
    after = _snapshot(trainer)
    for key, value in before.items():
        if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            assert all(torch.equal(a, b) for a, b in zip(value, after[key], strict=True)), key  # type: ignore[call-overload]
        elif isinstance(value, dict):
            assert all(torch.equal(v, after[key][k]) for k, v in value.items()), key  # type: ignore[index]
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), key  # type: ignore[arg-type]
        else:
            assert value == after[key], key


def _edited(tmp_path: Path, edit: object) -> Path:
    """A checkpoint of a trainer at step 6 whose extra section went through ``edit``."""
    from tinydiff import save_checkpoint
    from tinydiff.checkpoint import read_checkpoint

    source = _trainer(_model(0))
    good = tmp_path / "good.safetensors"
    source.fit(6)
    source.save(good)
    extra = read_checkpoint(good)["extra"]
    edit(extra)  # type: ignore[operator]
    path = tmp_path / "edited.safetensors"
    save_checkpoint(
        path,
        source.model,
        source.optimizer,
        source.scheduler,
        step=6,
        extra=extra,
        generators={"data": source.data_generator, "noise": source.noise_generator},
    )
    return path


def _set(key: str, value: object) -> object:
    return lambda extra: extra.__setitem__(key, value)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda e: e.pop("history"), "lacks \\['history'\\]"),
        (lambda e: e.pop("pos"), "lacks \\['pos'\\]"),
        (_set("history", [1.0] * 6), "history must be a float64 tensor"),
        (_set("history", torch.zeros(5, dtype=torch.float64)), "one loss per step \\(6\\)"),
        (_set("perm", torch.arange(199)), "permutation of the 200"),
        (_set("perm", torch.zeros(200, dtype=torch.int64)), "permutation of the 200"),
        (_set("pos", 10**6), "pos .* must be an int in 0..200"),
        (_set("pos", -1), "pos .* must be an int in 0..200"),
        (_set("pos", "3"), "pos .* must be an int"),
        (_set("loader_epoch", -1), "loader_epoch must be an int >= 0"),
        (_set("skipped_steps", [5, 3]), "skipped_steps must be increasing"),
        (_set("skipped_steps", [99]), "skipped_steps must be increasing"),
        (_set("world_size", 2), "written by 2 process"),
        (_set("surprise", 1), "unknown fields \\['surprise'\\]"),
    ],
)
def test_malformed_extra_changes_nothing(tmp_path: Path, edit: object, match: str) -> None:
    path = _edited(tmp_path, edit)
    trainer = _trainer(_model(3))
    trainer.fit(2)
    before = _snapshot(trainer)
    with pytest.raises(ValueError, match=match):
        trainer.resume(path)
    _assert_unchanged(trainer, before)


def test_scheduler_state_must_match(tmp_path: Path) -> None:
    x, y = _data()
    with_sched = _trainer(_model(0))
    with_sched.fit(3)
    with_sched.save(tmp_path / "sched.safetensors")
    plain = Trainer(_model(0), x, cond=y, batch_size=32, progress=False, lr_scheduler=None)
    plain.fit(3)
    plain.save(tmp_path / "plain.safetensors")
    before = _snapshot(plain)
    with pytest.raises(ValueError, match="holds scheduler state but no scheduler"):
        plain.resume(tmp_path / "sched.safetensors")
    _assert_unchanged(plain, before)
    with pytest.raises(ValueError, match="holds no scheduler state"):
        _trainer(_model(0)).resume(tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="has LR scheduler state and this Trainer has none"):
        plain.load_state_dict(with_sched.state_dict())


def test_loader_trainer_refuses_a_tensor_data_checkpoint(tmp_path: Path) -> None:
    x, y = _data()
    source = Trainer(_model(0), x, cond=y, batch_size=32, progress=False)
    source.fit(2)
    source.save(tmp_path / "c.safetensors")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=50)
    trainer = Trainer(_model(1), loader, progress=False)
    with pytest.raises(ValueError, match="written by a Trainer on tensor data"):
        trainer.resume(tmp_path / "c.safetensors")
    assert trainer.step == 0


def _lr(trainer: Trainer) -> float:
    return float(trainer.optimizer.param_groups[0]["lr"])


def test_default_schedule_is_warmup_cosine_over_the_first_fit() -> None:
    x, y = _data()
    with pytest.warns(FutureWarning, match="default lr_scheduler is now a warm-up"):
        trainer = Trainer(_model(0), x, cond=y, batch_size=32, lr=1e-3, progress=False)
    used: list[float] = []  # the LR of each optimizer step, read as the step runs
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kw: used.append(_lr(trainer)))
    trainer.fit(40)
    # warm-up over 10% of the 40 steps (4), then 0.5 (1 + cos(pi p)) down to 0 at step 40
    expected = [
        1e-3 * ((s + 1) / 4 if s < 4 else 0.5 * (1 + math.cos(math.pi * (s - 4) / 36)))
        for s in range(40)
    ]
    assert used == pytest.approx(expected, rel=1e-12, abs=1e-18)
    assert _lr(trainer) == pytest.approx(0.0, abs=1e-18)


def test_default_schedule_resumes_exactly_and_stretches_with_a_warning(tmp_path: Path) -> None:
    x, y = _data()
    path = tmp_path / "c.safetensors"
    kw: dict[str, Any] = dict(cond=y, batch_size=32, lr=1e-3, progress=False)
    full = Trainer(_model(0), x, lr_scheduler="warmup_cosine", **kw)
    full.fit(30)

    class Stop(Exception):
        pass

    def stop(t: Trainer, step: int) -> None:
        t.save(path)
        raise Stop

    first = Trainer(_model(0), x, lr_scheduler="warmup_cosine", callbacks=[(12, stop)], **kw)
    with pytest.raises(Stop):
        first.fit(30)  # planned over 30 steps, interrupted at step 12
    again = Trainer(_model(1), x, lr_scheduler="warmup_cosine", **kw)
    assert again.resume(path) == 12
    again.fit(30)
    assert again.history == full.history  # bitwise: the plan came back with the checkpoint
    with pytest.warns(UserWarning, match="planned for 30 steps.*stretches"):
        again.fit(40)
    assert again.step == 40 and _lr(again) == pytest.approx(0.0, abs=1e-18)


def test_a_constant_lr_checkpoint_resumes_at_a_constant_lr(tmp_path: Path) -> None:
    x, y = _data()
    path = tmp_path / "c.safetensors"
    kw: dict[str, Any] = dict(cond=y, batch_size=32, lr=1e-3, progress=False)
    old = Trainer(_model(0), x, lr_scheduler=None, checkpoint_path=path, checkpoint_every=5, **kw)
    old.fit(5)
    old.fit(10)
    with pytest.warns(FutureWarning):
        new = Trainer(_model(1), x, **kw)
    with pytest.warns(UserWarning, match="trained at a constant LR"):
        new.resume(path)  # 0.2's default Trainer wrote no scheduler state
    assert new.scheduler is None
    new.fit(15)
    replay = Trainer(_model(0), x, lr_scheduler=None, **kw)
    replay.fit(15)
    assert new.history == replay.history  # the constant-LR run continued as it was
