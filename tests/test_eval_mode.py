"""Networks run in eval mode wherever a model is evaluated rather than trained (sampling, the
NLL, the timestep search), and every submodule gets its own `training` flag back after."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tinydiff import DiffusionModel, DiffusionModelConfig
from tinydiff._validation import eval_mode, in_eval_mode
from tinydiff.nn import MLP


def _dropout_model(ema: bool = False) -> DiffusionModel:
    """An MLP with dropout 0.3 and random weights everywhere (the output layer included, which
    MLP zeroes at init): in train mode its output is random, in eval mode a function."""
    torch.manual_seed(0)
    net = MLP(2, hidden_dim=32, num_layers=2, dropout=0.3)
    model = DiffusionModel(net, DiffusionModelConfig(input_shape=(2,), num_timesteps=30))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.4 * torch.randn_like(p))
    if ema:
        model.enable_ema(0.9)
    return model


def _flags(*modules: nn.Module) -> list[bool]:
    return [m.training for root in modules for m in root.modules()]


def _mixed(model: DiffusionModel) -> list[bool]:
    """Train mode, except one residual block (a frozen part): a per-submodule mixture."""
    model.train()
    model.nn_module.blocks[0].eval()
    flags = _flags(model)
    assert any(flags) and not all(flags)
    return flags


def test_eval_mode_sets_eval_and_restores_each_flag():
    model = _dropout_model(ema=True)
    flags = _mixed(model)
    ema_before = _flags(model.ema.averaged)
    with eval_mode(model, model.ema.averaged, None):
        assert not any(_flags(model, model.ema.averaged))
    assert _flags(model) == flags and _flags(model.ema.averaged) == ema_before


def test_eval_mode_restores_on_an_exception():
    model = _dropout_model()
    flags = _mixed(model)
    with pytest.raises(RuntimeError, match="inside"), eval_mode(model.nn_module):
        assert not model.nn_module.training
        raise RuntimeError("inside")
    assert _flags(model) == flags


def test_eval_mode_uses_the_modules_own_train():
    """An override of train() runs (e.g. DiffusionModel's, which also switches the EMA copy);
    the flags it set are still restored exactly."""
    calls = []

    class Frozen(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def train(self, mode: bool = True) -> Frozen:
            calls.append(mode)
            return super().train(mode)

    net = Frozen()
    with eval_mode(net):
        assert not net.lin.training
    assert calls == [False] and net.training and net.lin.training
    net.eval()
    with eval_mode(net):  # all in eval already: nothing to do
        pass
    assert calls == [False, False] and not net.training


def test_in_eval_mode_takes_the_model_and_its_ema():
    model = _dropout_model(ema=True)

    @in_eval_mode
    def evaluate(m: DiffusionModel, value: int) -> int:
        assert not any(_flags(m, m.ema.averaged))
        return value + 1

    model.train()
    assert evaluate(model, 1) == 2 and evaluate.__name__ == "evaluate"
    assert all(_flags(model, model.ema.averaged))


def _draw(model: DiffusionModel, use_ema: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return model.sample(8, 6, sampler="ddpm", generator=g, use_ema=use_ema)


@pytest.mark.parametrize("use_ema", [False, True], ids=["live", "ema"])
def test_sample_is_the_same_in_train_and_eval_mode(use_ema):
    model = _dropout_model(ema=True)
    model.eval()
    want = _draw(model, use_ema)
    flags = _mixed(model)
    assert torch.equal(_draw(model, use_ema), want)  # dropout 0.3 would change every step
    assert _flags(model) == flags
    assert model.ema is not None and all(_flags(model.ema.averaged))


def test_dropout_makes_train_mode_random():
    """The premise of the tests here: the network above is random in train mode."""
    model = _dropout_model()
    x, t = torch.randn(8, 2), torch.full((8,), 10.0)
    model.train()
    assert not torch.equal(model.nn_module(x, t), model.nn_module(x, t))
    model.eval()
    assert torch.equal(model.nn_module(x, t), model.nn_module(x, t))


@pytest.mark.parametrize("method", ["vlb", "ode"])
def test_nll_is_the_same_in_train_and_eval_mode(method):
    model = _dropout_model()
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(1))
    options = (
        {"num_steps": 8, "divergence": "exact"}
        if method == "ode"
        else {"timesteps": 6, "decoder": "continuous"}
    )

    def nll() -> torch.Tensor:
        return model.nll(x, method=method, generator=torch.Generator().manual_seed(2), **options)

    model.eval()
    want = nll()
    flags = _mixed(model)
    assert torch.equal(nll(), want)
    assert _flags(model) == flags


def test_optimize_timesteps_restores_the_mode():
    model = _dropout_model()
    flags = _mixed(model)
    seen: list[bool] = []
    model.nn_module.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    model.optimize_timesteps(
        2,
        sampler="ddim",
        num_samples=16,
        reference_steps=20,
        max_evals=6,
        generator=torch.Generator().manual_seed(0),
    )
    assert seen and not any(seen)  # every network call in eval mode
    assert _flags(model) == flags
