r"""DPM-Solver++(3M): third-order multistep (Lu et al. 2022, "DPM-Solver++", sec. 4 and
App. B, the multistep generalisation of Alg. 2)."""

from __future__ import annotations

import torch
from torch import Tensor

from tinydiff.process import PathValues
from tinydiff.samplers._exp import exponential_adams_weights, step_orders
from tinydiff.samplers.base import Denoiser, Noise, Row, Sampler, State, StepResult, register


@register("dpmpp_3m", aliases=("dpm_solver_pp_3m", "dpmsolver++_3m"))
class DPMSolverPP3M(Sampler):
    r"""Third-order multistep solver of the data-prediction probability-flow ODE.

    Step i integrates the exact solution (Lu et al. 2022, eq. 9)
    :math:`x_{i+1} = \frac{\sigma_{i+1}}{\sigma_i}x_i + \alpha_{i+1}\int_0^{h_i} e^{-\tau}
    D(\lambda_{i+1}-\tau)\,d\tau` with D replaced by the quadratic in :math:`\lambda` through
    :math:`D_i, D_{i-1}, D_{i-2}`, integrated exactly (plan time, float64). This is the
    third-order Taylor form of DPM-Solver++(3M) with the derivatives taken from that
    quadratic. Order ramps up 1, 2, 3 over the first steps (history weights 0), skipping an
    infinite-noise start (zero terminal SNR); the last step to t = 0 is first order
    (h = inf: :math:`x_S = D_{S-1}`).

    Args:
        lower_order_final: with fewer than ``LOWER_ORDER_FINAL_STEPS`` (15) steps, cap the order of step i at S - i (the
            step before the last is second order), which avoids extrapolating over the long
            final steps (Lu et al. 2022, sec. 4).

    State: the two previous denoiser outputs. NFE: one per step, ``nfe(S) = S``.
    """

    #: geometric mean over benchmarks/sampler_quality.py's quick grid (VP and rectified flow)
    #: of error / best spacing's: 1.79
    default_spacing = "quadratic"

    order = 3

    def __init__(self, lower_order_final: bool = True, curvature_weight: float = 1.0) -> None:
        if not isinstance(lower_order_final, bool):
            raise ValueError(f"lower_order_final must be a bool, got {lower_order_final!r}")
        if (
            isinstance(curvature_weight, bool)
            or not isinstance(curvature_weight, (int, float))
            or not 0 <= curvature_weight <= 1
        ):
            raise ValueError(
                f"dpmpp_3m curvature_weight must be a float in [0, 1], got {curvature_weight!r}; "
                "1 is the exact third-order method"
            )
        self.lower_order_final = lower_order_final
        self.curvature_weight = float(curvature_weight)

    def plan(self, path: PathValues) -> dict[str, Tensor]:
        orders = step_orders(path, self.order, lower_order_final=self.lower_order_final)
        # columns: x_i, then the weights of D_i, D_{i-1}, D_{i-2}
        cols = torch.zeros(len(orders), self.order + 1, dtype=torch.float64)
        for i, order in enumerate(orders):
            cols[i, 0] = float(path.sigma[i + 1] / path.sigma[i])
            w = exponential_adams_weights(path, i, order)
            if order == 3 and self.curvature_weight != 1.0:
                w = _damp_curvature(
                    w, [float(path.lam[i - j]) for j in range(3)], self.curvature_weight
                )
            cols[i, 1 : order + 1] = torch.tensor(w)
        return {"coef_x": cols[:, 0], "coef_d": cols[:, 1:]}

    def init_state(self, x: Tensor) -> State:
        return tuple(torch.zeros_like(x) for _ in range(self.order - 1))

    def step(self, x: Tensor, state: State, c: Row, denoise: Denoiser, noise: Noise) -> StepResult:
        d = denoise(x, c["point"]).x0
        history = (d, *state)
        x_next = c["coef_x"] * x
        for j, d_j in enumerate(history):
            x_next = x_next + c["coef_d"][j] * d_j
        return x_next, history[:-1]


def _damp_curvature(w: list[float], lam: list[float], c: float) -> list[float]:
    r"""The weights ``w`` of an exact quadratic step through D at ``lam`` = [lambda_i,
    lambda_{i-1}, lambda_{i-2}] with the curvature term scaled by c.

    The step is linear in D and exact on quadratics, so its weight of
    $q(\lambda) = (\lambda - \lambda_i)^2$ is $I_2 = \sum_j w_j q(\lambda_j)$, and the
    curvature term $\tfrac12 D'' q$ of the quadratic through the outputs enters with
    $I_2$ times the second divided difference $D[\lambda_i, \lambda_{i-1}, \lambda_{i-2}]
    = \sum_j D_j / \prod_{k \ne j} (\lambda_j - \lambda_k)$.
    """
    i2 = sum(wj * (lj - lam[0]) ** 2 for wj, lj in zip(w, lam, strict=True))
    out = []
    for j, (wj, lj) in enumerate(zip(w, lam, strict=True)):
        denom = 1.0
        for k, lk in enumerate(lam):
            if k != j:
                denom *= lj - lk
        out.append(wj - (1.0 - c) * i2 / denom)
    return out
