"""Tests for tinydiff.nn: shapes, conditioning, validation, serialization, learning."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from tinydiff.nn import MLP, SinusoidalTimeEmbedding, UNet

T = 1000


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    # These networks are far too small to gain from intra-op threads, and when the
    # CPUs are shared (xdist workers, busy host) OpenMP threads can slow them 30x.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _perturb(net: nn.Module, std: float = 0.05, seed: int = 0) -> nn.Module:
    """Add noise to every parameter so zero-initialised output layers stop hiding the input."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(std * torch.randn(p.shape, generator=gen))
    return net.eval()


def _small_unet(**kwargs: object) -> UNet:
    kwargs.setdefault("base_channels", 16)
    return UNet(**kwargs)  # type: ignore[arg-type]


def _inputs(net: nn.Module, bsz: int = 4, size: int = 8) -> Tensor:
    gen = torch.Generator().manual_seed(1)
    if isinstance(net, MLP):
        return torch.randn(bsz, net.input_dim, generator=gen)
    assert isinstance(net, UNet)
    return torch.randn(bsz, net.in_channels, size, size, generator=gen)


# ---------------------------------------------------------------------------
# SinusoidalTimeEmbedding


def test_embedding_closed_form_and_shift_invariance() -> None:
    emb = SinusoidalTimeEmbedding(16)
    t = torch.tensor([0.0, 3.25, 500.0, 999.5], dtype=torch.float64)
    e = emb(t)
    assert e.shape == (4, 16) and e.dtype == torch.float64
    # emb(0) = [cos 0, ..., sin 0, ...] = [1]*8 + [0]*8
    torch.testing.assert_close(e[0], torch.cat([torch.ones(8), torch.zeros(8)]).double())
    # <emb(t), emb(s)> = sum_k cos(w_k (t - s)) with w_k = 10000 ** (-k / 8)
    w = 10000.0 ** (-torch.arange(8, dtype=torch.float64) / 8)
    for i in range(4):
        for j in range(4):
            expected = torch.cos(w * (t[i] - t[j])).sum()
            torch.testing.assert_close(e[i] @ e[j], expected)


def test_embedding_distinguishes_times_including_fractional() -> None:
    emb = SinusoidalTimeEmbedding(64)
    t = torch.tensor([0.0, 1.0, 500.0, 500.5, 501.0, 999.0])
    e = emb(t)
    dist = torch.cdist(e, e)
    off_diag = dist[~torch.eye(len(t), dtype=torch.bool)]
    assert off_diag.min() > 1e-3
    assert e.abs().max() <= 1.0


def test_embedding_odd_dim_and_integer_input() -> None:
    emb = SinusoidalTimeEmbedding(7)
    e = emb(torch.tensor([0, 10, 999]))
    assert e.shape == (3, 7) and e.dtype == torch.float32
    assert torch.all(e[:, -1] == 0)
    torch.testing.assert_close(e[:, :6], SinusoidalTimeEmbedding(6)(torch.tensor([0.0, 10, 999])))


def test_embedding_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="dim >= 2"):
        SinusoidalTimeEmbedding(1)
    with pytest.raises(ValueError, match="max_period"):
        SinusoidalTimeEmbedding(8, max_period=1.0)
    with pytest.raises(ValueError, match=r"shape \(bsz,\)"):
        SinusoidalTimeEmbedding(8)(torch.zeros(2, 1))


# ---------------------------------------------------------------------------
# Shapes


@pytest.mark.parametrize("out_mult", [1, 2])
@pytest.mark.parametrize("input_dim", [2, 5])
def test_mlp_output_shape(input_dim: int, out_mult: int) -> None:
    net = MLP(input_dim, out_mult=out_mult)
    x = torch.randn(6, input_dim)
    assert net(x, torch.rand(6) * T).shape == (6, input_dim * out_mult)


@pytest.mark.parametrize("out_mult", [1, 2])
@pytest.mark.parametrize(("channels", "height", "width"), [(1, 8, 8), (3, 32, 32), (2, 8, 16)])
def test_unet_output_shape(channels: int, height: int, width: int, out_mult: int) -> None:
    net = _small_unet(in_channels=channels, out_mult=out_mult)
    x = torch.randn(2, channels, height, width)
    assert net(x, torch.rand(2) * T).shape == (2, channels * out_mult, height, width)


def test_unet_other_layouts() -> None:
    net = UNet(
        in_channels=3,
        base_channels=8,
        channel_mults=(1, 2),
        num_res_blocks=2,
        attention_resolutions=(0, 1),
        time_embed_dim=24,
        num_groups=4,
        dropout=0.1,
    )
    assert net(torch.randn(2, 3, 6, 6), torch.rand(2) * T).shape == (2, 3, 6, 6)
    no_attn = UNet(channel_mults=(1,), attention_resolutions=())
    assert no_attn(torch.randn(2, 1, 5, 7), torch.rand(2) * T).shape == (2, 1, 5, 7)


def test_untrained_output_is_zero() -> None:
    # Zero-initialised output layers: the untrained network predicts 0.
    for net in (MLP(3), _small_unet()):
        x = _inputs(net)
        assert torch.all(net(x, torch.rand(4) * T) == 0)


@pytest.mark.parametrize("make", [lambda: MLP(3), _small_unet], ids=["mlp", "unet"])
def test_samples_are_independent(make) -> None:  # type: ignore[no-untyped-def]
    # No normalisation across the batch: sample 0's output ignores the others.
    net = _perturb(make())
    x = _inputs(net)
    t = torch.tensor([10.0, 200.0, 500.5, 900.0])
    full = net(x, t)
    torch.testing.assert_close(net(x[:1], t[:1]), full[:1], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# Time handling


@pytest.mark.parametrize("make", [lambda: MLP(3), _small_unet], ids=["mlp", "unet"])
def test_fractional_t_changes_output_continuously(make) -> None:  # type: ignore[no-untyped-def]
    net = _perturb(make()).double()
    x = _inputs(net).double()
    t = torch.full((4,), 400.0, dtype=torch.float64)
    base = net(x, t)

    def change(dt: float) -> float:
        return (net(x, t + dt) - base).abs().max().item()

    # Smooth in t: the change is ~linear in small steps, so it vanishes as dt -> 0.
    small, ten_times = change(1e-4), change(1e-3)
    assert small > 0
    assert 5 < ten_times / small < 20
    assert change(0.5) > ten_times


@pytest.mark.parametrize("make", [lambda: MLP(3), _small_unet], ids=["mlp", "unet"])
def test_scalar_t_is_broadcast(make) -> None:  # type: ignore[no-untyped-def]
    net = _perturb(make())
    x = _inputs(net)
    expected = net(x, torch.full((4,), 250.0))
    torch.testing.assert_close(net(x, torch.tensor(250.0)), expected)
    torch.testing.assert_close(net(x, 250.0), expected)
    torch.testing.assert_close(net(x, torch.full((4,), 250)), expected)  # integer tensor


# ---------------------------------------------------------------------------
# Class conditioning


@pytest.mark.parametrize(
    "make",
    [lambda: MLP(3, num_classes=5), lambda: _small_unet(num_classes=5)],
    ids=["mlp", "unet"],
)
def test_class_labels_change_output(make) -> None:  # type: ignore[no-untyped-def]
    net = _perturb(make())
    assert net.null_class == 5
    x = _inputs(net)
    t = torch.full((4,), 300.0)
    outs = [net(x, t, torch.full((4,), label)) for label in range(6)]
    for i in range(6):
        for j in range(i + 1, 6):
            assert not torch.allclose(outs[i], outs[j])
    # None means every sample gets the null label.
    torch.testing.assert_close(net(x, t), outs[5])
    torch.testing.assert_close(net(x, t, None), outs[5])
    # Labels act per sample.
    mixed = net(x, t, torch.tensor([0, 5, 2, 3]))
    torch.testing.assert_close(mixed[1], outs[5][1])
    torch.testing.assert_close(mixed[2], outs[2][2])


@pytest.mark.parametrize(
    "make",
    [lambda: MLP(3, num_classes=5), lambda: _small_unet(num_classes=5)],
    ids=["mlp", "unet"],
)
def test_bad_class_labels(make) -> None:  # type: ignore[no-untyped-def]
    net = make()
    x = _inputs(net)
    t = torch.rand(4) * T
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        net(x, t, torch.tensor([0, 1, 6, 2]))
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        net(x, t, torch.tensor([0, -1, 2, 2]))
    with pytest.raises(ValueError, match=r"shape \(bsz,\)"):
        net(x, t, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer"):
        net(x, t, torch.zeros(4))
    with pytest.raises(TypeError, match="integer tensor"):
        net(x, t, [0, 1, 2, 3])


@pytest.mark.parametrize("make", [lambda: MLP(3), _small_unet], ids=["mlp", "unet"])
def test_labels_without_num_classes(make) -> None:  # type: ignore[no-untyped-def]
    net = make()
    assert net.null_class is None
    with pytest.raises(TypeError, match="num_classes"):
        net(_inputs(net), torch.rand(4) * T, torch.zeros(4, dtype=torch.long))


# ---------------------------------------------------------------------------
# Serialization


@pytest.mark.parametrize(
    "net",
    [
        MLP(3),
        MLP(4, hidden_dim=32, num_layers=2, time_embed_dim=17, out_mult=2, num_classes=3),
        UNet(),
        UNet(3, 16, (1, 2), 2, (0,), 40, 2, 10, 0.1, 4),
    ],
    ids=["mlp", "mlp-custom", "unet", "unet-custom"],
)
def test_from_config_round_trip(net: MLP | UNet) -> None:
    config = json.loads(json.dumps(net.config))
    rebuilt = type(net).from_config(config)
    assert rebuilt.config == net.config
    shapes = {name: p.shape for name, p in net.named_parameters()}
    assert {name: p.shape for name, p in rebuilt.named_parameters()} == shapes
    rebuilt.load_state_dict(net.state_dict())  # strict: same names and shapes
    # The config holds every constructor argument (end_time only when set: a one-time
    # network's config is the one earlier versions read).
    params = type(net).__init__.__code__.co_varnames[1 : type(net).__init__.__code__.co_argcount]
    optional = {"end_time", "time_scale"}  # written only when not at their defaults
    assert set(params) - optional <= set(config) <= set(params)


def test_config_is_a_copy() -> None:
    net = UNet()
    net.config["channel_mults"].append(4)
    assert net.config["channel_mults"] == [1, 2, 2]


# ---------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize(
    "make",
    [lambda: MLP(3, num_classes=2), lambda: _small_unet(num_classes=2)],
    ids=["mlp", "unet"],
)
def test_gradients_reach_every_parameter(make) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    net = make()
    x = _inputs(net)
    t = torch.rand(4) * T
    labels = torch.tensor([0, 1, 2, 0])  # includes the null label
    target = torch.randn_like(x)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    # The zero-initialised output layer blocks gradients to earlier layers until
    # one step has made it non-zero.
    for _ in range(2):
        opt.zero_grad()
        (net(x, t, labels) - target).square().mean().backward()
        opt.step()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------
# Learning


def test_mlp_learns_time_dependent_regression() -> None:
    # Target y = sin(x) * t / T (elementwise). A predictor that ignores t can do
    # no better than E[y | x] = sin(x) / 2, whose MSE is E[sin^2 x] * Var(t / T)
    # ~= 0.5 / 12 ~= 0.04, so a low error proves the network uses t.
    torch.manual_seed(0)
    net = MLP(2, hidden_dim=64, num_layers=2)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def batch(n: int) -> tuple[Tensor, Tensor, Tensor]:
        x = (torch.rand(n, 2) * 2 - 1) * math.pi
        t = torch.rand(n) * T
        return x, t, torch.sin(x) * t[:, None] / T

    for _ in range(400):
        x, t, y = batch(256)
        loss = (net(x, t) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, t, y = batch(4096)
    with torch.no_grad():
        mse = (net(x, t) - y).square().mean().item()
        blind_mse = (torch.sin(x) / 2 - y).square().mean().item()
    assert blind_mse > 0.03
    assert mse < 0.02 * blind_mse


# ---------------------------------------------------------------------------
# Input validation


def test_mlp_rejects_bad_inputs() -> None:
    net = MLP(3)
    t = torch.rand(4) * T
    with pytest.raises(ValueError, match=r"\(bsz, 3\)"):
        net(torch.randn(4, 2), t)
    with pytest.raises(ValueError, match=r"\(bsz, 3\)"):
        net(torch.randn(4, 3, 1), t)
    with pytest.raises(TypeError, match="floating-point"):
        net(torch.zeros(4, 3, dtype=torch.long), t)
    with pytest.raises(ValueError, match=r"t must have shape \(bsz,\) = \(4,\)"):
        net(torch.randn(4, 3), torch.rand(5))
    with pytest.raises(ValueError, match=r"t must have shape"):
        net(torch.randn(4, 3), torch.rand(4, 1))
    with pytest.raises(TypeError, match="t must be"):
        net(torch.randn(4, 3), "500")


def test_unet_rejects_bad_inputs() -> None:
    net = _small_unet(in_channels=3)
    t = torch.rand(2) * T
    with pytest.raises(ValueError, match=r"\(bsz, 3, H, W\)"):
        net(torch.randn(2, 1, 8, 8), t)
    with pytest.raises(ValueError, match=r"\(bsz, 3, H, W\)"):
        net(torch.randn(3, 8, 8), t)
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(2, 3, 6, 8), t)
    with pytest.raises(TypeError, match="floating-point"):
        net(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), t)
    with pytest.raises(ValueError, match=r"t must have shape \(bsz,\) = \(2,\)"):
        net(torch.randn(2, 3, 8, 8), torch.rand(3))


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="num_groups"):
        UNet(base_channels=12, num_groups=8)
    with pytest.raises(ValueError, match="attention_resolutions"):
        UNet(channel_mults=(1, 2), attention_resolutions=(2,))
    with pytest.raises(ValueError, match="channel_mults"):
        UNet(channel_mults=())
    with pytest.raises(ValueError, match="num_layers"):
        MLP(2, num_layers=0)
    with pytest.raises(ValueError, match="dropout"):
        MLP(2, dropout=1.0)
    with pytest.raises(ValueError, match="num_classes"):
        UNet(num_classes=0)
