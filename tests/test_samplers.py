"""Samplers against mathematics: convergence to the exact probability-flow ODE solution at
the expected order, distributions of stochastic samplers, robustness over every registered
component, NFE accounting, option validation and plugins."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from _models import RING as MIX
from _models import exact_model
from torch import Tensor, nn

import tinydiff
from tinydiff import DiffusionModel, samplers, schedules, spacings, targets
from tinydiff.testing import ExactDenoiser, GaussianMixture, probability_flow_reference

T = 1000


def noise(n: int, dim: int = 2, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64)


# -- the reference solver itself, against a closed form ------------------------------------


@pytest.mark.parametrize("denoise_end", [False, True])
def test_reference_solver_matches_the_affine_flow_of_a_single_gaussian(denoise_end):
    r"""For x0 ~ N(mu, s^2 I) the marginal at a noise level is N(a mu, (a^2 s^2 + 1 - a^2) I)
    and the probability-flow map is affine: x_e = a_e mu + k_e / k_s (x_s - a_s mu),
    k = sqrt(a^2 s^2 + 1 - a^2); the posterior mean is mu + a s^2 / k^2 (x - a mu)."""
    mu, s = torch.tensor([0.7, -1.3], dtype=torch.float64), 0.2
    single = GaussianMixture(mu[None], s)
    ab_s, ab_e = 2e-4, 0.9999
    x = noise(16)
    got = probability_flow_reference(single, x, ab_s, ab_e, num_steps=300, denoise_end=denoise_end)
    a_s, a_e = math.sqrt(ab_s), math.sqrt(ab_e)
    k_s, k_e = math.sqrt(ab_s * s**2 + 1 - ab_s), math.sqrt(ab_e * s**2 + 1 - ab_e)
    want = a_e * mu + k_e / k_s * (x - a_s * mu)
    if denoise_end:
        want = mu + a_e * s**2 / k_e**2 * (want - a_e * mu)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


# -- convergence to the probability-flow ODE solution --------------------------------------

# expected observed order (lower bound, upper bound or None); samplers missing from this table
# (plugins) only need to converge (order >= 0.8) when deterministic
ORDERS: dict[str, tuple[dict[str, Any], float, float | None]] = {
    "ddim": ({"eta": 0.0}, 0.8, 1.3),
    "euler": ({}, 0.8, 1.3),
    "heun": ({}, 1.8, None),
    "dpmpp_2m": ({}, 1.8, None),
    "dpmpp_2m_sde": ({"eta": 0.0}, 1.8, None),  # eta = 0 is DPM-Solver++(2M)
    "dpmpp_3m": ({}, 2.5, None),
    "unipc": ({}, 1.8, None),
}
# non-default options whose order is claimed too: (name, kwargs, lower bound)
OPTION_ORDERS = [
    ("unipc", {"rho": None}, 1.8),
    ("unipc", {"variant": "bh1"}, 1.8),
    ("unipc", {"order": 3, "variant": "bh1"}, 2.5),
    ("dpmpp_3m", {"curvature_weight": 0.5}, 1.8),
    ("dpmpp_3m", {"curvature_weight": 0.0}, 1.8),
]


@pytest.mark.parametrize(("kwargs", "low"), [({}, 1.8), ({"order": 3}, 2.5)])
def test_deis_converges_to_the_flow_at_its_order_up_to_t_1(kwargs, low):
    """DEIS keeps its order on the last step (h = inf), so it approximates x(0), not the
    pf_reference target D(x(1), 1); its order is checked on the iterate at t = 1 (logsnr
    spacing: t_{S-1} = 1) against the exact flow to t = 1. (Measured for order 2 (3) over
    20-40-80-160 steps: 1.76 (2.42), 1.87 (2.81), 1.93 (2.95).)"""
    model = exact_model(noise_schedule_type="linear", target_type="pred_v")
    z = noise(64)
    ref = probability_flow_reference(
        MIX,
        z,
        float(model.alpha_bar(float(T))),
        float(model.alpha_bar(1.0)),
        num_steps=2000,
        denoise_end=False,
    )
    errs = []
    for steps in (40, 80):  # eps in lambda settles later than D: orders 1.76 / 1.87 / 1.93
        traj = model.sample(
            64,
            steps,
            sampler="deis",
            sampler_kwargs=kwargs,
            init_noise=z,
            timestep_spacing="logsnr",
            return_trajectory=True,
        )
        errs.append(((traj[-2] - ref) ** 2).mean().sqrt().item())
    order = math.log2(errs[0] / errs[1])
    assert errs[1] < 0.07, errs
    assert order >= low, (errs, order)


@pytest.fixture(scope="module")
def pf_reference() -> Iterator[tuple[DiffusionModel, Tensor, Tensor]]:
    """The exact flow from t = T to t = 1, then the x0 estimate there.

    Every sampler's last step (t_{S-1} -> 0) returns its x0 estimate D(x_{S-1}, t_{S-1}),
    first order necessarily: the step to sigma = 0 has h = inf in log-SNR. With a spacing
    whose last nonzero time is fixed (``logsnr``: t_{S-1} = 1 for every S), the samplers
    therefore approximate D(x(1), 1) of the exact flow from t_0 = T, which is what the
    reference computes; the error is then the ODE solver's error alone. (With ``trailing``
    spacing t_{S-1} = T/S moves with S, and the O(sigma(t_{S-1})^2) = O(1/S) gap between
    D(x(t_{S-1})) and x(0) would mask second-order convergence.)
    """
    model = exact_model(noise_schedule_type="linear", target_type="pred_v")
    z = noise(64)
    ref = probability_flow_reference(
        MIX, z, float(model.alpha_bar(float(T))), float(model.alpha_bar(1.0)), num_steps=2000
    )
    yield model, z, ref


@pytest.mark.parametrize("name", samplers.names())
def test_deterministic_samplers_converge_to_the_flow_at_their_order(name, pf_reference):
    model, z, ref = pf_reference
    kwargs, low, high = ORDERS.get(name, ({}, 0.8, None))
    if model.make_sampler(name, kwargs).is_stochastic:
        pytest.skip(f"{name} is stochastic with default options")
    if name == "deis":
        pytest.skip("deis targets x(0); see test_deis_converges_to_the_flow_at_its_order_up_to_t_1")
    coarse, fine = 20, 40  # the asymptotic regime for this mixture (checked: orders settle)
    errs = []
    for steps in (coarse, fine):
        out = model.sample(
            64, steps, sampler=name, sampler_kwargs=kwargs, init_noise=z, timestep_spacing="logsnr"
        )
        errs.append(((out - ref) ** 2).mean().sqrt().item())
    order = math.log2(errs[0] / errs[1])
    assert errs[1] < 0.07, errs
    assert order >= low, (errs, order)
    if high is not None:
        assert order <= high, (errs, order)


@pytest.mark.parametrize(("name", "kwargs", "low"), OPTION_ORDERS)
def test_sampler_options_keep_the_convergence_order(name, kwargs, low, pf_reference):
    model, z, ref = pf_reference
    errs = []
    for steps in (20, 40):
        out = model.sample(
            64, steps, sampler=name, sampler_kwargs=kwargs, init_noise=z, timestep_spacing="logsnr"
        )
        errs.append(((out - ref) ** 2).mean().sqrt().item())
    order = math.log2(errs[0] / errs[1])
    assert errs[1] < 0.07, errs
    assert order >= low, (errs, order)


def test_euler_is_ddim_eta_zero():
    """Karras et al. 2022 (sec. 3): Euler in sigma/alpha on x/alpha is DDIM (eta = 0)."""
    model = exact_model(noise_schedule_type="cosine")
    z = noise(32)
    a = model.sample(32, 13, sampler="euler", init_noise=z)
    b = model.sample(32, 13, sampler="ddim", init_noise=z)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_dpmpp_2m_sde_with_eta_zero_is_dpmpp_2m():
    model = exact_model(noise_schedule_type="cosine", target_type="pred_v", zero_terminal_snr=True)
    z = noise(32)
    a = model.sample(32, 9, sampler="dpmpp_2m_sde", sampler_kwargs={"eta": 0.0}, init_noise=z)
    b = model.sample(32, 9, sampler="dpmpp_2m", init_noise=z)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


# -- distributions --------------------------------------------------------------------------

WEIGHTED = GaussianMixture(
    [[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0], [0.0, -2.0]], 0.3, weights=[0.4, 0.3, 0.2, 0.1]
)
STOCHASTIC_EXTRA = [("ddim", {"eta": 1.0}), ("heun", {"s_churn": 20.0})]


# consistency: exact only with a consistency function, not a denoiser (tests/test_consistency.py)
DENOISER_SAMPLERS = [n for n in samplers.names() if n != "consistency"]


@pytest.mark.parametrize(
    ("name", "kwargs"), [(n, {}) for n in DENOISER_SAMPLERS] + STOCHASTIC_EXTRA
)
def test_samplers_reproduce_mean_covariance_and_mode_weights(name, kwargs):
    """n = 4000 samples. Each statistic is compared with its exact value within k = 5
    standard errors estimated from the samples (SE of a mean: std / sqrt(n); of a covariance
    entry: std of the centred products / sqrt(n); of a mode weight: sqrt(w (1 - w) / n)).
    At 5 SE a correct sampler fails with probability < 1e-5 per statistic; the sampling
    bias at 60 steps (checked: an order of magnitude below) leaves that margin intact.

    ``logsnr`` spacing: with ``trailing`` on the cosine schedule the first step spans
    sigma(T)/sigma(T - T/S) ~ 500, where Karras' Heun trapezoid over-corrects by ~1/(2q)
    (q = sigma ratio) and needs ~120 steps (a property of the method, see its docstring)."""
    model = exact_model(WEIGHTED, noise_schedule_type="cosine", sigma_type="lower_bound")
    n, k = 4000, 5.0
    steps = 60 if model.make_sampler(name, kwargs).nfe(60) <= 120 else 30
    g = torch.Generator().manual_seed(1234)
    x = model.sample(
        n, steps, sampler=name, sampler_kwargs=kwargs, generator=g, timestep_spacing="logsnr"
    )
    assert torch.isfinite(x).all()
    mean = x.mean(0)
    se_mean = x.std(0) / math.sqrt(n)
    assert ((mean - WEIGHTED.mean()).abs() <= k * se_mean).all(), (mean, WEIGHTED.mean())
    xc = x - WEIGHTED.mean()
    prods = xc[:, :, None] * xc[:, None, :]
    cov, se_cov = prods.mean(0), prods.std(0) / math.sqrt(n)
    assert ((cov - WEIGHTED.covariance()).abs() <= k * se_cov).all(), (cov, WEIGHTED.covariance())
    freq = torch.bincount(WEIGHTED.responsibilities(x).argmax(1), minlength=4).double() / n
    w = WEIGHTED.weights
    assert ((freq - w).abs() <= k * (w * (1 - w) / n).sqrt()).all(), (freq, w)


# -- every sampler x schedule x target x variance (x zero terminal SNR) ---------------------

MATRIX = [
    (s, sched, tgt, var, zts)
    for s in samplers.names()
    for sched in schedules.names()
    for tgt in targets.names()
    for var in ("upper_bound", "learned_range")
    for zts in (False, True)
    if not (zts and not getattr(targets.get(tgt), "supports_zero_snr", True))
    # zero terminal SNR rescales discrete tables; a continuous path sets alpha(1) = 0 itself
    if not (zts and schedules.is_path(sched))
]


@pytest.mark.parametrize(("name", "schedule", "target", "variance", "zts"), MATRIX)
def test_every_combination_gives_finite_samples(name, schedule, target, variance, zts):
    """Finite samples, or a refusal in the config that says why (never a NaN)."""
    cfg = {"noise_schedule_type": schedule, "target_type": target, "sigma_type": variance}
    try:
        tinydiff.DiffusionModelConfig(input_shape=(2,), zero_terminal_snr=zts, **cfg)
    except ValueError as err:
        assert any(w in str(err) for w in ("cannot", "needs", "rescales")), err
        return
    model = exact_model(**cfg, zero_terminal_snr=zts)
    g = torch.Generator().manual_seed(0)
    x = model.sample(4, 10, sampler=name, generator=g)
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("zts", [False, True])
@pytest.mark.parametrize("spacing", spacings.names())
@pytest.mark.parametrize("name", samplers.names())
def test_every_sampler_with_every_spacing(name, spacing, zts):
    model = exact_model(noise_schedule_type="linear", target_type="pred_v", zero_terminal_snr=zts)
    g = torch.Generator().manual_seed(0)
    for steps in (1, 2, 8):
        x = model.sample(4, steps, sampler=name, timestep_spacing=spacing, generator=g)
        assert torch.isfinite(x).all()


@pytest.mark.parametrize("name", samplers.names())
def test_plans_are_finite_under_zero_terminal_snr(name):
    model = exact_model(target_type="pred_v", zero_terminal_snr=True)
    ts = model.sampling_timesteps(7)
    path = model.process.path_values(ts)
    assert path.alpha[0] == 0
    for col, value in model.make_sampler(name).plan(path).items():
        assert torch.isfinite(value).all(), col


# -- NFE ------------------------------------------------------------------------------------


class Counting(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        assert (t > 0).all(), "the network must never be called at t = 0"
        return self.inner(x, t)


@pytest.mark.parametrize("name", samplers.names())
def test_network_calls_equal_nfe(name):
    config = {"input_shape": (2,), "num_timesteps": T}
    net = Counting(ExactDenoiser(MIX, config))
    model = DiffusionModel(net, config).double()
    sampler = model.make_sampler(name)
    for steps in (1, 3, 7):
        net.calls = 0
        model.sample(2, steps, sampler=name)
        assert net.calls == sampler.nfe(steps)


# -- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", samplers.names())
def test_unknown_option_is_a_type_error_listing_the_accepted_ones(name):
    with pytest.raises(TypeError, match="Accepted options"):
        samplers.get(name).check_options({"no_such_option": 1})


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("heun", {"s_churn": -1.0}),
        ("heun", {"s_tmin": 2.0, "s_tmax": 1.0}),
        ("heun", {"s_noise": -0.5}),
        ("dpmpp_2m_sde", {"eta": -1.0}),
        ("dpmpp_3m", {"lower_order_final": "yes"}),
        ("unipc", {"order": 4}),
        ("unipc", {"order": 0}),
        ("unipc", {"variant": "bh3"}),
        ("unipc", {"rho": 0.0}),
        ("unipc", {"last_step_blend": 1.0}),
        ("unipc", {"last_step_blend": -0.1}),
        ("deis", {"order": 4}),
    ],
)
def test_bad_option_values_are_value_errors(name, kwargs):
    with pytest.raises(ValueError):
        samplers.get(name).check_options(kwargs)


# -- plugins ----------------------------------------------------------------------------------


def test_user_defined_sampler_works_end_to_end():
    @tinydiff.samplers.register("test_x0_jump")
    class X0Jump(tinydiff.samplers.Sampler):
        """Jump to the x0 estimate, then renoise deterministically (DDIM in two lines)."""

        def plan(self, timesteps: Tensor, alpha_bar: Tensor) -> dict[str, Tensor]:
            ab_next = alpha_bar[1:]
            return {"a": ab_next.sqrt(), "s": (1 - ab_next).sqrt()}

        def step(self, x, state, c, denoise, noise):  # type: ignore[no-untyped-def]
            pred = denoise(x, c["t"], c["alpha_bar"])
            return c["a"] * pred.x0 + c["s"] * pred.eps, state

    try:
        model = exact_model(noise_schedule_type="cosine", sampler_type="test_x0_jump")
        z = noise(8)
        out = model.sample(8, 12, init_noise=z)
        torch.testing.assert_close(out, model.sample(8, 12, sampler="ddim", init_noise=z))
    finally:
        samplers.REGISTRY.unregister("test_x0_jump")
