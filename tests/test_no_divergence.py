"""No deterministic sampler diverges: at NFE >= 20 each one's error is compared with DDIM's
on the same spacing, over every registered sampler, spacing and schedule, on an exact
two-mode mixture (float64, a small batch), measured against the independent RK4
probability-flow solution.

Two bounds: every cell is within 5x of DDIM (Karras' trapezoid Heun was 100x to 5000x
worse on the cosine and sigmoid schedules); and every cell is at most DDIM's error except
the listed known misses (xfail, not strict): multistep solvers on ``leading`` / ``linspace``
spacings, whose last steps have a step-size ratio far above the rest, where the
extrapolation of the multistep methods loses to DDIM, and second-order samplers at 10
steps where DDIM gets 20 on spacings that waste steps at very high noise.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tinydiff import DiffusionModel, samplers, schedules, spacings
from tinydiff.testing import ExactDenoiser, GaussianMixture, probability_flow_reference

MIX = GaussianMixture(torch.tensor([[-1.5, 0.0], [1.5, 0.5]]), torch.tensor([0.5, 0.7]))
NFES = (20, 50)
DETERMINISTIC = [n for n in samplers.names() if not samplers.get(n)().is_stochastic]

#: (sampler, schedule, spacing, nfe) where the error exceeds DDIM's today (all < 5x)
KNOWN_MISSES: set[tuple[str, str, str, int]] = {
    ("dpmpp_2m", "linear", "leading", 20),
    ("dpmpp_2m", "linear", "linspace", 20),
    ("dpmpp_3m", "cosine", "karras", 20),
    ("dpmpp_3m", "cosine", "leading", 20),
    ("dpmpp_3m", "cosine", "linspace", 20),
    ("dpmpp_3m", "linear", "leading", 20),
    ("dpmpp_3m", "linear", "leading", 50),
    ("dpmpp_3m", "linear", "linspace", 20),
    ("dpmpp_3m", "linear", "linspace", 50),
    ("dpmpp_3m", "scaled_linear", "leading", 20),
    ("dpmpp_3m", "scaled_linear", "leading", 50),
    ("dpmpp_3m", "scaled_linear", "linspace", 20),
    ("dpmpp_3m", "scaled_linear", "linspace", 50),
    ("dpmpp_3m", "sigmoid", "leading", 20),
    ("dpmpp_3m", "sigmoid", "linspace", 20),
    ("heun", "cosine", "karras", 20),
    ("heun", "linear", "linspace", 20),
    ("heun", "linear", "trailing", 20),
    ("heun", "scaled_linear", "linspace", 20),
    ("heun", "scaled_linear", "trailing", 20),
    ("heun", "sigmoid", "karras", 20),
    ("unipc", "cosine", "karras", 20),
    ("unipc", "cosine", "leading", 20),
    ("unipc", "cosine", "linspace", 20),
    ("unipc", "linear", "leading", 20),
    ("unipc", "linear", "linspace", 20),
    ("unipc", "scaled_linear", "leading", 20),
    ("unipc", "scaled_linear", "linspace", 20),
}


@functools.cache
def errors(schedule: str, spacing: str) -> dict[tuple[str, int], float]:
    cfg = {"input_shape": (2,), "num_timesteps": 1000, "noise_schedule_type": schedule}
    model = DiffusionModel(ExactDenoiser(MIX, cfg), cfg).double()
    z = torch.randn(32, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out: dict[tuple[str, int], float] = {}
    refs: dict[float, torch.Tensor] = {}
    for nfe in NFES:
        for name in DETERMINISTIC:
            sampler = model.make_sampler(name)
            steps = max(k for k in range(1, nfe + 1) if sampler.nfe(k) <= nfe)
            times = model.sampling_timesteps(steps, spacing)
            start = float(times[0])
            if start not in refs:  # the flow from the spacing's own first time
                p = model.process
                # sigma(0) = 0: samplers return D at their last time t = 1; else x(0) itself
                end_t = 1.0 if float(p.sigma(0.0)) == 0 else 0.0
                refs[start] = probability_flow_reference(
                    MIX,
                    z * p.prior_std(),
                    start=(float(p.alpha(start)), float(p.sigma(start))),
                    end=(float(p.alpha(end_t)), float(p.sigma(end_t))),
                    num_steps=300,
                    denoise_end=end_t == 1.0,
                )
            x = model.sample(
                32, steps, sampler=name, timestep_spacing=times, init_noise=z * p.prior_std()
            )
            out[name, nfe] = float(((x - refs[start]) ** 2).sum(1).mean().sqrt())
    return out


@pytest.mark.parametrize("nfe", NFES)
@pytest.mark.parametrize("spacing", spacings.names())
@pytest.mark.parametrize("schedule", schedules.names())
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_no_worse_than_ddim(name: str, schedule: str, spacing: str, nfe: int) -> None:
    process = schedules.build_process(schedule, 1000)
    if process.lam(1000.0) == float("-inf"):
        pytest.skip(
            f"{schedule} starts from infinite noise (alpha(T) = 0): the reference flow needs a "
            "finite start; its samplers are checked against the flow in tests/test_flow_edm.py"
        )
    err = errors(schedule, spacing)
    ours, ddim = err[name, nfe], err["ddim", nfe]
    assert ours <= 5 * ddim, f"{name} diverges: {ours:.3g} vs DDIM {ddim:.3g}"
    # the explicit-betas schedule's default is DDPM's linear table: the same misses
    known = {"betas": "linear"}.get(schedule, schedule)
    if (name, known, spacing, nfe) in KNOWN_MISSES and ours > ddim:
        pytest.xfail(f"known miss: {ours:.3g} vs DDIM {ddim:.3g} ({ours / ddim:.2f}x)")
    assert ours <= ddim * (1 + 1e-9), f"{name}: {ours:.3g} vs DDIM {ddim:.3g}"
