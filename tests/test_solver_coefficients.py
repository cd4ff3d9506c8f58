"""Per-step solver coefficients (unipc's ``correction_scale``) and their fit by
``optimize_timesteps(coefficients=True)``: None is the exact method bitwise, the limits are
known methods (all ones: the exact method; all zeros: DDIM), bad values are refused clearly,
the fitted result beats times alone and times with ``last_step_blend`` on held-out noise
against a converged reference, and it plugs into the config, the Hub files and compiled
sampling."""

from __future__ import annotations

import math

import pytest
import torch
from _models import exact_model

from tinydiff import DiffusionModel
from tinydiff.nn import MLP
from tinydiff.samplers.unipc import UniPC
from tinydiff.testing import GaussianMixture
from tinydiff.timestep_search import TimestepSearchResult, optimize_timesteps

MIX = GaussianMixture(torch.tensor([[-1.5, 0.0], [1.5, 0.5]]), torch.tensor([0.3, 0.5]))


@pytest.fixture(scope="module")
def flow() -> tuple[DiffusionModel, torch.Tensor, torch.Tensor]:
    """An exact rectified-flow mixture model, held-out noise and its converged solution
    (dpmpp_3m, 700 quadratic steps: 7e-6 from 1000)."""
    model = exact_model(MIX, noise_schedule_type="rectified_flow", target_type="pred_velocity")
    z = torch.randn(256, 2, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    ref = model.sample(256, 700, sampler="dpmpp_3m", timestep_spacing="quadratic", init_noise=z)
    return model, z, ref


@pytest.mark.parametrize("schedule", ["rectified_flow", "cosine"])
@pytest.mark.parametrize(
    ("sampler", "options"),
    [("unipc", {"order": 2}), ("unipc", {"order": 3}), ("dpmpp_2m", {})],
)
def test_limits_of_the_per_step_scale(schedule, sampler, options) -> None:
    """None: bitwise the exact method; all ones: the same to rounding; all zeros: every
    higher-order term gone, so the first-order data-prediction step, i.e. DDIM."""
    model = exact_model(MIX, noise_schedule_type=schedule)
    z = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for S in (3, 7):

        def run(S: int = S, **kw: object) -> torch.Tensor:
            return model.sample(
                32, S, sampler=sampler, timestep_spacing="trailing", init_noise=z,
                sampler_kwargs={**options, **kw},
            )  # fmt: skip

        exact = run()
        assert torch.equal(run(correction_scale=None), exact)
        torch.testing.assert_close(run(correction_scale=[1.0] * S), exact, rtol=0, atol=1e-12)
        ddim = model.sample(32, S, sampler="ddim", timestep_spacing="trailing", init_noise=z)
        torch.testing.assert_close(run(correction_scale=(0,) * S), ddim, rtol=0, atol=1e-12)
        halfway = run(correction_scale=[0.5] * S)  # (3 steps of dpmpp_2m on rectified flow:
        if S == 7:  # all first order, from lambda = -inf and to +inf, i.e. DDIM)
            assert not torch.allclose(halfway, exact) and not torch.allclose(halfway, ddim)


def test_bad_per_step_values_are_refused() -> None:
    for bad, kind, match in [
        (0.5, TypeError, "list/tuple of floats"),
        ([], ValueError, "empty"),
        ([1.0, "a"], TypeError, r"correction_scale\[1\]"),
        ([1.0, True], TypeError, r"correction_scale\[1\]"),
        ([1.0, math.nan], ValueError, r"\[1\] must be finite"),
        ([math.inf], ValueError, "finite"),
    ]:
        with pytest.raises(kind, match=match):
            UniPC(correction_scale=bad)
    model = exact_model(MIX, noise_schedule_type="rectified_flow")
    with pytest.raises(ValueError, match="3 entries but the sampling times have 5 steps"):
        model.sample(4, 5, sampler="unipc", sampler_kwargs={"correction_scale": [1.0] * 3})
    with pytest.raises(ValueError, match="expected num_steps = 5"):
        optimize_timesteps(
            model, 5, sampler="unipc", sampler_kwargs={"correction_scale": [1.0] * 3},
            coefficients=True, return_info=True, num_samples=8, reference_steps=20,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"\['rho'\], not tunable.*correction_scale"):
        optimize_timesteps(
            model, 5, sampler="unipc", coefficients=["rho"], return_info=True,
            num_samples=8, reference_steps=20,
        )  # fmt: skip
    with pytest.raises(TypeError, match="coefficients must be a bool or"):
        optimize_timesteps(model, 5, sampler="unipc", coefficients="all", return_info=True)


@pytest.mark.parametrize(("sampler", "steps"), [("unipc", 5), ("unipc", 8), ("dpmpp_2m", 8)])
def test_fitted_per_step_coefficients_beat_times_and_the_last_step_blend(
    sampler, steps, flow
) -> None:
    """On held-out noise, against the converged solution: times + every coefficient < times
    + unipc's last-step blend alone <= times alone (unipc: measured 0.51x / 0.22x of times
    alone and 0.77x / 0.59x of times + blend at S = 5 / 8, 96 / 120 runs on 128 noises;
    dpmpp_2m, S = 8: 0.86x of times alone)."""
    model, z, ref = flow
    budget = {"num_samples": 128, "reference_steps": 200, "max_evals": 40, "return_info": True}

    def fit(coefficients: bool | list[str]) -> TimestepSearchResult:
        res = optimize_timesteps(
            model, steps, sampler=sampler, coefficients=coefficients,
            generator=torch.Generator().manual_seed(0), **budget,
        )  # fmt: skip
        assert isinstance(res, TimestepSearchResult)
        return res

    def error(res: TimestepSearchResult) -> float:
        out = model.sample(
            256, steps, sampler=res.sampler, sampler_kwargs=res.sampler_kwargs,
            timestep_spacing=res.timesteps, init_noise=z,
        )  # fmt: skip
        return float((out - ref).norm(dim=1).mean())

    times, full = fit(False), fit(True)
    scales = full.sampler_kwargs["correction_scale"]
    assert isinstance(scales, list) and len(scales) == steps
    assert all(0.0 <= s <= 2.0 for s in scales) and scales != [1.0] * steps
    blend_runs = 16 if sampler == "unipc" else 0
    assert full.evaluations <= times.evaluations + blend_runs + 8 * steps
    e_times, e_full = error(times), error(full)
    if sampler == "dpmpp_2m":
        assert e_full < 0.9 * e_times, (e_times, e_full)
        return
    blend = fit(["last_step_blend"])
    assert "correction_scale" not in blend.sampler_kwargs
    e_blend = error(blend)
    assert e_full < 0.85 * e_blend and e_blend <= e_times, (e_times, e_blend, e_full)


def test_fitted_coefficients_plug_into_config_hub_and_compiled_sampling(flow, tmp_path) -> None:
    """The fitted sampler_kwargs (a list per step) are plain JSON: a config holding them with
    the times samples bitwise as the direct call, compiled as eager, and after a Hub round
    trip (on an MLP, whose weights the files hold)."""
    model, z, _ = flow
    res = optimize_timesteps(
        model, 5, sampler="unipc", coefficients=True, generator=torch.Generator().manual_seed(0),
        num_samples=32, reference_steps=100, max_evals=10, return_info=True,
    )  # fmt: skip
    assert isinstance(res, TimestepSearchResult)
    update = {
        "sampler_type": res.sampler,
        "sampler_kwargs": res.sampler_kwargs,
        "timestep_spacing": tuple(res.timesteps.tolist()),
    }
    configured = DiffusionModel(model.nn_module, model.config.model_copy(update=update))
    direct = model.sample(
        16, 5, sampler="unipc", sampler_kwargs=res.sampler_kwargs,
        timestep_spacing=res.timesteps, init_noise=z[:16],
    )  # fmt: skip
    assert torch.equal(configured.sample(16, init_noise=z[:16]), direct)
    configured.compile_sampler(backend="eager")
    torch.testing.assert_close(configured.sample(16, init_noise=z[:16], compile=True), direct)

    torch.manual_seed(0)
    config = model.config.model_copy(update={**update, "target_type": "pred_velocity"})
    mlp = DiffusionModel(MLP(2, hidden_dim=16, num_layers=2), config).to(torch.float64)
    for p in mlp.nn_module.parameters():  # the built-in nets zero their output layer
        torch.nn.init.normal_(p, std=0.3)
    mlp.save_pretrained(tmp_path)
    loaded = DiffusionModel.from_pretrained(tmp_path).to(torch.float64)
    assert loaded.config.sampler_kwargs == res.sampler_kwargs
    assert torch.equal(loaded.sample(16, init_noise=z[:16]), mlp.sample(16, init_noise=z[:16]))
    again = mlp.sample(
        16, 5, sampler="unipc", sampler_kwargs=res.sampler_kwargs,
        timestep_spacing=res.timesteps, init_noise=z[:16],
    )  # fmt: skip
    assert torch.equal(loaded.sample(16, init_noise=z[:16]), again)


def test_damped_curvature_of_dpmpp_3m() -> None:
    """curvature_weight: 1 is the exact method bitwise; the damped weights integrate every
    line in lambda exactly (only the curvature term changes) and the quadratic
    (lambda - lambda_i)^2 with c times the exact weight; bad values are refused."""
    from tinydiff.samplers.dpmpp_3m import DPMSolverPP3M, _damp_curvature

    model = exact_model(MIX, noise_schedule_type="cosine")
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    run = lambda **kw: model.sample(  # noqa: E731
        16, 9, sampler="dpmpp_3m", sampler_kwargs=kw, init_noise=z, timestep_spacing="trailing"
    )
    assert torch.equal(run(curvature_weight=1.0), run())
    assert not torch.allclose(run(curvature_weight=0.5), run())
    w, lam = [0.9, -0.5, 0.2], [1.0, 0.4, -0.3]
    for c in (0.0, 0.5):
        d = _damp_curvature(w, lam, c)
        for f, factor in ((lambda x: 1.0, 1.0), (lambda x: x, 1.0), (lambda x: (x - 1) ** 2, c)):
            exact = sum(wj * f(lj) for wj, lj in zip(w, lam, strict=True))
            damped = sum(dj * f(lj) for dj, lj in zip(d, lam, strict=True))
            want = factor * exact
            assert math.isclose(damped, want, rel_tol=1e-12, abs_tol=1e-12), (c, damped, want)
    for bad in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="curvature_weight"):
            DPMSolverPP3M(curvature_weight=bad)  # type: ignore[arg-type]
