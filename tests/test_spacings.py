"""Timestep spacings, their one validator (resolve) and the lambda inversion, checked against
closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from tinydiff import schedules, spacings
from tinydiff.process import DiscreteVP
from tinydiff.spacings import make_timesteps

T = 1000


def _table(schedule: str, zero_snr: bool = False) -> torch.Tensor:
    return schedules.build_alphas_cumprod(schedule, T, zero_terminal_snr=zero_snr)


def _half_log_snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha / sigma) = log(alpha_bar / (1 - alpha_bar)) / 2 on a VP table."""
    return 0.5 * (torch.log(alpha_bar) - torch.log1p(-alpha_bar))


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("steps", [1, 2, 7, 50, T])
@pytest.mark.parametrize("name", spacings.names())
def test_every_spacing_is_strictly_decreasing_from_at_most_T_to_zero(name, steps, zero_snr):
    ts = make_timesteps(name, T, steps, _table("cosine", zero_snr))
    assert ts.shape == (steps + 1,) and ts.dtype == torch.float64
    assert ts[-1] == 0 and ts[0] <= T
    assert (ts[1:] < ts[:-1]).all()


@pytest.mark.parametrize("schedule", ["linear", "cosine", "sigmoid"])
def test_time_at_lam_inverts_the_interpolated_table(schedule):
    for zero_snr in (False, True):
        process = DiscreteVP(_table(schedule, zero_snr))
        t = torch.cat([torch.rand(200, dtype=torch.float64) * T, torch.arange(0.0, T + 1, 50)])
        lam = _half_log_snr(process.alpha_bar(t))
        back = process.time_at_lam(lam)
        torch.testing.assert_close(back, t, atol=1e-7, rtol=0)


def test_time_at_lam_rejects_out_of_range():
    process = DiscreteVP(_table("linear"))
    with pytest.raises(ValueError, match="log-SNR"):
        process.time_at_lam(torch.tensor([-50.0]))
    with pytest.raises(ValueError, match="log-SNR"):
        process.time_at_lam(torch.tensor([math.nan]))


def test_the_deprecated_full_log_snr_helpers_warn_and_keep_their_meaning():
    """schedules.log_snr / alpha_bar_at / time_at_log_snr speak FULL log-SNR (2 lambda)."""
    table = _table("cosine", True)
    process = DiscreteVP(table)
    t = torch.tensor([0.0, 0.5, 17.25, 500.0, 999.5, T], dtype=torch.float64)
    with pytest.deprecated_call(match="process.lam"):
        full = schedules.log_snr(table[[0, 17, 500]])
    torch.testing.assert_close(full, 2 * process.lam(torch.tensor([0.0, 17.0, 500.0])))
    with pytest.deprecated_call(match="alpha_bar"):
        ab = schedules.alpha_bar_at(table, t)
    assert torch.equal(ab, process.alpha_bar(t))
    with pytest.deprecated_call(match="time_at_lam"):
        back = schedules.time_at_log_snr(table, 2 * _half_log_snr(ab))
    torch.testing.assert_close(back, t, atol=1e-7, rtol=0)
    with pytest.deprecated_call(), pytest.raises(ValueError, match="log-SNR"):
        schedules.time_at_log_snr(_table("linear"), torch.tensor([-100.0]))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_karras_times_follow_the_rho_formula(schedule):
    table = _table(schedule)
    steps, rho = 12, 7.0
    ts = make_timesteps("karras", T, steps, table)
    ab = DiscreteVP(table).alpha_bar(ts[:-1])
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
    lam = _half_log_snr(DiscreteVP(table).alpha_bar(ts[:-1]))
    diffs = lam[1:] - lam[:-1]
    torch.testing.assert_close(diffs, diffs.mean().expand_as(diffs), rtol=1e-9, atol=0)
    torch.testing.assert_close(lam[0], _half_log_snr(table[T]))
    torch.testing.assert_close(lam[-1], _half_log_snr(table[1]))


@pytest.mark.parametrize("name", ["karras", "logsnr"])
def test_zero_terminal_snr_starts_at_T_then_finite_levels(name):
    table = _table("linear", zero_snr=True)
    ts = make_timesteps(name, T, 6, table)
    ab = DiscreteVP(table).alpha_bar(ts)
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
    lam = _half_log_snr(DiscreteVP(table).alpha_bar(ts[1:-1]))
    gaps = lam[1:] - lam[:-1]
    torch.testing.assert_close(gaps, gaps.mean().expand_as(gaps), rtol=1e-6, atol=1e-9)


def test_logsnr_trailing_with_one_or_two_steps():
    table = _table("cosine")
    assert make_timesteps("logsnr_trailing", T, 1, table).tolist() == [T, 0.0]
    assert make_timesteps("logsnr_trailing", T, 2, table).tolist() == [T, 1.0, 0.0]


# -- resolve: the one validator of spacings -------------------------------------------------------
PROCESS = DiscreteVP(_table("cosine"))


def test_resolve_names_defaults_and_counts():
    assert torch.equal(
        spacings.resolve("karras", PROCESS, 7), make_timesteps("karras", T, 7, PROCESS)
    )
    # None: the given default (a sampler's default_spacing), S = T when num_steps is None
    assert torch.equal(
        spacings.resolve(None, PROCESS, 5, "quadratic"), make_timesteps("quadratic", T, 5, PROCESS)
    )
    assert spacings.resolve(None, PROCESS).tolist() == list(range(T, -1, -1))
    assert spacings.resolve("log_snr", PROCESS, 3).numel() == 4  # aliases are resolved
    with pytest.raises(ValueError, match="unknown timestep spacing 'karas'.*karras"):
        spacings.resolve("karas", PROCESS, 5)
    with pytest.raises(ValueError, match=r"sampling_timesteps must be an int in 1..1000"):
        spacings.resolve("karras", PROCESS, 0)
    for bad in (5.0, True, "5"):
        with pytest.raises(TypeError, match="sampling_timesteps must be an int"):
            spacings.resolve("karras", PROCESS, bad)


def test_resolve_explicit_times():
    want = torch.tensor([999.0, 500.5, 10.0, 0.0], dtype=torch.float64)
    for spec in ([999, 500.5, 10], (999, 500.5, 10, 0), torch.tensor([999, 500.5, 10]), want):
        assert torch.equal(spacings.resolve(spec, PROCESS), want)
        assert torch.equal(spacings.resolve(spec, PROCESS, 3), want)
    assert torch.equal(
        spacings.resolve(torch.tensor([9, 3]), PROCESS), torch.tensor([9.0, 3, 0]).double()
    )
    with pytest.raises(ValueError, match="has 3 steps but sampling_timesteps=4"):
        spacings.resolve([999, 500.5, 10], PROCESS, 4)


@pytest.mark.parametrize(
    "spec, error, match",
    [
        (torch.tensor([True, False]), TypeError, "real numbers.*torch.bool"),
        (torch.tensor([3.0 + 0j, 0j]), TypeError, "real numbers.*complex"),
        (torch.tensor([[500.0, 0.0]]), ValueError, r"1-d tensor.*\(1, 2\)"),
        (torch.tensor(5.0), ValueError, "1-d tensor"),
        ([500, "0"], TypeError, "must hold numbers"),
        ([500, True], TypeError, "must hold numbers"),
        (5, TypeError, "a spacing name, a sequence of times or a tensor"),
        ([], ValueError, "must not be empty"),
        ([10, 20], ValueError, "strictly decreasing"),
        ([10, 10, 0], ValueError, "strictly decreasing"),
        ([T + 1, 0], ValueError, "outside"),
        ([500, -1], ValueError, "outside"),
        ([math.nan, 0], ValueError, "outside"),
        ([math.inf, 0], ValueError, "outside"),
    ],
)
def test_resolve_refuses_explicit_times_that_cannot_work(spec, error, match):
    with pytest.raises(error, match=match):
        spacings.resolve(spec, PROCESS)
    with pytest.raises(error, match=match):  # the process-free check gives the same answer
        spacings.explicit_times(spec, T)


def test_ramps_end_at_the_smallest_trained_time_and_at_least_one():
    from tinydiff.schedules import build_process

    assert spacings.ramp_end(PROCESS) == 1.0 == PROCESS.t_min
    flow = build_process("rectified_flow", T)
    assert flow.t_min == 0.0 and spacings.ramp_end(flow) == 1.0
    for name in ("karras", "logsnr", "logsnr_trailing"):
        assert spacings.resolve(name, flow, 6)[-2] == 1.0
