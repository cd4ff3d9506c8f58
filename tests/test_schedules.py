"""Noise schedules and alpha_bar interpolation against their closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from tinydiff import schedules
from tinydiff.process import DiscreteVP
from tinydiff.schedules import build_alphas_cumprod


@pytest.mark.parametrize("name", [n for n in schedules.names() if not schedules.is_path(n)])
@pytest.mark.parametrize("num_timesteps", [1, 10, 1000])
@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_every_schedule_is_a_valid_table(
    name: str, num_timesteps: int, zero_terminal_snr: bool
) -> None:
    if zero_terminal_snr and num_timesteps == 1:
        with pytest.raises(ValueError, match="at least 2"):
            build_alphas_cumprod(name, num_timesteps, zero_terminal_snr=True)
        return
    ab = build_alphas_cumprod(name, num_timesteps, zero_terminal_snr=zero_terminal_snr)
    assert ab.dtype == torch.float64 and ab.shape == (num_timesteps + 1,)
    assert ab[0] == 1.0
    assert (ab[1:] < ab[:-1]).all()
    assert ((ab >= 0) & (ab <= 1)).all()
    if zero_terminal_snr:
        assert ab[-1] == 0.0
    else:
        assert ab[-1] > 0


def test_linear_matches_ddpm_betas() -> None:
    ab = build_alphas_cumprod("linear", 1000)
    betas = 1 - ab[1:] / ab[:-1]
    expected = 1e-4 + torch.arange(1000, dtype=torch.float64) * (0.02 - 1e-4) / 999
    torch.testing.assert_close(betas, expected, rtol=1e-10, atol=1e-12)
    # scaled to T: T = 250 uses 4x larger betas, 4e-4 .. 0.08
    betas_250 = 1 - (lambda a: a[1:] / a[:-1])(build_alphas_cumprod("linear", 250))
    torch.testing.assert_close(betas_250[[0, -1]], torch.tensor([4e-4, 0.08], dtype=torch.float64))


def test_cosine_matches_closed_form() -> None:
    T, s = 1000, 0.008
    ab = build_alphas_cumprod("cosine", T)
    t = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    closed = f / f[0]
    # identical wherever the 0.999 beta clip is inactive (all but the last step)
    torch.testing.assert_close(ab[:-1], closed[:-1], rtol=1e-12, atol=0)
    assert 1 - ab[-1] / ab[-2] == pytest.approx(0.999)


def test_scaled_linear_is_linear_in_sqrt_beta() -> None:
    ab = build_alphas_cumprod("scaled_linear", 1000)
    sqrt_betas = (1 - ab[1:] / ab[:-1]).sqrt()
    diffs = sqrt_betas[1:] - sqrt_betas[:-1]
    torch.testing.assert_close(diffs, diffs.mean().expand_as(diffs), rtol=1e-6, atol=1e-12)
    assert sqrt_betas[0] ** 2 == pytest.approx(0.00085) and sqrt_betas[-1] ** 2 == pytest.approx(
        0.012
    )


def test_sigmoid_matches_closed_form() -> None:
    T = 100
    ab = build_alphas_cumprod("sigmoid", T, {"start": -3.0, "end": 3.0, "tau": 1.0})
    t = torch.arange(T + 1, dtype=torch.float64) / T
    sig = torch.sigmoid
    v0, v1 = (
        sig(torch.tensor(-3.0, dtype=torch.float64)),
        sig(torch.tensor(3.0, dtype=torch.float64)),
    )
    closed = (v1 - sig(t * 6 - 3)) / (v1 - v0)
    torch.testing.assert_close(ab[:-1], closed[:-1], rtol=1e-12, atol=1e-15)


def test_zero_terminal_snr_rescale() -> None:
    ab = build_alphas_cumprod("linear", 1000)
    z = build_alphas_cumprod("linear", 1000, zero_terminal_snr=True)
    assert z[-1] == 0 and z[0] == ab[0]
    torch.testing.assert_close(z[1], ab[1], rtol=1e-14, atol=0)
    # sqrt(alpha_bar) is an affine function of the original on t = 1..T
    a, b = ab[1:].sqrt(), z[1:].sqrt()
    slope = (b[0] - b[-1]) / (a[0] - a[-1])
    torch.testing.assert_close(b, slope * (a - a[-1]), rtol=1e-10, atol=1e-14)


def test_schedule_kwargs_reach_the_function() -> None:
    ab = build_alphas_cumprod("linear", 1000, {"beta_start": 1e-3, "beta_end": 1e-3})
    torch.testing.assert_close(ab[1:] / ab[:-1], torch.full((1000,), 1 - 1e-3, dtype=torch.float64))
    with pytest.raises(TypeError, match="rejected its arguments"):
        build_alphas_cumprod("linear", 1000, {"nope": 1})


def log_snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """The full log-SNR log(alpha_bar / (1 - alpha_bar)) = 2 lambda, in closed form."""
    return torch.log(alpha_bar) - torch.log1p(-alpha_bar)


def alpha_bar_at(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return DiscreteVP(table).alpha_bar(t)


class TestAlphaBarAt:
    """DiscreteVP's interpolation of its table (what schedules.alpha_bar_at was)."""

    table = build_alphas_cumprod("cosine", 100)

    def test_exact_at_integers(self) -> None:
        t = torch.arange(101, dtype=torch.float64)
        assert torch.equal(alpha_bar_at(self.table, t), self.table)

    def test_log_snr_is_linear_between_integers(self) -> None:
        t = torch.tensor([10.25, 10.5, 57.75], dtype=torch.float64)
        lam = log_snr(alpha_bar_at(self.table, t))
        lo, hi = log_snr(self.table[[10, 10, 57]]), log_snr(self.table[[11, 11, 58]])
        frac = t - t.floor()
        torch.testing.assert_close(lam, lo + frac * (hi - lo), rtol=1e-12, atol=1e-12)

    def test_infinite_end_segments_are_continuous_and_monotone(self) -> None:
        table = build_alphas_cumprod("cosine", 100, zero_terminal_snr=True)
        t = torch.linspace(0, 100, 100_001, dtype=torch.float64)
        ab = alpha_bar_at(table, t)
        assert torch.isfinite(ab).all()
        assert (ab[1:] <= ab[:-1]).all() and (ab[1:] < ab[:-1]).sum() > 99_000
        assert ab[0] == 1 and ab[-1] == 0
        assert (ab[1:] - ab[:-1]).abs().max() < 1e-3  # no jumps

    def test_out_of_range(self) -> None:
        with pytest.raises(ValueError, match="must lie in"):
            alpha_bar_at(self.table, torch.tensor([100.5]))
