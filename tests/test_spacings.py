"""Timestep spacings and the log-SNR inversion, checked against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from tinydiff import schedules, spacings
from tinydiff.spacings import make_timesteps

T = 1000


def _table(schedule: str, zero_snr: bool = False) -> torch.Tensor:
    return schedules.build_alphas_cumprod(schedule, T, zero_terminal_snr=zero_snr)


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("steps", [1, 2, 7, 50, T])
@pytest.mark.parametrize("name", spacings.names())
def test_every_spacing_is_strictly_decreasing_from_at_most_T_to_zero(name, steps, zero_snr):
    ts = make_timesteps(name, T, steps, _table("cosine", zero_snr))
    assert ts.shape == (steps + 1,) and ts.dtype == torch.float64
    assert ts[-1] == 0 and ts[0] <= T
    assert (ts[1:] < ts[:-1]).all()


@pytest.mark.parametrize("schedule", ["linear", "cosine", "sigmoid"])
def test_time_at_log_snr_inverts_alpha_bar_at(schedule):
    for zero_snr in (False, True):
        table = _table(schedule, zero_snr)
        t = torch.cat([torch.rand(200, dtype=torch.float64) * T, torch.arange(0.0, T + 1, 50)])
        lam = schedules.log_snr(schedules.alpha_bar_at(table, t))
        back = schedules.time_at_log_snr(table, lam)
        torch.testing.assert_close(back, t, atol=1e-7, rtol=0)


def test_time_at_log_snr_rejects_out_of_range():
    table = _table("linear")
    with pytest.raises(ValueError, match="log-SNR"):
        schedules.time_at_log_snr(table, torch.tensor([-100.0]))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_karras_times_follow_the_rho_formula(schedule):
    table = _table(schedule)
    steps, rho = 12, 7.0
    ts = make_timesteps("karras", T, steps, table)
    ab = schedules.alpha_bar_at(table, ts[:-1])
    sigma = ((1 - ab) / ab).sqrt()
    smax = math.sqrt((1 - table[T]) / table[T])
    smin = math.sqrt((1 - table[1]) / table[1])
    i = torch.arange(steps, dtype=torch.float64)
    expected = (
        smax ** (1 / rho) + i / (steps - 1) * (smin ** (1 / rho) - smax ** (1 / rho))
    ) ** rho
    torch.testing.assert_close(sigma, expected, rtol=1e-9, atol=0)
    assert ts[0] == T and ts[-2] == 1 and ts[-1] == 0


@pytest.mark.parametrize("schedule", ["linear", "cosine", "scaled_linear"])
def test_logsnr_times_are_uniform_in_log_snr(schedule):
    table = _table(schedule)
    ts = make_timesteps("logsnr", T, 9, table)
    lam = schedules.log_snr(schedules.alpha_bar_at(table, ts[:-1]))
    diffs = lam[1:] - lam[:-1]
    torch.testing.assert_close(diffs, diffs.mean().expand_as(diffs), rtol=1e-9, atol=0)
    torch.testing.assert_close(lam[0], schedules.log_snr(table[T]))
    torch.testing.assert_close(lam[-1], schedules.log_snr(table[1]))


@pytest.mark.parametrize("name", ["karras", "logsnr"])
def test_zero_terminal_snr_starts_at_T_then_finite_levels(name):
    table = _table("linear", zero_snr=True)
    ts = make_timesteps(name, T, 6, table)
    ab = schedules.alpha_bar_at(table, ts)
    assert ts[0] == T and ab[0] == 0
    assert (ab[1:-1] > 0).all() and ts[1] < T - 1 + 1e-9


def test_quadratic_closed_form():
    ts = make_timesteps("quadratic", T, 10, _table("linear"))
    expected = T * (torch.arange(10, -1, -1, dtype=torch.float64) / 10) ** 2
    torch.testing.assert_close(ts, expected)


def test_explicit_lists():
    table = _table("linear")
    torch.testing.assert_close(
        make_timesteps([999, 500.5, 10], T, None, table),
        torch.tensor([999, 500.5, 10, 0], dtype=torch.float64),
    )
    torch.testing.assert_close(
        make_timesteps([5.0, 0.0], T, None, table), torch.tensor([5.0, 0.0], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="strictly decreasing"):
        make_timesteps([10, 20], T, None, table)
    with pytest.raises(ValueError, match="outside"):
        make_timesteps([T + 1], T, None, table)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [3, 5, 10, 20])
def test_logsnr_trailing_is_trailing_first_then_uniform_in_log_snr(schedule, steps):
    table = _table(schedule)
    ts = make_timesteps("logsnr_trailing", T, steps, table)
    assert ts[0] == T and ts[1] == pytest.approx(T * (steps - 1) / steps, abs=1e-9)
    assert ts[-2] == 1 and ts[-1] == 0
    lam = schedules.log_snr(schedules.alpha_bar_at(table, ts[1:-1]))
    gaps = lam[1:] - lam[:-1]
    torch.testing.assert_close(gaps, gaps.mean().expand_as(gaps), rtol=1e-6, atol=1e-9)


def test_logsnr_trailing_with_one_or_two_steps():
    table = _table("cosine")
    assert make_timesteps("logsnr_trailing", T, 1, table).tolist() == [T, 0.0]
    assert make_timesteps("logsnr_trailing", T, 2, table).tolist() == [T, 1.0, 0.0]
