"""Checkpoint round trips: model, EMA, optimizer (nested tensors), scheduler, RNG; atomicity."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from _nets import CondNet

from tinydiff import DiffusionModel, DiffusionModelConfig, load_checkpoint, save_checkpoint
from tinydiff.checkpoint import read_checkpoint
from tinydiff.trainer import warmup_cosine


def _setup(seed: int) -> tuple[DiffusionModel, torch.optim.Optimizer, object]:
    torch.manual_seed(seed)
    model = DiffusionModel(CondNet(2, 16, 3), DiffusionModelConfig(input_shape=(2,)))
    model.enable_ema(0.9)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    sched = warmup_cosine(opt, 3, 20)
    return model, opt, sched


def _train(model: DiffusionModel, opt: torch.optim.Optimizer, sched: object, n: int) -> None:
    for _ in range(n):
        loss = model.loss(torch.randn(8, 2), cond={"class_labels": torch.randint(0, 3, (8,))})
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        sched.step()  # type: ignore[attr-defined]
        model.update_ema()


def test_round_trip(tmp_path: Path) -> None:
    model, opt, sched = _setup(0)
    _train(model, opt, sched, 5)
    gen = torch.Generator().manual_seed(123)
    gen.manual_seed(7)
    path = tmp_path / "sub" / "ckpt.safetensors"
    save_checkpoint(
        path,
        model,
        opt,
        sched,
        step=5,
        extra={"note": "hi", "t": torch.ones(3), "k": (1, 2)},
        generators={"g": gen},
    )
    expected_next = torch.randn(4)  # global RNG continues from the saved state
    expected_gen = torch.randn(4, generator=gen)

    other, opt2, sched2 = _setup(1)
    gen2 = torch.Generator()
    step = load_checkpoint(path, other, opt2, sched2, generators={"g": gen2})
    assert step == 5
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    for k, v in model.ema_state_dict().items():
        assert torch.equal(v, other.ema_state_dict()[k]), k
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for pid, st in s1["state"].items():
        for name, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(s2["state"][pid][name]))
    assert sched.state_dict() == sched2.state_dict()
    assert torch.equal(torch.randn(4), expected_next)
    assert torch.equal(torch.randn(4, generator=gen2), expected_gen)
    extra = read_checkpoint(path)["extra"]
    assert extra["note"] == "hi" and extra["k"] == (1, 2) and torch.equal(extra["t"], torch.ones(3))
    # training continues identically
    torch.manual_seed(9)
    _train(model, opt, sched, 3)
    torch.manual_seed(9)
    _train(other, opt2, sched2, 3)
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)


def test_atomic_write_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt, _sched = _setup(0)
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, model, opt, step=1)
    before = path.read_bytes()

    def boom(*args: object) -> None:
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, opt, step=2)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temp left over
    assert read_checkpoint(path)["step"] == 1


def test_ema_mismatch_and_not_a_checkpoint(tmp_path: Path) -> None:
    model, opt, _ = _setup(0)
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, model, opt)
    plain = DiffusionModel(CondNet(2, 16, 3), DiffusionModelConfig(input_shape=(2,)))
    with pytest.raises(ValueError, match="enable_ema"):
        load_checkpoint(path, plain)
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a tinydiff checkpoint"):
        read_checkpoint(tmp_path / "other.safetensors")


def test_non_finite_numbers_in_the_metadata_are_refused_before_writing(tmp_path: Path) -> None:
    model, opt, _ = _setup(0)
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, model, opt, step=1)
    opt.param_groups[0]["lr"] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite number"):
        save_checkpoint(path, model, opt, step=2)
    with pytest.raises(ValueError, match="NaN or infinite number"):
        save_checkpoint(path, model, step=2, extra={"best": float("nan")})
    assert read_checkpoint(path)["step"] == 1  # the previous file is untouched
    assert sorted(os.listdir(tmp_path)) == ["c.safetensors"]
