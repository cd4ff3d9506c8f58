"""No deterministic sampler diverges: at NFE >= 20 each one's error is compared with DDIM's
on the same spacing, over every registered sampler, spacing and schedule, on an exact
two-mode mixture (float64, a small batch), measured against the independent RK4
probability-flow solution.

Every cell is at most DDIM's error. Before 0.2 Karras' trapezoid Heun was 100x to 5000x
worse on the cosine and sigmoid schedules (fixed by the exponential trapezoid), and the
multistep solvers were up to 4.7x worse on ``leading`` / ``linspace`` (a last step 4.3x
longer in log-SNR than the one before) and on ``karras`` over the cosine schedule (steps of
h ~ 2.3), and Heun up to 1.2x worse (10 steps against DDIM's 20) on spacings with long
steps near the data: fixed by first-order multistep steps where extrapolation over a long
step hurts (:func:`tinydiff.samplers._exp.step_orders`) and by Heun's Gauss node on long
steps and on the last step (:class:`tinydiff.samplers.heun.Heun`).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from _models import exact_model

from tinydiff import samplers, schedules, spacings
from tinydiff.process import PathValues
from tinydiff.samplers._exp import step_orders
from tinydiff.testing import GaussianMixture, probability_flow_reference

MIX = GaussianMixture(torch.tensor([[-1.5, 0.0], [1.5, 0.5]]), torch.tensor([0.5, 0.7]))
NFES = (20, 50)
DETERMINISTIC = [n for n in samplers.names() if not samplers.get(n)().is_stochastic]


@functools.cache
def errors(schedule: str, spacing: str) -> dict[tuple[str, int], float]:
    model = exact_model(MIX, noise_schedule_type=schedule)
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
    assert ours <= ddim * (1 + 1e-9), f"{name}: {ours:.3g} vs DDIM {ddim:.3g} ({ours / ddim:.2f}x)"


def _path(lam: list[float]) -> PathValues:
    """Path values of a VP path at the given half log-SNRs (the times are placeholders)."""
    lam_t = torch.tensor(lam, dtype=torch.float64)
    alpha = torch.sigmoid(2 * lam_t).sqrt()
    sigma = torch.sigmoid(-2 * lam_t).sqrt()
    t = torch.arange(len(lam), 0, -1, dtype=torch.float64) - 1
    return PathValues(t=t, alpha=alpha, sigma=sigma, lam=lam_t, process=None)


def test_multistep_steps_are_first_order_only_where_extrapolation_is_long() -> None:
    # even steps of 0.5 keep the full order; a step 4x the one before, or one of h = 2 in
    # log-SNR, is first order, and the ramp resumes after it; the last step to sigma = 0 is
    # first order (h = inf)
    even = [-4.0 + 0.5 * k for k in range(9)]
    assert step_orders(_path([*even, math.inf]), 3) == [1, 2, 3, 3, 3, 3, 3, 3, 1]
    ratio = [-2.0, -1.5, -1.0, -0.5, 1.5, 2.0, math.inf]  # h: 0.5 0.5 0.5 2.0 0.5
    assert step_orders(_path(ratio), 3) == [1, 2, 3, 1, 3, 1]
    long = [-2.0, -0.4, 1.2, 2.8, math.inf]  # h = 1.6 every step: no growth, but long
    assert step_orders(_path(long), 2) == [1, 1, 1, 1]
    assert step_orders(_path(long), 2, long_steps_first_order=False) == [1, 2, 2, 1]
