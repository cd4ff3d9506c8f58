"""SDEdit (``sample(x_start=..., strength=...)``) and inversion (``invert``) on exact
Gaussian-mixture denoisers: against closed forms (the hand-noised start, floor(s S) steps),
round trips to the data, and the solvers' orders of convergence."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from _models import RING, exact_model

from tinydiff import DiffusionModel, editing, sampling
from tinydiff.testing import ClassConditionalDenoiser, ClassConditionalMixture, GaussianMixture

LINEAR = {"noise_schedule_type": "linear"}
FLOW = {"noise_schedule_type": "rectified_flow", "target_type": "pred_velocity"}
X = RING.sample(32, torch.Generator().manual_seed(0))


def gen(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Calls(torch.nn.Module):
    """Counts network calls."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(x, t)


def counted(**config: Any) -> tuple[DiffusionModel, Calls]:
    model = exact_model(**config)
    counter = Calls(model.nn_module)
    model.nn_module = counter
    return model, counter


def round_trip(model: DiffusionModel, sampler: str, steps: int, **kw: Any) -> float:
    x_t = model.invert(X, steps, sampler=sampler, **kw)
    back = model.sample(len(X), steps, sampler=sampler, init_noise=x_t)
    return float((back - X).norm() / X.norm())


# -- SDEdit --------------------------------------------------------------------------------------
def test_sdedit_strength_one_is_sampling_from_the_hand_noised_start() -> None:
    model = exact_model(**LINEAR)
    T = float(model.num_timesteps)
    ab = float(model.alpha_bar(T))  # x_T = sqrt(ab) x + sqrt(1 - ab) z, z from the generator
    z = torch.randn(X.shape, generator=gen(), dtype=torch.float64)
    start = math.sqrt(ab) * X + math.sqrt(1 - ab) * z
    expected = model.sample(len(X), 10, sampler="dpmpp_2m", init_noise=start)
    out = model.sample(len(X), 10, sampler="dpmpp_2m", x_start=X, strength=1.0, generator=gen())
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_sdedit_strength_one_is_bitwise_plain_sampling_where_alpha_T_is_zero() -> None:
    model = exact_model(**FLOW)
    plain = model.sample(len(X), 8, sampler="ddpm", generator=gen())
    edited = model.sample(len(X), 8, sampler="ddpm", x_start=X, strength=1.0, generator=gen())
    assert torch.equal(plain, edited)


def test_sdedit_strength_zero_returns_a_copy_of_x_in_the_network_dtype() -> None:
    model, calls = counted()
    x32 = X.float()
    out = model.sample(len(X), 10, x_start=x32, strength=0.0)
    assert out.dtype == torch.float64 and torch.equal(out, x32.double()) and calls.calls == 0
    same = model.sample(len(X), 10, x_start=X, strength=0.09)  # floor(0.9) = 0 steps
    assert torch.equal(same, X) and same.data_ptr() != X.data_ptr()


@pytest.mark.parametrize(("strength", "k"), [(0.35, 3), (0.5, 5), (0.99, 9), (0.1, 1)])
def test_sdedit_runs_the_last_floor_s_S_steps_from_the_noised_start(
    strength: float, k: int
) -> None:
    model, calls = counted(**LINEAR)
    times = model.sampling_timesteps(10, sampler="ddim")
    traj = model.sample(
        len(X), 10, sampler="ddim", x_start=X, strength=strength, generator=gen(),
        return_trajectory=True,
    )  # fmt: skip
    assert calls.calls == k and traj.shape[0] == k + 1
    t = times[10 - k]  # the first of the last k steps
    ab = float(model.alpha_bar(t))
    z = torch.randn(X.shape, generator=gen(), dtype=torch.float64)
    torch.testing.assert_close(traj[0], math.sqrt(ab) * X + math.sqrt(1 - ab) * z)


def test_sdedit_errors_come_before_any_network_call() -> None:
    model, calls = counted()
    with pytest.raises(ValueError, match="not both"):
        model.sample(len(X), 10, x_start=X, strength=0.5, init_noise=X)
    with pytest.raises(ValueError, match="strength must be <= 1"):
        model.sample(len(X), 10, x_start=X, strength=1.5)
    with pytest.raises(ValueError, match="strength must be >= 0"):
        model.sample(len(X), 10, x_start=X, strength=-0.1)
    with pytest.raises(ValueError, match="go together"):
        model.sample(len(X), 10, x_start=X)
    with pytest.raises(ValueError, match="go together"):
        model.sample(len(X), 10, strength=0.5)
    with pytest.raises(ValueError, match="x_start must have shape"):
        model.sample(3, 10, x_start=X, strength=0.5)
    with pytest.raises(TypeError, match="strength"):
        model.sample(len(X), 10, x_start=X, strength="high")
    assert calls.calls == 0


def test_sdedit_start_is_the_functional_form() -> None:
    model = exact_model()
    times = model.sampling_timesteps(4)
    tail, x_t = editing.sdedit_start(model.process, times, X, 0.5, gen())
    assert torch.equal(tail, times[2:]) and x_t.shape == X.shape


# -- inversion -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sampler", "order", "config"),
    [
        ("dpmpp_2m", 2, LINEAR),
        ("dpmpp_3m", 3, LINEAR),
        ("dpmpp_2m", 2, FLOW),
        # DDIM and Heun are inverted step by step, one fixed-point iteration each: the inverse
        # of the step has local error O(h^3), so the round trip is second order for both
        ("ddim", 2, LINEAR),
        ("heun", 2, LINEAR),
    ],
)
def test_round_trip_error_falls_at_the_solvers_order(
    sampler: str, order: int, config: dict[str, Any]
) -> None:
    model = exact_model(**config)
    coarse, fine = round_trip(model, sampler, 20), round_trip(model, sampler, 40)
    measured = math.log2(coarse / fine)
    assert order - 0.3 < measured < order + 0.7, (coarse, fine, measured)


@pytest.mark.parametrize("name", editing.deterministic_samplers())
def test_every_deterministic_sampler_inverts(name: str) -> None:
    for config in (LINEAR, FLOW):
        assert round_trip(exact_model(**config), name, 30) < 0.08  # ddim, euler: 0.06


@pytest.mark.parametrize("config", [LINEAR, FLOW], ids=["vp", "flow"])
def test_fixed_point_refinement_is_near_exact_at_50_steps(config: dict[str, Any]) -> None:
    model, calls = counted(**config)
    plain = round_trip(model, "dpmpp_2m", 50)
    calls.calls = 0
    refined = round_trip(model, "dpmpp_2m", 50, fixed_point_iters=2)
    assert refined < 1e-4 < plain
    assert calls.calls == 6 * 50 + 50  # (2k + 2) S to invert, S to sample back


def test_inversion_makes_S_network_calls_and_calls_back_each_step() -> None:
    model, calls = counted(**LINEAR)
    times = model.sampling_timesteps(6, sampler="unipc")
    seen: list[tuple[int, float]] = []

    def callback(i: int, t_next: float, x_next: torch.Tensor, x0: Any) -> None:
        assert x_next.shape == X.shape and x0 is not None and x0.shape == X.shape
        seen.append((i, t_next))

    model.invert(X, 6, sampler="unipc", callback=callback)
    assert calls.calls == 6
    assert seen == list(zip(range(6), times.flip(0)[1:].tolist(), strict=True))


def test_callback_replacement_is_used() -> None:
    model = exact_model(**LINEAR)
    zeros = model.invert(X, 5, sampler="ddim", callback=lambda i, t, x, x0: torch.zeros_like(x))
    assert torch.equal(zeros, torch.zeros_like(X))


@pytest.mark.parametrize(
    ("sampler", "options"),
    [("ddpm", None), ("ddim", {"eta": 0.5}), ("dpmpp_2m_sde", None), ("heun", {"s_churn": 1.0})],
)
def test_stochastic_samplers_are_refused_before_any_network_call(
    sampler: str, options: dict[str, Any] | None
) -> None:
    model, calls = counted()
    with pytest.raises(ValueError, match=r"cannot be inverted.*ddim.*dpmpp_2m"):
        model.invert(X, 5, sampler=sampler, sampler_kwargs=options)
    assert calls.calls == 0


def test_bad_inversion_arguments() -> None:
    model, calls = counted()
    with pytest.raises(ValueError, match="fixed_point_iters >= 0"):
        model.invert(X, 5, sampler="ddim", fixed_point_iters=-1)
    with pytest.raises(TypeError, match="fixed_point_iters"):
        model.invert(X, 5, sampler="ddim", fixed_point_iters=1.5)
    with pytest.raises(ValueError, match=r"x must have shape"):
        model.invert(X[:, :1], 5, sampler="ddim")
    with pytest.raises(TypeError, match="generator"):
        model.invert(X, 5, sampler="ddim", generator=3)
    assert calls.calls == 0


def test_default_sampler_is_the_configs_and_runs_in_eval_mode() -> None:
    model = exact_model(**LINEAR, sampler_type="dpmpp_2m")
    model.train()
    x_t = model.invert(X, 40)  # the config's sampler, as sample() uses
    assert model.training and not x_t.requires_grad
    back = model.sample(len(X), 40, init_noise=x_t)
    assert float((back - X).norm() / X.norm()) < 0.02


def test_functional_invert_matches_the_model_method() -> None:
    model = exact_model(**LINEAR)
    times = model.sampling_timesteps(12, sampler="dpmpp_2m")
    x_t = editing.invert(model.denoiser(), model.process, "dpmpp_2m", times, X)
    assert torch.equal(x_t, model.invert(X, 12, sampler="dpmpp_2m"))
    back = sampling.sample(model.denoiser(), model.process, "dpmpp_2m", times, x_t)
    assert float((back - X).norm() / X.norm()) < 0.1


def test_compiled_refinement_equals_eager() -> None:
    model = exact_model(**LINEAR).compile_sampler(backend="eager")
    eager = model.invert(X, 8, sampler="dpmpp_2m", fixed_point_iters=1)
    compiled = model.invert(X, 8, sampler="dpmpp_2m", fixed_point_iters=1, compile=True)
    torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-10)


def test_guided_inversion_round_trips_with_the_same_guidance() -> None:
    classes = ClassConditionalMixture(
        [GaussianMixture([[2.0, 0.0], [0.0, 2.0]], 0.4), GaussianMixture([[-2.0, 0.0]], 0.5)],
        [0.5, 0.5],
    )
    config = {"input_shape": (2,), **LINEAR}
    model = DiffusionModel(ClassConditionalDenoiser(classes, config), config).double()
    labels = torch.tensor([0, 1] * 8)
    x, _ = classes.sample(16, gen(), labels=labels)
    run = {"sampler": "dpmpp_2m", "cond": {"class_labels": labels}, "guidance_scale": 2.0}
    x_t = model.invert(x, 40, fixed_point_iters=1, **run)
    back = model.sample(16, 40, init_noise=x_t, **run)
    assert float((back - x).norm() / x.norm()) < 1e-3
    unguided = model.sample(16, 40, init_noise=x_t, sampler="dpmpp_2m")
    assert float((unguided - x).norm() / x.norm()) > 1e-2  # the guidance was inverted too
