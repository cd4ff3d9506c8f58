r"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models", Alg. 2)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor

from tinydiff.process import PathValues
from tinydiff.samplers._exp import first_order, step_orders
from tinydiff.samplers.base import (
    Denoiser,
    Noise,
    Row,
    Sampler,
    State,
    StepResult,
    check_per_step,
    per_step_values,
    register,
)


def midpoint_weight(v: PathValues, i: int) -> float:
    r""":math:`1/(2r_i) = h_i/(2h_{i-1})`: the weight of the backward difference
    :math:`D_i - D_{i-1}` in the second-order multistep step i (Lu et al. 2022, Alg. 2)."""
    return 0.5 * float(v.lam[i + 1] - v.lam[i]) / float(v.lam[i] - v.lam[i - 1])


@register("dpmpp_2m", aliases=("dpm_solver_pp_2m", "dpmsolver++_2m"))
class DPMSolverPP2M(Sampler):
    r"""Second-order multistep solver of the data-prediction probability-flow ODE in
    :math:`\lambda = \log(\alpha/\sigma)` (Lu et al. 2022, Alg. 2):

    .. math::
        x_{i+1} = \frac{\sigma_{i+1}}{\sigma_i}x_i + \alpha_{i+1}(1 - e^{-h_i})
        \Big[\Big(1 + \frac{1}{2r_i}\Big)D_i - \frac{1}{2r_i}D_{i-1}\Big],
        \quad r_i = h_{i-1}/h_i.

    Lower order where a second point is unavailable, expressed as a zero history weight:
    the first step, the step after an infinite-noise start (zero terminal SNR: lambda_0 is
    -inf, so D_0 cannot enter a polynomial in lambda), and the last step to t = 0, where
    h = +inf and the exact first-order update is :math:`x_S = D_{S-1}` (so the
    ``lower_order_final`` switch of other implementations is built in, not an option; on a
    process with sigma(0) > 0 the last step is an ordinary second-order step).

    Args:
        correction_scale: None (default: the exact method, bitwise) or S floats $s_i$ (a
            list or tuple, one per step, finite): step i takes
            $s_i \frac{1}{2r_i}(D_i - D_{i-1})$ as its second-order term (1: the exact
            method, 0: DDIM). First-order steps (the first, the last to t = 0) have no such
            term and ignore their entry. Per-step coefficients fitted for the model as in PAS
            (Wang et al. 2024) and S4S (Frankel et al. 2025), by
            `tinydiff.timestep_search.optimize_timesteps` (``coefficients=True``).

    State: the previous denoiser output. NFE: one per step, ``nfe(S) = S``.
    """

    tunable: ClassVar[Mapping[str, tuple[float, float]]] = {"correction_scale": (0.0, 2.0)}
    per_step: ClassVar[Mapping[str, float]] = {"correction_scale": 1.0}

    #: geometric mean over benchmarks/sampler_quality.py's quick grid (VP and rectified flow)
    #: of error / best spacing's: 1.71
    default_spacing = "logsnr_trailing"

    def __init__(self, correction_scale: Sequence[float] | None = None) -> None:
        self.correction_scale = check_per_step("dpmpp_2m correction_scale", correction_scale)

    def plan(self, path: PathValues) -> dict[str, Tensor]:
        rows = []
        orders = step_orders(path, 2)
        scale = per_step_values("correction_scale", self.correction_scale, len(orders))
        for i, order in enumerate(orders):
            ratio, w = first_order(path, i)
            half_inv_r = midpoint_weight(path, i) if order == 2 else 0.0
            if scale is not None:
                half_inv_r *= scale[i]
            rows.append((ratio, w * (1 + half_inv_r), -w * half_inv_r))
        cols = torch.tensor(rows, dtype=torch.float64).reshape(-1, 3)
        return {"coef_x": cols[:, 0], "coef_d": cols[:, 1], "coef_prev": cols[:, 2]}

    def init_state(self, x: Tensor) -> State:
        return (torch.zeros_like(x),)

    def step(self, x: Tensor, state: State, c: Row, denoise: Denoiser, noise: Noise) -> StepResult:
        (d_prev,) = state
        d = denoise(x, c["point"]).x0
        x_next = c["coef_x"] * x + c["coef_d"] * d + c["coef_prev"] * d_prev
        return x_next, (d,)
