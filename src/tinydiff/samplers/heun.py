r"""Heun's second-order method for the probability-flow ODE, with optional stochastic
churn (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models", Alg. 1 and Alg. 2)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from tinydiff._validation import check_number
from tinydiff.process import PathValues
from tinydiff.samplers.base import Denoiser, Sampler, State, register


@register("heun", aliases=("karras_heun", "edm"))
class Heun(Sampler):
    r"""Karras et al. 2022, Alg. 1 (deterministic) and Alg. 2 (``s_churn > 0``).

    In Karras' variables :math:`y = x/\alpha`, :math:`\hat\sigma = \sigma/\alpha`, the ODE is
    :math:`dy/d\hat\sigma = (y - D)/\hat\sigma`. Step i takes an Euler step to
    :math:`\hat\sigma_{i+1}`, evaluates D there and applies the trapezoidal rule. Written in
    x with :math:`q = \hat\sigma_{i+1}/\hat\sigma_i`:

    .. math::
        x' = \frac{\sigma_{i+1}}{\sigma_i}x_i + \alpha_{i+1}(1-q)D_0,\qquad
        x_{i+1} = \frac{\sigma_{i+1}}{\sigma_i}x_i
        + \alpha_{i+1}\frac{(q-1)(1-2q)}{2q}D_0 + \alpha_{i+1}\frac{1-q}{2q}D_1,

    with :math:`D_0 = D(x_i, t_i)`, :math:`D_1 = D(x', t_{i+1})`. The last step (to
    sigma = 0, q = 0) is Euler, :math:`x_S = D_0`, as in Alg. 1. Under zero terminal SNR
    the first step starts at infinite sigma (q = 0, the trapezoid over an infinite interval
    does not exist) and is also Euler, in its exact finite limit
    :math:`x' = \sigma_1 x_T + \alpha_1 D_0`.

    **NFE: nfe(S) = 2S.** Every step makes exactly two denoiser calls, so that the step is
    one fixed graph (torch.compile / CUDA graphs): Alg. 1 needs 2S - 1, and the final
    step's second call (its time cannot be t = 0, where the network is undefined) is made
    at the step's own start and given weight 0. Compare with other Heun implementations at
    equal NFE: theirs (2S - 1) vs 2S here.

    **Large sigma ratios.** The trapezoid's D_1 weight is ~1/(2q): a step with a tiny
    :math:`q = \hat\sigma_{i+1}/\hat\sigma_i` over-corrects (the exact correction is O(1)).
    With ``trailing`` spacing on the cosine schedule the first step has q ~ 1/500
    (sigma(T) ~ 2e4) and Heun needs ~120 steps; ``karras`` or ``logsnr`` spacing, or the
    exponential-integrator solvers (dpmpp_*, unipc), do not have this problem.

    **Churn (Alg. 2).** With :math:`\gamma_i = \min(s_{churn}/S, \sqrt2 - 1)` where
    :math:`s_{tmin} \le \hat\sigma_i \le s_{tmax}` (0 elsewhere), noise is added to raise
    the level to :math:`\hat\sigma = (1+\gamma_i)\hat\sigma_i` before the step:
    :math:`y \leftarrow y + \sqrt{\hat\sigma^2 - \hat\sigma_i^2}\,s_{noise}\,z`. The network
    time of the raised level is read from the process (the exact inverse
    :meth:`~tinydiff.process.GaussianProcess.time_at_lam`); :math:`\hat\sigma` is capped at
    :math:`\hat\sigma_{i-1}`, and the first step (and the step after an infinite-noise start)
    has no churn.

    Args:
        s_churn: total churn, >= 0 (0: deterministic Alg. 1).
        s_tmin: churn only where s_tmin <= sigma_hat_i (Karras sigma).
        s_tmax: churn only where sigma_hat_i <= s_tmax (Karras sigma).
        s_noise: scale of the added noise (Karras et al.: slightly above 1 can help).
    """

    stochastic = True

    def __init__(
        self,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = math.inf,
        s_noise: float = 1.0,
    ) -> None:
        self.s_churn = check_number("s_churn", s_churn, min=0.0, owner="heun")
        self.s_tmin = check_number("s_tmin", s_tmin, min=0.0, owner="heun")
        self.s_noise = check_number("s_noise", s_noise, min=0.0, owner="heun")
        # s_tmax = inf (the default) means "no upper limit"
        self.s_tmax = check_number("s_tmax", s_tmax, min=self.s_tmin, finite=False, owner="heun")

    @property
    def is_stochastic(self) -> bool:
        return self.s_churn > 0

    def nfe(self, num_steps: int) -> int:
        return 2 * num_steps

    def plan(self, path: PathValues) -> dict[str, Tensor]:
        process = path.process
        ts = path.t
        num_steps = ts.numel() - 1
        ksig = torch.exp(-path.lam)  # Karras sigma = sigma / alpha (inf at zero SNR, 0 at t = 0)
        # churn: raise the level of step i to k_hat = (1 + gamma_i) k_i, at its exact time
        t_hat = ts[:-1].clone()
        k_target = ksig[:-1].clone()
        for i in range(num_steps):
            k_i = float(ksig[i])
            if (
                self.s_churn > 0
                and i > 0
                and math.isfinite(float(ksig[i - 1]))
                and self.s_tmin <= k_i <= self.s_tmax
            ):
                gamma = min(self.s_churn / num_steps, math.sqrt(2) - 1)
                gamma = min(gamma, float(ksig[i - 1]) / k_i - 1)
                if gamma > 0:
                    k_target[i] = k_i * (1 + gamma)
        churned = k_target != ksig[:-1]
        if bool(churned.any()):
            t_hat[churned] = process.time_at_lam(-torch.log(k_target[churned]))
        a_hat, s_hat = process.alpha_sigma(t_hat)
        a_hat = torch.where(churned, a_hat, path.alpha[:-1])
        s_hat = torch.where(churned, s_hat, path.sigma[:-1])
        # the last step to sigma = 0 is Euler: its unused second call is made at t_hat
        to_zero = bool(ksig[-1] == 0)
        t2 = torch.cat([ts[1:-1], t_hat[-1:] if to_zero else ts[-1:]])
        names = "churn_scale churn_noise e_x e_d c_x c_0 c_1".split()
        rows = []
        for i in range(num_steps):
            k_i = float(ksig[i])
            a_h, s_h = float(a_hat[i]), float(s_hat[i])
            if bool(churned[i]):
                k_h = s_h / a_h
                churn_scale = a_h / float(path.alpha[i])
                churn_noise = a_h * math.sqrt(max(k_h**2 - k_i**2, 0.0)) * self.s_noise
            else:
                k_h, churn_scale, churn_noise = k_i, 1.0, 0.0
            a_n, s_n, k_n = float(path.alpha[i + 1]), float(path.sigma[i + 1]), float(ksig[i + 1])
            ratio = s_n / s_h
            q = k_n / k_h  # 0 at the last step and after an infinite-noise start
            if i == num_steps - 1 and to_zero:  # Euler to sigma = 0; the 2nd call repeats the 1st
                e_x, e_d = 1.0, 0.0
            else:
                e_x, e_d = ratio, a_n * (1 - q)
            if q > 0:
                c_0 = a_n * (q - 1) * (1 - 2 * q) / (2 * q)
                c_1 = a_n * (1 - q) / (2 * q)
            else:
                c_0, c_1 = a_n, 0.0
            rows.append((churn_scale, churn_noise, e_x, e_d, ratio, c_0, c_1))
        cols = torch.tensor(rows, dtype=torch.float64).reshape(num_steps, len(names))
        plan = {name: cols[:, k] for k, name in enumerate(names)}
        plan["point_hat"] = process.points(t_hat)
        plan["point_2"] = process.points(t2)
        return plan

    def step(
        self,
        x: Tensor,
        state: State,
        c: Mapping[str, Tensor],
        denoise: Denoiser,
        noise: Tensor | None,
    ) -> tuple[Tensor, State]:
        if noise is not None:
            x = c["churn_scale"] * x + c["churn_noise"] * noise
        d0 = denoise(x, c["point_hat"]).x0
        x_pred = c["e_x"] * x + c["e_d"] * d0
        d1 = denoise(x_pred, c["point_2"]).x0
        return c["c_x"] * x + c["c_0"] * d0 + c["c_1"] * d1, state
