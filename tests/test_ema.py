"""EMA: closed-form geometric sums with warm-up decays; API of DiffusionModel."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tinydiff import DiffusionModel, DiffusionModelConfig
from tinydiff.ema import EMA, ema_decay


def _closed_form(values: list[float], decay: float, warmup: bool) -> float:
    """EMA_n = theta_0 prod_k d_k + sum_k (1 - d_k) theta_k prod_{j>k} d_j."""
    n = len(values) - 1
    d = [ema_decay(decay, k, warmup) for k in range(1, n + 1)]
    total = values[0] * torch.tensor(d, dtype=torch.float64).prod().item()
    for k in range(1, n + 1):
        tail = torch.tensor(d[k:], dtype=torch.float64).prod().item() if k < n else 1.0
        total += (1 - d[k - 1]) * values[k] * tail
    return total


@pytest.mark.parametrize("warmup", [True, False])
@pytest.mark.parametrize("update_every", [1, 3])
def test_ema_matches_geometric_sum(warmup: bool, update_every: int) -> None:
    lin = nn.Linear(1, 1, bias=False).double()
    bn = nn.BatchNorm1d(1).double()  # float buffers are averaged too
    net = nn.Sequential(lin, bn)
    with torch.no_grad():
        lin.weight.fill_(0.0)
        bn.running_mean.fill_(0.0)
    ema = EMA(net, decay=0.9, warmup=warmup, update_every=update_every)
    seen = [0.0]  # value at each averaging update (the first is the initial copy)
    for call in range(1, 25):
        value = float(call) ** 1.5
        with torch.no_grad():
            lin.weight.fill_(value)
            bn.running_mean.fill_(-value)
        if ema.update(net):
            seen.append(value)
    assert ema.num_updates == len(seen) - 1 == 24 // update_every
    expected = _closed_form(seen, 0.9, warmup)
    assert ema.module[0].weight.item() == pytest.approx(expected, rel=1e-12)
    assert ema.module[1].running_mean.item() == pytest.approx(-expected, rel=1e-12)
    # integer buffers follow along without error
    assert ema.module[1].num_batches_tracked.dtype == torch.int64


def test_warmup_formula() -> None:
    assert ema_decay(0.999, 1) == pytest.approx(2 / 11)
    assert ema_decay(0.999, 10) == pytest.approx(11 / 20)
    assert ema_decay(0.5, 10**6) == 0.5
    assert ema_decay(0.999, 3, warmup=False) == 0.999


def _model() -> DiffusionModel:
    net = nn.Sequential(nn.Linear(2, 2))
    wrapper = _TNet(net)
    return DiffusionModel(wrapper, DiffusionModelConfig(input_shape=(2,), num_timesteps=10))


class _TNet(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_model_ema_not_in_parameters_and_samples() -> None:
    model = _model()
    n_params = len(list(model.parameters()))
    keys = set(model.state_dict())
    model.enable_ema(decay=0.5, warmup=False)
    assert len(list(model.parameters())) == n_params
    assert set(model.state_dict()) == keys
    live = {k: v.clone() for k, v in model.nn_module.state_dict().items()}
    with torch.no_grad():
        for p in model.nn_module.parameters():
            p.add_(1.0)
    model.update_ema()
    ema_w = model.ema.module.net[0].weight
    assert torch.allclose(ema_w, live["net.0.weight"] + 0.5)
    g = torch.Generator().manual_seed(0)
    a = model.sample(4, 5, sampler="ddim", use_ema=True, generator=g)
    # sampling with EMA leaves the live weights as they were
    assert torch.allclose(model.nn_module.net[0].weight, live["net.0.weight"] + 1.0)
    b = model.sample(4, 5, sampler="ddim", generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(a, b)
    # state round trip
    state = model.ema_state_dict()
    other = _model()
    other.enable_ema(decay=0.5, warmup=False)
    other.load_ema_state_dict(state)
    assert torch.equal(other.ema.module.net[0].weight, ema_w)
    assert other.ema.num_calls == 1
    # .to(dtype) reaches the EMA copy
    model.double()
    assert model.ema.module.net[0].weight.dtype == torch.float64


def test_ema_errors() -> None:
    model = _model()
    with pytest.raises(ValueError, match="enable_ema"):
        model.sample(2, 2, use_ema=True)
    with pytest.raises(ValueError, match="enable_ema"):
        model.update_ema()
    with pytest.raises(ValueError, match="decay"):
        model.enable_ema(decay=1.5)
    with pytest.raises(ValueError, match="update_every"):
        model.enable_ema(update_every=0)
