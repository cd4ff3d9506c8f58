"""MeanFlow (training_objective="meanflow") and the flow_map sampler, against closed forms.

For data N(m, s0^2 I) on a Gaussian path x_t = alpha_t x + sigma_t eps the marginal at s = t/T
is N(mu_s, S_s^2 I), mu_s = alpha_s m, S_s^2 = alpha_s^2 s0^2 + sigma_s^2, and the
probability-flow ODE keeps z = (x - mu_s) / S_s fixed: the exact flow map is
x_r = mu_r + (S_r / S_t)(x_t - mu_t), linear-Gaussian in x_t, and the average velocity in
tinydiff's unit (u = dx/ds) is u(x_t, r, t) = (x_t - x_r) / (s_t - s_r). On rectified flow
(alpha = 1 - s, sigma = s) S^2 = q(s) = (s0^2 + 1) s^2 - 2 s0^2 s + s0^2 is quadratic, so

    u = -m + (a (s_t + s_r) + b) / (S_t + S_r) * (x_t - mu_t) / S_t,  a = s0^2 + 1, b = -2 s0^2,

with no 0/0 at r = t (where it is the instantaneous velocity).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import tinydiff
from tinydiff import DiffusionModel, objectives
from tinydiff.hub import SerializationError
from tinydiff.metrics import energy_distance
from tinydiff.nn import MLP
from tinydiff.testing import GaussianMixture

T = 1000
M = torch.tensor([0.7, -0.4], dtype=torch.float64)
S0 = 0.6
RF = {"noise_schedule_type": "rectified_flow", "target_type": "pred_velocity"}


class ExactAverageVelocity(nn.Module):
    """The exact u(x_t, r, t) of N(M, S0^2 I), plus ``delta`` (a perturbation) and two
    parameters b (bias) and a (a multiple of x_t), zero: their gradients are the objective's
    expected gradient against the functions 1 and x_t."""

    end_time = True

    def __init__(self, process: Any, delta: float = 0.0) -> None:
        super().__init__()
        self.process, self.delta = process, delta
        self.rectified = type(process).__name__ == "ContinuousProcess"
        self.b = nn.Parameter(torch.zeros(2, dtype=torch.float64))
        self.a = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def _moments(self, t: Tensor) -> tuple[Tensor, Tensor]:
        alpha, sigma = self.process.alpha_sigma(t)
        return alpha[:, None] * M, (alpha**2 * S0**2 + sigma**2).sqrt()[:, None]

    def forward(self, x: Tensor, t: Tensor, r: Tensor | None = None) -> Tensor:
        r = t if r is None else r
        t, r = t.to(torch.float64), r.to(torch.float64)
        mu_t, sd_t = self._moments(t)
        _, sd_r = self._moments(r)
        s_t, s_r = (t / T)[:, None], (r / T)[:, None]
        if self.rectified:
            a, b = S0**2 + 1, -2 * S0**2
            u = -M + (a * (s_t + s_r) + b) / (sd_t + sd_r) * (x - mu_t) / sd_t
        else:  # r < t only
            mu_r = self._moments(r)[0]
            u = (x - (mu_r + sd_r / sd_t * (x - mu_t))) / (s_t - s_r)
        return u + self.delta + self.b + self.a * x


def exact_meanflow(delta: float = 0.0, **config: Any) -> DiffusionModel:
    config = {"input_shape": (2,), **RF, "training_objective": "meanflow", **config}
    process = tinydiff.DiffusionModelConfig(**config).process()
    return DiffusionModel(ExactAverageVelocity(process, delta), config).double()


def gaussian_data(n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return M + S0 * torch.randn(n, 2, generator=g, dtype=torch.float64)


# -- the closed form itself ------------------------------------------------------------------------
def test_closed_form_average_velocity_is_the_ode_displacement():
    """(x_t - x_r)/(s_t - s_r) along the exact ODE (RK4 on the marginal velocity u(x, t, t))."""
    model = exact_meanflow()
    net = model.nn_module
    x_t = torch.randn(5, 2, dtype=torch.float64)
    t0, r0 = 800.0, 150.0
    x, n = x_t.clone(), 100
    h = (r0 - t0) / n
    for i in range(n):  # dx/dt = u(x, t, t) / T
        t = torch.full((5,), t0 + i * h, dtype=torch.float64)

        def f(y: Tensor, tt: Tensor) -> Tensor:
            return net(y, tt) / T

        k1 = f(x, t)
        k2 = f(x + h / 2 * k1, t + h / 2)
        k3 = f(x + h / 2 * k2, t + h / 2)
        k4 = f(x + h * k3, t + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    u = net(
        x_t, torch.full((5,), t0, dtype=torch.float64), torch.full((5,), r0, dtype=torch.float64)
    )
    torch.testing.assert_close(u, (x_t - x) / ((t0 - r0) / T), rtol=0, atol=1e-9)


# -- the objective ---------------------------------------------------------------------------------
def _gradient_estimates(model: DiffusionModel, loss: dict[str, Tensor], chunks: int = 8) -> Tensor:
    """The objective's gradient in (b, a) on ``chunks`` independent batches of 8000 (float64),
    (chunks, 3): their mean estimates the expected gradient, their spread its standard error
    (batch means)."""
    out, g = [], torch.Generator().manual_seed(7)
    for i in range(chunks):
        model.zero_grad()
        part = {k: v[i * 8000 : (i + 1) * 8000] for k, v in loss.items()}
        model.loss(gaussian_data(8000, 100 + i), generator=g, **part).mean().backward()
        out.append(torch.cat([model.nn_module.b.grad, model.nn_module.a.grad.view(1)]))
    return torch.stack(out)


@pytest.mark.parametrize(
    ("config", "times"),
    [
        ({}, False),  # rectified flow, the paper's (t, r) draws (r = t on half the batch)
        ({"noise_schedule_type": "cosine"}, True),  # VP table, through its velocity
    ],
    ids=["rectified_flow", "vp_cosine"],
)
def test_expected_gradient_vanishes_at_the_exact_average_velocity_only(config, times):
    """p = 0 (no adaptive weight): the minimiser is E[target | x_t, r, t] = u exactly, so the
    gradient against any function of (x_t, r, t) (here 1 and x_t) has mean zero; with
    u + delta, d/db of mean((u - target)^2) over the two coordinates is delta."""
    kwargs = {"adaptive_p": 0.0, "flow_map_fraction": 0.5}
    loss: dict[str, Tensor] = {}
    if times:  # explicit (t, r) with r < t: the generic closed form divides by s_t - s_r
        g = torch.Generator().manual_seed(5)
        t = 50 + 900 * torch.rand(64_000, generator=g, dtype=torch.float64)
        loss = {"t": t, "r": t * torch.rand(64_000, generator=g, dtype=torch.float64) * 0.9}
    delta = 0.1
    exact = _gradient_estimates(exact_meanflow(training_objective_kwargs=kwargs, **config), loss)
    perturbed = _gradient_estimates(
        exact_meanflow(delta, training_objective_kwargs=kwargs, **config), loss
    )
    se = exact.std(0) / math.sqrt(exact.shape[0])
    assert (exact.mean(0).abs() < 4 * se).all(), (exact.mean(0), se)
    assert (perturbed.mean(0)[:2] > 8 * se[:2]).all(), (perturbed.mean(0), se)
    torch.testing.assert_close(perturbed.mean(0)[:2], exact.mean(0)[:2] + delta)


def _random_mlp_model(**kwargs: Any) -> DiffusionModel:
    torch.manual_seed(0)
    net = MLP(2, 32, 2, end_time=True)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    return DiffusionModel(
        net, input_shape=(2,), **RF, training_objective="meanflow", training_objective_kwargs=kwargs
    ).double()


def _pair(model: DiffusionModel, objective: objectives.MeanFlow) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(64, 2, generator=g, dtype=torch.float64)
    t, r = objective.sample_times(model, 64, generator=g)
    p = tinydiff.process.Point.at(model.process, t, x, derivatives=True)
    x_t, v = p.alpha * x + p.sigma * eps, p.d_alpha * x + p.d_sigma * eps
    return objective.regression_pair(model.denoiser(), x_t, p, r, v, T)


def test_jvp_target_equals_finite_difference_target():
    model = _random_mlp_model()
    u_j, target_j = _pair(model, objectives.MeanFlow(derivative="jvp", flow_map_fraction=1.0))
    # h T << 1: the time embedding's fastest frequency is 1 per unit of t, T per unit of s
    fd = objectives.MeanFlow(derivative="finite_difference", flow_map_fraction=1.0, fd_step=1e-7)
    u_f, target_f = _pair(model, fd)
    torch.testing.assert_close(u_j, u_f, rtol=0, atol=1e-12)
    torch.testing.assert_close(target_j, target_f, rtol=0, atol=1e-4)
    assert (target_j - u_j).abs().max() > 1e-2  # the derivative term is not negligible


def test_jvp_runs_through_a_unet_with_attention():
    """Forward mode through GroupNorm, convolutions and attention (math SDPA backend)."""
    torch.manual_seed(0)
    net = tinydiff.nn.UNet(1, 8, (1, 2), num_groups=4, end_time=True)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    model = DiffusionModel(net, input_shape=(1, 8, 8), **RF, training_objective="meanflow")
    model = model.double()
    g = torch.Generator().manual_seed(1)
    x, eps = (torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    targets = []
    for derivative, h in (("jvp", 1e-4), ("finite_difference", 1e-7)):
        obj = objectives.MeanFlow(derivative=derivative, flow_map_fraction=1.0, fd_step=h)
        t, r = obj.sample_times(model, 4, generator=torch.Generator().manual_seed(2))
        p = tinydiff.process.Point.at(model.process, t, x, derivatives=True)
        x_t, v = p.alpha * x + p.sigma * eps, p.d_alpha * x + p.d_sigma * eps
        targets.append(obj.regression_pair(model.denoiser(), x_t, p, r, v, T)[1])
    torch.testing.assert_close(targets[0], targets[1], rtol=0, atol=1e-4)


class _NoForwardMode(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x * 1.0

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


class _OpaqueMLP(MLP):
    def forward(self, x: Tensor, t: Tensor, class_labels: Any = None, r: Any = None) -> Tensor:
        return _NoForwardMode.apply(super().forward(x, t, class_labels, r))


def test_jvp_failure_falls_back_to_finite_differences_with_a_warning():
    model = _random_mlp_model()
    opaque = _OpaqueMLP(2, 32, 2, end_time=True).double()
    opaque.load_state_dict(model.nn_module.state_dict())
    other = DiffusionModel(opaque, model.config)
    with pytest.warns(RuntimeWarning, match="jvp failed.*finite differences"):
        _, target = _pair(other, objectives.MeanFlow(flow_map_fraction=1.0, fd_step=1e-7))
    _, target_j = _pair(model, objectives.MeanFlow(derivative="jvp", flow_map_fraction=1.0))
    torch.testing.assert_close(target, target_j, rtol=0, atol=1e-4)
    with pytest.raises(RuntimeError, match="jvp failed.*finite_difference"):
        _pair(other, objectives.MeanFlow(derivative="jvp"))


def test_time_sampling_and_adaptive_weight():
    model = _random_mlp_model()
    objective = objectives.MeanFlow()
    t, r = objective.sample_times(model, 20_000, generator=torch.Generator().manual_seed(0))
    assert bool((r <= t).all()) and bool((r >= 0).all()) and bool((t <= T).all())
    assert abs(float((r < t).double().mean()) - 0.25) < 0.02
    x = torch.randn(8, 2, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    t, r = (
        torch.full((8,), 700.0, dtype=torch.float64),
        torch.full((8,), 100.0, dtype=torch.float64),
    )
    plain = model.loss(x, t=t, r=r, noise=torch.ones_like(x), generator=g)
    weighted = DiffusionModel(
        model.nn_module, model.config.model_copy(update={"training_objective_kwargs": {}})
    ).loss(x, t=t, r=r, noise=torch.ones_like(x))
    model.objective.adaptive_p = 0.0
    squared = model.loss(x, t=t, r=r, noise=torch.ones_like(x))
    norm = squared.sum(1, keepdim=True)
    torch.testing.assert_close(weighted, squared / (norm + 1e-3))  # w = 1 / (||err||^2 + c)
    assert plain.shape == x.shape


# -- sampling ----------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["rectified_flow", "cosine"])
@pytest.mark.parametrize("steps", [1, 2])
def test_jumps_of_the_exact_average_velocity_are_the_analytic_flow_map(schedule, steps):
    model = exact_meanflow(noise_schedule_type=schedule)
    assert model.config.sampler_type == "flow_map"
    z = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = model.sample(16, steps, init_noise=z)
    alpha, sigma = model.process.alpha_sigma(torch.tensor([float(T), 0.0], dtype=torch.float64))
    sd_T = (alpha[0] ** 2 * S0**2 + sigma[0] ** 2).sqrt()
    sd_0 = (alpha[1] ** 2 * S0**2 + sigma[1] ** 2).sqrt()
    jump = alpha[1] * M + sd_0 / sd_T * (z - alpha[0] * M)  # x_0 = mu_0 + (S_0/S_T)(x_T - mu_T)
    torch.testing.assert_close(out, jump, rtol=0, atol=1e-10)
    if schedule == "rectified_flow":
        torch.testing.assert_close(out, M + S0 * z, rtol=0, atol=1e-10)


class Recording(nn.Module):
    end_time = True

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x: Tensor, t: Tensor, r: Tensor | None = None) -> Tensor:
        self.calls.append((t.tolist()[0], None if r is None else r.tolist()[0]))
        return self.inner(x, t, r)


def test_one_and_two_steps_call_the_network_once_per_jump():
    base = exact_meanflow()
    net = Recording(base.nn_module)
    model = DiffusionModel(net, base.config).double()
    model.sample(3, 1)
    assert net.calls == [(T, 0.0)]
    net.calls.clear()
    model.sample(3, 2)
    assert net.calls == [(T, T / 2), (T / 2, 0.0)]


def test_guidance_on_a_flow_map_model_is_refused():
    net = MLP(2, 16, 1, num_classes=3, end_time=True)
    model = DiffusionModel(net, input_shape=(2,), **RF, training_objective="meanflow")
    labels = torch.tensor([0, 1])
    model.sample(2, 1, cond={"class_labels": labels})  # conditional, unguided: fine
    with pytest.raises(ValueError, match="not the flow map of the guided ODE"):
        model.sample(2, 1, cond={"class_labels": labels}, guidance_scale=2.0)


def test_flow_map_on_a_one_time_model_is_euler_bitwise():
    torch.manual_seed(0)
    net = MLP(2, 16, 2)
    with torch.no_grad():
        net.output.weight.normal_()
    model = DiffusionModel(net, input_shape=(2,))
    z = torch.randn(8, 2)
    assert torch.equal(
        model.sample(8, 7, sampler="flow_map", init_noise=z),
        model.sample(8, 7, sampler="euler", init_noise=z),
    )


# -- networks, config, registry ---------------------------------------------------------------
def test_two_time_networks_embed_the_interval():
    torch.manual_seed(0)
    plain = MLP(2, 16, 2)
    two = MLP(2, 16, 2, end_time=True)
    assert "end_time" not in plain.config and two.config["end_time"] is True
    extra = set(two.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("condition.interval_embedding.") for k in extra)
    x, t = torch.randn(4, 2), torch.full((4,), 500.0)
    with torch.no_grad():
        two.output.weight.normal_()
        assert torch.equal(two(x, t), two(x, t, r=t))  # r = t by default
        assert torch.equal(two(x, t, r=torch.zeros(4)), two(x, t))  # interval output zeroed
        two.condition.interval_embedding[2].weight.normal_()
        assert not torch.allclose(two(x, t, r=torch.zeros(4)), two(x, t))
    with pytest.raises(TypeError, match="without end_time"):
        plain(x, t, r=t)
    unet = tinydiff.nn.UNet(1, 8, (1, 2), end_time=True, num_groups=4)
    out = unet(torch.randn(2, 1, 8, 8), torch.full((2,), 9.0), r=torch.zeros(2))
    assert out.shape == (2, 1, 8, 8)


def test_time_scale_scales_the_embedded_times():
    torch.manual_seed(0)
    scaled = MLP(2, 16, 2, end_time=True, time_scale=0.1)
    plain = MLP(2, 16, 2, end_time=True)
    plain.load_state_dict(scaled.state_dict())
    assert scaled.config["time_scale"] == 0.1 and "time_scale" not in plain.config
    with torch.no_grad():
        for p in (*scaled.output.parameters(), *scaled.condition.interval_embedding.parameters()):
            p.normal_()
        plain.load_state_dict(scaled.state_dict())
        x, t, r = (
            torch.randn(3, 2),
            torch.tensor([900.0, 500.0, 20.0]),
            torch.tensor([0.0, 250.0, 5.0]),
        )
        torch.testing.assert_close(scaled(x, t, r=r), plain(x, 0.1 * t, r=0.1 * r))
    assert MLP.from_config(scaled.config).config == scaled.config
    with pytest.raises(ValueError, match="time_scale"):
        MLP(2, time_scale=0.0)


def test_config_and_network_checks():
    with pytest.raises(ValueError, match="target_type='pred_velocity'"):
        tinydiff.DiffusionModelConfig(input_shape=(2,), training_objective="meanflow")
    with pytest.raises(ValueError, match="Did you mean 'meanflow'"):
        tinydiff.DiffusionModelConfig(input_shape=(2,), training_objective="meanflo")
    with pytest.raises(ValueError, match="two-time network.*end_time=True"):
        DiffusionModel(MLP(2), input_shape=(2,), **RF, training_objective="meanflow")
    with pytest.raises(ValueError, match="Accepted options"):
        tinydiff.DiffusionModelConfig(
            input_shape=(2,), **RF, training_objective="meanflow",
            training_objective_kwargs={"adaptive": 1},
        )  # fmt: skip
    cfg = tinydiff.DiffusionModelConfig(
        input_shape=(2,), **RF, training_objective="meanflow", sampler_type="euler"
    )
    assert cfg.sampler_type == "euler"
    assert tinydiff.DiffusionModelConfig(input_shape=(2,)).training_objective == "diffusion"
    with pytest.raises(TypeError, match="unexpected loss options"):
        DiffusionModel(MLP(2), input_shape=(2,)).loss(torch.randn(2, 2), r=torch.zeros(2))


def test_objectives_registry_takes_user_objectives():
    assert {"diffusion", "meanflow"} <= set(objectives.names())

    @objectives.register("half_diffusion_test")
    class Half(objectives.Diffusion):
        def loss(self, model: Any, x: Tensor, **options: Any) -> Tensor:
            return 0.5 * super().loss(model, x, **options)

    try:
        model = DiffusionModel(MLP(2), input_shape=(2,), training_objective="half_diffusion_test")
        x = torch.randn(4, 2)
        g1, g2 = (torch.Generator().manual_seed(0) for _ in range(2))
        base = DiffusionModel(model.nn_module, input_shape=(2,))
        assert torch.equal(model.loss(x, generator=g1), 0.5 * base.loss(x, generator=g2))
    finally:
        objectives.REGISTRY.unregister("half_diffusion_test")


# -- training, round trips ------------------------------------------------------------------------
RING = GaussianMixture([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0], [0.0, -2.0]], 0.5)


@pytest.fixture(scope="module")
def trained() -> Iterator[DiffusionModel]:
    """MLP(2, 64, 2, end_time=True), 300 Adam steps of batch 256 on four Gaussians (about 8 s
    on one thread; two threads on a shared 2-core machine are many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = DiffusionModel(MLP(2, 64, 2, end_time=True), input_shape=(2,), **RF,
                               training_objective="meanflow")  # fmt: skip
        opt = torch.optim.Adam(model.parameters(), 3e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(300):
            loss = model.loss(RING.sample(256, generator=g).float(), generator=g).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        yield model.eval()
    finally:
        torch.set_num_threads(threads)


def test_a_trained_one_step_model_is_far_closer_to_the_data_than_noise(trained):
    """Measured: energy distance 0.056 (1 step), 0.088 (2 steps), 0.224 (noise)."""
    g = torch.Generator().manual_seed(1)
    ref = RING.sample(2000, generator=g).float()
    one = energy_distance(trained.sample(2000, 1, generator=g), ref)
    two = energy_distance(trained.sample(2000, 2, generator=g), ref)
    noise = energy_distance(torch.randn(2000, 2, generator=g), ref)
    assert one < 0.4 * noise and two < 0.6 * noise, (one, two, noise)


def test_save_load_round_trip_is_bitwise_and_older_readers_refuse(trained, tmp_path, monkeypatch):
    trained.save_pretrained(tmp_path)
    doc = __import__("json").loads((tmp_path / "config.json").read_text())
    assert doc["schema_version"] == 4 and doc["model"]["training_objective"] == "meanflow"
    loaded = DiffusionModel.from_pretrained(tmp_path)
    assert loaded.config == trained.config and loaded.nn_module.end_time
    for a, b in zip(loaded.state_dict().values(), trained.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for steps in (1, 2):
        a, b = (
            m.sample(64, steps, generator=torch.Generator().manual_seed(3))
            for m in (loaded, trained)
        )
        assert torch.equal(a, b)
    monkeypatch.setattr(tinydiff.hub, "SCHEMA_VERSION", 3)  # a tinydiff that reads schema 3
    with pytest.raises(SerializationError, match="newer tinydiff.*upgrade"):
        DiffusionModel.from_pretrained(tmp_path)


def test_compiled_sampling_equals_eager(trained):
    trained.compile_sampler(backend="aot_eager")
    try:
        z = torch.randn(32, 2, generator=torch.Generator().manual_seed(4))
        for steps in (1, 2):
            eager = trained.sample(32, steps, init_noise=z)
            compiled = trained.sample(32, steps, init_noise=z, compile=True)
            torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
        assert len(trained.compiled_steps) == 1  # one compiled step serves 1 and 2 jumps
    finally:
        trained.compile_sampler()
