"""Rectified flow and EDM against mathematics: closed forms of the paths and targets, every
sampler's convergence to the exact probability-flow solution at its order, moments of the
stochastic samplers, diffusers' FlowMatch / EDM schedulers driven by the same exact
denoiser, the ODE likelihood against the mixture's true density, and a short training run."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from _models import RING as MIX
from _models import exact_model
from torch import Tensor

from tinydiff import DiffusionModel, DiffusionModelConfig, samplers, time_sampling
from tinydiff.process import Point
from tinydiff.targets import EDM, PredVelocity
from tinydiff.testing import GaussianMixture, probability_flow_reference

T = 1000

PROCESSES: dict[str, dict[str, Any]] = {
    "rf": {"noise_schedule_type": "rectified_flow", "target_type": "pred_velocity"},
    "rf_shift3": {
        "noise_schedule_type": "rectified_flow",
        "schedule_kwargs": {"shift": 3.0},
        "target_type": "pred_velocity",
    },
    "edm": {"noise_schedule_type": "edm", "target_type": "edm"},
}


def gauss(n: int, dim: int = 2, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64)


# -- closed forms --------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_rectified_flow_path_shift_and_velocity_closed_forms(shift):
    model = exact_model(**PROCESSES["rf"], schedule_kwargs={"shift": shift})
    t = torch.linspace(0, T, 11, dtype=torch.float64)
    s = t / T
    sp = shift * s / (1 + (shift - 1) * s)  # Esser et al. 2024, eq. 23
    alpha, sigma = model.process.alpha_sigma(t)
    torch.testing.assert_close(alpha, 1 - sp, rtol=0, atol=1e-15)
    torch.testing.assert_close(sigma, sp, rtol=0, atol=1e-15)
    # d s'/ds = shift / (1 + (shift - 1) s)^2; u = d x_t / ds = (eps - x0) d s'/ds
    d_alpha, d_sigma = model.process.derivatives(t)
    jac = shift / (1 + (shift - 1) * s) ** 2
    torch.testing.assert_close(d_sigma, jac, rtol=1e-12, atol=0)
    torch.testing.assert_close(d_alpha, -jac, rtol=1e-12, atol=0)
    # the closed-form inverse of lambda
    inner = t[1:-1]
    torch.testing.assert_close(model.process.time_at_lam(model.process.lam(inner)), inner)
    assert model.process.lam(float(T)) == -math.inf
    x0, eps = gauss(5), gauss(5, seed=1)
    p = Point(*(torch.tensor(v) for v in (500.0, 0.5, 0.5, -1.0, 1.0)))
    torch.testing.assert_close(PredVelocity().target(x0, eps, p), eps - x0)
    x0_hat, eps_hat = PredVelocity().to_x0_eps(eps - x0, 0.5 * x0 + 0.5 * eps, p)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)


def test_edm_path_ends_and_karras_levels():
    """sigma(0) = sigma_min, sigma(T) = sigma_max, and evenly spaced t are Karras et al.'s
    eq. 5 levels with rho = 7; prior std sqrt(1 + sigma_max^2)."""
    model = exact_model(**PROCESSES["edm"])
    n = 9
    t = torch.linspace(T, 0, n, dtype=torch.float64)
    alpha, sigma = model.process.alpha_sigma(t)
    i = torch.arange(n, dtype=torch.float64)
    lo, hi = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
    karras = (hi + i / (n - 1) * (lo - hi)) ** 7
    torch.testing.assert_close(sigma, karras, rtol=1e-13, atol=0)
    torch.testing.assert_close(alpha, torch.ones_like(alpha))
    assert model.process.prior_std() == pytest.approx(math.sqrt(1 + 80.0**2), rel=1e-14)


def test_edm_preconditioning_is_table_1_and_the_l2_loss_is_edm_weighted():
    sd, sig = 0.5, torch.tensor([0.01, 0.3, 2.0, 40.0], dtype=torch.float64)[:, None]
    target = EDM()
    one = torch.ones_like(sig)
    p = Point(torch.zeros_like(sig), one, sig, 0 * sig, 0 * sig)
    x0, eps = gauss(4), gauss(4, seed=1)
    x_t = x0 + sig * eps
    x_in, c_noise = target.network_input(x_t, p)
    torch.testing.assert_close(x_in, x_t / torch.sqrt(sig**2 + sd**2))
    torch.testing.assert_close(c_noise, torch.log(sig) / 4)
    f = gauss(4, seed=2)
    c_skip, c_out = sd**2 / (sig**2 + sd**2), sig * sd / torch.sqrt(sig**2 + sd**2)
    d, _ = target.to_x0_eps(f, x_t, p)
    torch.testing.assert_close(d, c_skip * x_t + c_out * f)
    # ||F - F*||^2 = lambda(sigma) ||D - x0||^2 with lambda = (sigma^2 + sd^2) / (sigma sd)^2
    lam = (sig**2 + sd**2) / (sig * sd) ** 2
    got = ((f - target.target(x0, eps, p)) ** 2).sum(1)
    torch.testing.assert_close(got, (lam * (d - x0) ** 2).sum(1))
    torch.testing.assert_close(target.x0_error_scale(1 / sig**2), lam)


def test_time_sampling_distributions_match_their_laws():
    """n = 20000 draws; means and stds of the transformed times within 5 standard errors."""
    n = 20000
    g = torch.Generator().manual_seed(0)
    rf = exact_model(**PROCESSES["rf"]).process
    t = time_sampling.sample_times("logit_normal", n, rf, {"m": 0.5, "s": 0.8}, generator=g)
    z = torch.logit(t / T)
    assert abs(z.mean().item() - 0.5) < 5 * 0.8 / math.sqrt(n)
    assert abs(z.std().item() - 0.8) < 5 * 0.8 / math.sqrt(2 * n)
    edm = exact_model(**PROCESSES["edm"]).process
    t = time_sampling.sample_times("log_normal", n, edm, {}, generator=g)
    log_sigma = torch.log(edm.sigma(t))
    # clamping to [sigma_min, sigma_max] only touches |z| > 3.2 (below 0.2% of the draws)
    assert abs(log_sigma.mean().item() + 1.2) < 5 * 1.2 / math.sqrt(n)
    assert abs(log_sigma.std().item() - 1.2) < 0.02
    u = time_sampling.sample_times("uniform", n, rf, {}, generator=g)
    assert 0 < u.min() and u.max() <= T
    assert abs(u.mean().item() / T - 0.5) < 5 * math.sqrt(1 / 12 / n)
    d = time_sampling.sample_times("uniform_discrete", n, rf, {}, generator=g)
    assert d.dtype == torch.int64 and d.min() >= 1 and d.max() <= T


def test_default_time_sampling_per_process():
    assert DiffusionModelConfig().training_times() == ("uniform_discrete", {})
    assert DiffusionModelConfig(**PROCESSES["rf"]).training_times()[0] == "logit_normal"
    assert DiffusionModelConfig(**PROCESSES["edm"]).training_times()[0] == "log_normal"


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"noise_schedule_type": "rectified_flow", "target_type": "pred_eps"}, "alpha\\(T\\) = 0"),
        ({"noise_schedule_type": "rectified_flow", "target_type": "edm"}, "alpha\\(T\\) = 0"),
        (
            {**PROCESSES["edm"], "variance_type": "learned_range"},
            "integer training times",
        ),
        ({**PROCESSES["rf"], "min_snr_gamma": 5.0}, "x0_error_scale"),
        ({**PROCESSES["rf"], "schedule_kwargs": {"shift": -1.0}}, "shift"),
        (
            {**PROCESSES["edm"], "schedule_kwargs": {"sigma_min": 5.0, "sigma_max": 1.0}},
            "sigma_min",
        ),
        ({**PROCESSES["rf"], "time_sampling_kwargs": {"mean": 0.0}}, "Accepted options"),
    ],
)
def test_impossible_combinations_are_refused_in_the_config(cfg, match):
    with pytest.raises(ValueError, match=match):
        DiffusionModelConfig(input_shape=(2,), **cfg)


def test_vlb_is_refused_on_edm_with_a_reason_and_ode_is_the_default():
    model = exact_model(**PROCESSES["edm"])
    with pytest.raises(ValueError, match="method='ode'"):
        model.nll(MIX.sample(4).double(), method="vlb")


# -- convergence to the exact flow on every process ----------------------------------------

# (kwargs, lower bound, upper bound); as in tests/test_samplers.py
ORDERS: dict[str, tuple[dict[str, Any], float, float | None]] = {
    "ddim": ({"eta": 0.0}, 0.8, 1.3),
    "euler": ({}, 0.8, 1.3),
    "heun": ({}, 1.8, None),
    "dpmpp_2m": ({}, 1.8, None),
    "dpmpp_2m_sde": ({"eta": 0.0}, 1.8, None),
    "dpmpp_3m": ({}, 2.5, None),
    "unipc": ({}, 1.8, None),
    "unipc_3": ({"order": 3, "variant": "bh1"}, 2.5, None),
    # deis's eps-in-lambda polynomial settles later (tests/test_samplers.py: 1.76 over 20-40
    # steps on VP, 1.87 over 40-80); measured 1.75 here on EDM
    "deis": ({}, 1.6, None),
}


def _lam_times(model: DiffusionModel, steps: int, t_start: float, t_end: float) -> Tensor:
    """Times uniform in lambda from t_start to t_end, then 0 (t_end = 0: no extra step)."""
    lam = model.process.lam(torch.tensor([t_start, t_end], dtype=torch.float64))
    levels = torch.linspace(float(lam[0]), float(lam[1]), steps, dtype=torch.float64)
    t = model.process.time_at_lam(levels)
    t[0], t[-1] = t_start, t_end
    return t if t_end == 0 else torch.cat([t, t.new_zeros(1)])


@pytest.fixture(scope="module", params=list(PROCESSES))
def flow_reference(request):
    """The exact flow from t = 0.98 T (finite noise) to the last nonzero time, with the x0
    estimate there where sigma(0) = 0 (rectified flow: every sampler's last step to t = 0
    returns D, see tests/test_samplers.py), or to t = 0 itself where sigma(0) > 0 (EDM:
    the last step is an ordinary one)."""
    model = exact_model(**PROCESSES[request.param])
    t_start = 0.98 * T
    to_zero = request.param != "edm"
    t_end = 1.0 if to_zero else 0.0
    a, s = (float(v) for v in model.process.alpha_sigma(torch.tensor(t_start, dtype=torch.float64)))
    a1, s1 = (float(v) for v in model.process.alpha_sigma(torch.tensor(t_end, dtype=torch.float64)))
    x_start = a * MIX.sample(64, generator=torch.Generator().manual_seed(3)) + s * gauss(64)
    ref = probability_flow_reference(
        MIX, x_start, start=(a, s), end=(a1, s1), num_steps=300, denoise_end=to_zero
    )
    return request.param, model, x_start, ref, (t_start, t_end)


@pytest.mark.parametrize("name", list(ORDERS))
def test_every_sampler_converges_at_its_order_on_flow_and_edm(name, flow_reference):
    process, model, x_start, ref, (t_start, t_end) = flow_reference
    kwargs, low, high = ORDERS[name]
    sampler = name.removesuffix("_3")
    if sampler == "deis" and t_end != 0:
        pytest.skip("deis keeps its order on the last step to sigma = 0 (tests/test_samplers.py)")
    errs = []
    for steps in (20, 40):
        times = _lam_times(model, steps, t_start, t_end)
        out = model.sample(
            64, sampler=sampler, sampler_kwargs=kwargs, init_noise=x_start, timestep_spacing=times
        )
        errs.append(((out - ref) ** 2).mean().sqrt().item())
    order = math.log2(errs[0] / errs[1])
    print(f"{process} {name}: errors {errs}, order {order:.2f}")
    assert errs[1] < 0.1, errs
    assert order >= low, (errs, order)
    if high is not None:
        assert order <= high, (errs, order)


# -- stochastic samplers: the mixture's moments --------------------------------------------

WEIGHTED = GaussianMixture(
    [[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0], [0.0, -2.0]], 0.3, weights=[0.4, 0.3, 0.2, 0.1]
)
STOCHASTIC = [
    ("ddpm", {}, "lower_bound"),
    ("ddpm", {}, "upper_bound"),
    ("dpmpp_2m_sde", {}, "upper_bound"),
    ("ddim", {"eta": 1.0}, "upper_bound"),
    ("heun", {"s_churn": 20.0}, "upper_bound"),
]


@pytest.mark.parametrize("process", ["rf", "edm"])
@pytest.mark.parametrize(("name", "kwargs", "variance"), STOCHASTIC)
def test_stochastic_samplers_reproduce_the_mixture_moments(process, name, kwargs, variance):
    """n = 3000 samples, 100 ``trailing`` steps (50 for heun); mean, covariance and mode
    weights within 5 standard errors estimated from the samples (as tests/test_samplers.py).
    (``karras`` spacing over the rectified flow's noise range, sigma/alpha from 1e3 to 1e-3,
    needs ~240 steps before the first-order bias of the variance drops below 5 SE.) On EDM the
    samples keep noise of std sigma_min = 0.002 (sigma(0) > 0), whose effect on the
    covariance (4e-6) is far below its standard error (~0.02)."""
    model = exact_model(WEIGHTED, **PROCESSES[process], variance_type=variance)
    n, k = 3000, 5.0
    steps = 50 if name == "heun" else 100
    g = torch.Generator().manual_seed(1234)
    x = model.sample(
        n, steps, sampler=name, sampler_kwargs=kwargs, generator=g, timestep_spacing="trailing"
    )
    assert torch.isfinite(x).all()
    mean = x.mean(0)
    assert ((mean - WEIGHTED.mean()).abs() <= k * x.std(0) / math.sqrt(n)).all(), mean
    xc = x - WEIGHTED.mean()
    prods = xc[:, :, None] * xc[:, None, :]
    cov, se_cov = prods.mean(0), prods.std(0) / math.sqrt(n)
    assert ((cov - WEIGHTED.covariance()).abs() <= k * se_cov).all(), (cov, WEIGHTED.covariance())
    freq = torch.bincount(WEIGHTED.responsibilities(x).argmax(1), minlength=4).double() / n
    w = WEIGHTED.weights
    assert ((freq - w).abs() <= k * (w * (1 - w) / n).sqrt()).all(), (freq, w)


@pytest.mark.parametrize("process", list(PROCESSES))
@pytest.mark.parametrize(
    "spacing",
    ["trailing", "leading", "linspace", "quadratic", "karras", "logsnr", "logsnr_trailing"],
)
def test_every_sampler_and_spacing_is_finite_on_flow_and_edm(process, spacing):
    model = exact_model(**PROCESSES[process])
    g = torch.Generator().manual_seed(0)
    for name in samplers.names():
        for steps in (1, 2, 7):
            x = model.sample(4, steps, sampler=name, timestep_spacing=spacing, generator=g)
            assert torch.isfinite(x).all(), (name, steps)


# -- diffusers 0.42.1, driven by the same exact denoiser -----------------------------------


def _mixture_d(x: Tensor, alpha: float, sigma: float) -> Tensor:
    return MIX.denoise(x.double(), alpha, sigma)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_diffusers_flow_match_euler_agrees_with_euler(shift):
    diffusers = pytest.importorskip("diffusers")
    steps = 12
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
    sched.set_timesteps(steps)
    sig = sched.sigmas.double()
    z = gauss(32)
    x = z.float()
    traj = [x.double()]
    for i, ts in enumerate(sched.timesteps):
        s = float(sig[i])
        v = (x.double() - _mixture_d(x, 1 - s, s)) / s  # eps - x0 = dx/dsigma
        x = sched.step(v.float(), ts, x).prev_sample
        traj.append(x.double())
    model = exact_model(**PROCESSES["rf"], schedule_kwargs={"shift": shift})
    # the same times: invert the shift, t = T s with sigma = shift s / (1 + (shift - 1) s)
    times = T * sig / (shift - (shift - 1) * sig)
    ours = model.sample(
        32, sampler="euler", init_noise=z, timestep_spacing=times, return_trajectory=True
    )
    torch.testing.assert_close(ours, torch.stack(traj), rtol=0, atol=1e-5)


def _diffusers_unipc_flow(
    diffusers: Any, variant: str, shift: float, steps: int, z: Tensor
) -> tuple[Tensor, Tensor]:
    """diffusers' UniPCMultistepScheduler on its own flow grid (shifted, first sigma nudged to
    1 - 1e-6, final sigma 0) with the exact velocity, in float64 (its float32 sigmas are
    widened after ``set_timesteps``, so that every coefficient is computed in float64).
    Returns (sigmas, trajectory (steps + 1, n, 2))."""
    sched = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=T,
        use_flow_sigmas=True,
        flow_shift=shift,
        prediction_type="flow_prediction",
        solver_type=variant,
    )
    sched.set_timesteps(steps)
    sched.sigmas = sched.sigmas.double()
    sig = sched.sigmas
    x, traj = z.clone(), [z]
    for i, ts in enumerate(sched.timesteps):
        s = float(sig[i])
        v = (x - _mixture_d(x, 1 - s, s)) / s
        x = sched.step(v, ts, x).prev_sample
        traj.append(x)
    return sig, torch.stack(traj)


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_unipc_is_diffusers_unipc_on_its_flow_grid(variant, shift):
    """UniPC-bh1/bh2 (Zhao et al. 2023) on the same times from the same x_T with the same
    exact denoiser: every iterate equals diffusers' to 1e-6 of the largest |x| (measured
    2e-8 .. 8e-8: the process recomputes alpha = 1 - sigma from the unshifted time, and
    alpha(t_0) = 1e-6 loses digits to cancellation, which bh1's large B(h) on the first,
    long step amplifies). diffusers' bh1 ends in NaN: its
    last step to sigma = 0 multiplies B(h) = h = inf by a zero history term; ours takes the
    exact first-order step there, x_S = D(x_{S-1}) (the samplers' rule for h = inf)."""
    diffusers = pytest.importorskip("diffusers")
    steps, z = 10, gauss(32)
    sig, theirs = _diffusers_unipc_flow(diffusers, variant, shift, steps, z)
    model = exact_model(**PROCESSES["rf"], schedule_kwargs={"shift": shift})
    times = T * sig / (shift - (shift - 1) * sig)  # invert the shift: t = T s
    ours = model.sample(
        32,
        sampler="unipc",
        sampler_kwargs={"variant": variant},
        init_noise=z,
        timestep_spacing=times,
        return_trajectory=True,
    )
    last = steps if variant == "bh2" else steps - 1
    scale = theirs[1 : last + 1].abs().amax()
    torch.testing.assert_close(ours[: last + 1], theirs[: last + 1], rtol=0, atol=1e-6 * scale)
    if variant == "bh1":
        assert torch.isnan(theirs[-1]).all()
        a, s = (float(v) for v in model.process.alpha_sigma(times[-2]))
        torch.testing.assert_close(ours[-1], MIX.denoise(ours[-2], a, s), rtol=0, atol=1e-12)


def test_unipc_converges_at_order_three_from_pure_noise_on_rectified_flow():
    """From x_T itself (alpha(T) = 0, lambda = -inf: the first step and its correction have
    h = inf; bh1 was NaN there) to the exact flow: the corrected UniPC-2 is third order on
    ``quadratic`` times, whose last nonzero level sigma ~ S^-2 makes the error of the
    first-order last step to sigma = 0 (~ sigma^2) negligible. Measured over 20 -> 80 steps:
    bh2 3.05 and 3.08 (shift 1, 3), bh1 2.46 (shift 1, still settling) and 3.29. On
    uniform-in-sigma times (``trailing``, diffusers' flow grid) that last step's error ~ S^-2
    dominates from about 10 steps on (benchmarks/results/flow_quality.md)."""
    z = gauss(64)
    k = 1e6  # x_T = z stands for the state at sigma / alpha = 1e6 (an error ~1e-6 |x0|)
    # the flow's end from x_T does not depend on the shift (a change of time variable)
    ref = probability_flow_reference(
        MIX, z, start=(1 / (1 + k), k / (1 + k)), end=(1 - 1e-5, 1e-5), num_steps=200
    )
    cases = [(shift, "bh1", 2.3) for shift in (1.0, 3.0)] + [(1.0, "bh2", 2.8), (3.0, "bh2", 2.8)]
    for shift, variant, low in cases:
        model = exact_model(**PROCESSES["rf"], schedule_kwargs={"shift": shift})
        errs = []
        for steps in (20, 80):
            out = model.sample(
                64,
                steps,
                sampler="unipc",
                sampler_kwargs={"variant": variant},
                init_noise=z,
                timestep_spacing="quadratic",
            )
            errs.append(float(((out - ref) ** 2).mean().sqrt()))
        order = math.log2(errs[0] / errs[1]) / 2
        print(f"unipc {variant} shift {shift:g}: errors {errs}, order {order:.2f}")
        assert math.isfinite(errs[0]) and order >= low, (variant, errs, order)


def test_unipc_last_step_blend_is_fourth_order_on_a_gaussian():
    """The last step to sigma = 0 from a point on the exact flow of N(mu, s^2 I), where
    y = x / alpha = mu + (e - mu) sqrt(s^2 + sigma_hat^2) / s ends at e: the first-order
    step (c = 0, x = D) errs by (y - mu)(1 - s / sqrt(s^2 + sigma_hat^2))... ~ sigma_hat^2,
    the blend c = 1/2 ((y + D) / 2) by ~ sigma_hat^4 (closed forms; measured 1.9-2.0 and
    3.8-4.0 over sigma_hat = 0.2 -> 0.05)."""
    mu, s = torch.tensor([1.0, -0.5], dtype=torch.float64), 0.5
    gauss1 = GaussianMixture(mu[None], [s])
    model = exact_model(gauss1, **PROCESSES["rf"])
    e = mu + s * gauss(64)
    for c, order in ((0.0, 2), (0.5, 4)):
        errs = []
        for sigma_hat in (0.2, 0.1, 0.05):
            sig = sigma_hat / (1 + sigma_hat)  # rectified flow: sigma_hat = s / (1 - s)
            x = (1 - sig) * (mu + (e - mu) * math.sqrt(s**2 + sigma_hat**2) / s)
            out = model.sample(
                64,
                sampler="unipc",
                sampler_kwargs={"last_step_blend": c},
                init_noise=x,
                timestep_spacing=[T * sig, 0.0],
            )
            errs.append(float((out - e).abs().max()))
        slopes = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
        assert min(slopes) > order - 0.25, (c, errs, slopes)


def test_diffusers_edm_euler_agrees_with_euler():
    diffusers = pytest.importorskip("diffusers")
    steps = 12
    sched = diffusers.EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0)
    sched.set_timesteps(steps)
    sig = sched.sigmas.double()  # (steps + 1,): the Karras levels, then 0
    z = gauss(32) * sched.init_noise_sigma
    x = z.float()
    traj = [x.double()]
    sd = 0.5
    for i, ts in enumerate(sched.timesteps):
        s = float(sig[i])
        d = _mixture_d(x, 1.0, s)
        c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / math.sqrt(s**2 + sd**2)
        f = (d - c_skip * x.double()) / c_out  # the network output whose D is exact
        sched.scale_model_input(x, ts)  # the network input (unused by the exact D)
        x = sched.step(f.float(), ts, x).prev_sample
        traj.append(x.double())
    model = exact_model(**PROCESSES["edm"])
    assert model.process.prior_std() == pytest.approx(float(sched.init_noise_sigma), rel=1e-6)
    # our path ends at sigma_min (t = 0): compare every iterate down to it
    times = model.process.time_at_lam(-torch.log(sig[:-1]))
    times[-1] = 0.0
    ours = model.sample(
        32, sampler="euler", init_noise=z, timestep_spacing=times, return_trajectory=True
    )
    torch.testing.assert_close(ours, torch.stack(traj[:-1]), rtol=0, atol=1e-5)


# -- likelihood ----------------------------------------------------------------------------

MIX8 = GaussianMixture(
    torch.randn(3, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64),
    [0.4, 0.6, 0.5],
)


@pytest.mark.parametrize("process", [*PROCESSES, "vp"])
@pytest.mark.parametrize("mixture", [MIX, MIX8], ids=["2d", "8d"])
def test_ode_nll_of_the_exact_denoiser_is_the_true_log_density(process, mixture):
    """Per sample, within 0.05 bits/dim of -log p(x) / (D ln 2) (measured with 32 RK4 steps:
    max errors 0.001-0.008 bits/dim)."""
    cfg = PROCESSES.get(process, {"noise_schedule_type": "linear", "target_type": "pred_eps"})
    model = exact_model(mixture, **cfg)
    x = mixture.sample(8, generator=torch.Generator().manual_seed(0))
    true = -mixture.log_prob(x) / (mixture.dim * math.log(2))
    got = model.nll(x, method="ode", num_steps=32)
    assert (got - true).abs().max() < 0.05, got - true


def test_hutchinson_ode_nll_is_unbiased():
    """64 probes per point on the 8-d mixture: the average is within 5 SE of the truth."""
    model = exact_model(MIX8, **PROCESSES["rf"])
    x = MIX8.sample(4, generator=torch.Generator().manual_seed(0)).repeat_interleave(64, 0)
    true = -MIX8.log_prob(x) / (8 * math.log(2))
    got = model.nll(
        x,
        method="ode",
        num_steps=24,
        divergence="hutchinson",
        generator=torch.Generator().manual_seed(1),
    )
    err = (got - true).reshape(4, 64)
    se = err.std(1) / 8
    assert (err.mean(1).abs() < 5 * se + 0.02).all(), (err.mean(1), se)


class _AsImages(torch.nn.Module):
    """The 8-d exact denoiser seen on (2, 2, 2) images."""

    def __init__(self, flat: torch.nn.Module) -> None:
        super().__init__()
        self.flat = flat

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.flat(x.reshape(x.shape[0], -1), t).reshape(x.shape)


@pytest.mark.parametrize("divergence", ["hutchinson", "exact"])
def test_ode_nll_on_image_shaped_data_equals_the_flat_model(divergence):
    """The likelihood does not depend on the sample's shape: Hutchinson's probe and the exact
    divergence on (2, 2, 2) data give the flat 8-d model's values (checked against the true
    density above). Hutchinson on non-flat data used to fail with a shape mismatch."""
    flat = exact_model(MIX8, **PROCESSES["rf"])
    config = flat.config.model_copy(update={"input_shape": (2, 2, 2)})
    images = DiffusionModel(_AsImages(flat.nn_module), config)
    x = MIX8.sample(6, generator=torch.Generator().manual_seed(0))
    kw = {"method": "ode", "num_steps": 8, "divergence": divergence}
    want = flat.nll(x, generator=torch.Generator().manual_seed(3), **kw)
    got = images.nll(x.reshape(6, 2, 2, 2), generator=torch.Generator().manual_seed(3), **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# -- training, saving -----------------------------------------------------------------------


def test_short_flow_matching_training_lowers_the_sliced_wasserstein_distance():
    from tinydiff.metrics import sliced_wasserstein
    from tinydiff.nn import MLP

    torch.manual_seed(0)
    data = MIX.sample(4096, generator=torch.Generator().manual_seed(0)).float()
    model = DiffusionModel(
        MLP(2, hidden_dim=64, num_layers=2), input_shape=(2,), num_timesteps=T, **PROCESSES["rf"]
    )
    g = torch.Generator().manual_seed(5)

    def swd() -> float:
        x = model.sample(1000, 10, sampler="heun", generator=torch.Generator().manual_seed(1))
        return sliced_wasserstein(x, data[:1000], generator=torch.Generator().manual_seed(2))

    before = swd()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        idx = torch.randint(0, data.shape[0], (256,), generator=g)
        loss = model.loss(data[idx], generator=g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = swd()
    print(f"sliced Wasserstein: untrained {before:.3f}, trained {after:.3f}")
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("process", list(PROCESSES))
def test_save_pretrained_round_trips_the_process_bitwise(process, tmp_path):
    from tinydiff.nn import MLP

    model = DiffusionModel(
        MLP(2, hidden_dim=16, num_layers=1, time_embed_dim=8),
        input_shape=(2,),
        num_timesteps=T,
        time_sampling_kwargs={},
        **PROCESSES[process],
    )
    model.save_pretrained(tmp_path)
    loaded = DiffusionModel.from_pretrained(tmp_path)
    assert loaded.config == model.config
    t = torch.linspace(0, T, 101, dtype=torch.float64)
    assert torch.equal(loaded.process.points(t), model.process.points(t))
    g1, g2 = (torch.Generator().manual_seed(0) for _ in range(2))
    assert torch.equal(loaded.sample(4, 5, generator=g1), model.sample(4, 5, generator=g2))


@pytest.mark.parametrize("schedule", ["rectified_flow", "edm"])
def test_demo_trains_and_writes_pictures_on_flow_and_edm(schedule, tmp_path):
    """A short smoke run of ``tinydiff demo --schedule ...`` (the 400-step run of
    tests/test_demo.py halves the sliced Wasserstein distance on both: measured 0.16 vs
    0.35 untrained for rectified flow, 0.16 vs 0.58 for EDM)."""
    pytest.importorskip("matplotlib")
    from tinydiff.cli import run_demo

    result = run_demo(
        "eight_gaussians",
        steps=40,
        out=tmp_path,
        snapshots=2,
        num_samples=200,
        sampling_steps=5,
        schedule=schedule,
        progress=False,
    )
    assert math.isfinite(result["sw_trained"])
    assert result["paths"]["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["paths"]["gif"].stat().st_size > 0


def test_inference_mode_and_compiled_exact_denoisers_see_the_derivatives() -> None:
    """d alpha / ds and d sigma / ds come from forward-mode differentiation: under
    torch.inference_mode (where backward-mode autograd records nothing, and they used to be
    silently 0: NaN samples for velocity models) and inside the compiled step's opaque network
    operator (where the exact denoiser computes them) they are those of the closed form."""
    cfg = DiffusionModelConfig(
        input_shape=(2,), noise_schedule_type="rectified_flow", target_type="pred_velocity"
    )
    t = torch.tensor([250.0, 1000.0], dtype=torch.float64)
    with torch.inference_mode():
        d_alpha, d_sigma = cfg.process().derivatives(t)
    assert d_alpha.tolist() == [-1.0, -1.0] and d_sigma.tolist() == [1.0, 1.0]
    model = exact_model(MIX, noise_schedule_type="rectified_flow", target_type="pred_velocity")
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eager = model.sample(16, 8, sampler="ddim", init_noise=z)
    with torch.inference_mode():
        torch.testing.assert_close(model.sample(16, 8, sampler="ddim", init_noise=z), eager)
    model.compile_sampler(backend="eager")
    torch.testing.assert_close(
        model.sample(16, 8, sampler="ddim", init_noise=z, compile=True), eager
    )
