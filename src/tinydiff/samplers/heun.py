r"""Heun's second-order method for the probability-flow ODE, with optional stochastic
churn (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models", Alg. 1 and Alg. 2); the corrector is the exponential trapezoid in log-SNR, which
stays bounded on steps with a large noise-level ratio."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from tinydiff.samplers._vp import exp_moments, vp
from tinydiff.samplers.base import Denoiser, Sampler, State, register


@register("heun", aliases=("karras_heun", "edm"))
class Heun(Sampler):
    r"""Karras et al. 2022, Alg. 1 (deterministic) and Alg. 2 (``s_churn > 0``), with the
    trapezoid taken in log-SNR on the exactly integrated linear part (so it never diverges).

    Karras' Heun step is an Euler predictor to the next noise level, one more denoiser call
    there, and the trapezoidal rule. In VP notation (:mod:`tinydiff.samplers._vp`: alpha,
    sigma and :math:`\lambda = \log(\alpha/\sigma)` per time), step i goes from t to s with
    :math:`h = \lambda_s - \lambda_t` through the exact solution of the probability-flow ODE
    (Lu et al. 2022, eq. 9)

    .. math::
        x_s = \frac{\sigma_s}{\sigma_t} x_t + \alpha_s \int_0^{h} e^{-\tau}
        D(\lambda_s - \tau)\,d\tau .

    The predictor is the exact first-order step (DDIM),
    :math:`x' = \frac{\sigma_s}{\sigma_t} x_t + \alpha_s(1 - e^{-h}) D_0`, and the corrector
    replaces D by the straight line in lambda through :math:`D_0 = D(x_t, t)` and
    :math:`D_1 = D(x', s)` and integrates it exactly:

    .. math::
        x_s = \frac{\sigma_s}{\sigma_t} x_t + \alpha_s N_1 D_0 + \alpha_s (N_0 - N_1) D_1,
        \qquad N_m = h\int_0^1 e^{-hu} u^m\,du,

    (:math:`N_0 = 1 - e^{-h}`). For small h both weights are :math:`\alpha_s h/2 + O(h^2)`:
    the classical trapezoid, and the method agrees with Karras' Heun to second order. The
    last step (to sigma = 0, :math:`h = \infty`) is Euler, :math:`x_S = D_0`, as in Alg. 1.
    Under zero terminal SNR the first step starts at infinite sigma (:math:`h = \infty`
    too) and is also Euler, in its exact finite limit :math:`x' = \sigma_1 x_T + \alpha_1 D_0`.

    **Why not the trapezoid in Karras' sigma.** In :math:`y = x/\alpha`,
    :math:`\hat\sigma = \sigma/\alpha`, Alg. 1's corrector weighs :math:`D_1` by
    :math:`(1-q)/(2q)` with :math:`q = \hat\sigma_s/\hat\sigma_t = e^{-h}`. A step with a
    large noise-level ratio (the first step of most spacings on the cosine schedule, where
    sigma(T) ~ 2e4 and q ~ 1/500) multiplies D_1's error by hundreds, while the exact
    correction is O(1): Karras' Heun (diffusers', k-diffusion's) then ends 5x to 200x
    farther from the flow than DDIM. Here both weights are positive and sum to
    :math:`\alpha_s(1 - e^{-h}) < \alpha_s` for any h, so a large step is never amplified;
    this is the exponential trapezoid of the exponential integrators (Hochbruck & Ostermann
    2010; the second-order Runge-Kutta of DPM-Solver, Lu et al. 2022, with the linear
    interpolant integrated exactly).

    **NFE: nfe(S) = 2S.** Every step makes exactly two denoiser calls, so that the step is
    one fixed graph (torch.compile / CUDA graphs): Alg. 1 needs 2S - 1, and the final
    step's second call (its time cannot be t = 0, where the network is undefined) is made
    at the step's own start and given weight 0. Compare with other Heun implementations at
    equal NFE: theirs (2S - 1) vs 2S here.

    **Churn (Alg. 2).** With :math:`\gamma_i = \min(s_{churn}/S, \sqrt2 - 1)` where
    :math:`s_{tmin} \le \hat\sigma_i \le s_{tmax}` (0 elsewhere), noise is added to raise
    the level to :math:`\hat\sigma = (1+\gamma_i)\hat\sigma_i` before the step:
    :math:`y \leftarrow y + \sqrt{\hat\sigma^2 - \hat\sigma_i^2}\,s_{noise}\,z`. A plan only
    knows the schedule at its own times, so the network time of the raised level is
    interpolated linearly in log-SNR between :math:`t_i` and :math:`t_{i-1}` (alpha_bar is
    exact); :math:`\hat\sigma` is capped at :math:`\hat\sigma_{i-1}`, and the first step (and
    the step after an infinite-noise start) has no churn.

    Args:
        s_churn: total churn, >= 0 (0: deterministic Alg. 1).
        s_tmin: churn only where s_tmin <= sigma_hat_i (Karras sigma).
        s_tmax: churn only where sigma_hat_i <= s_tmax (Karras sigma).
        s_noise: scale of the added noise (Karras et al.: slightly above 1 can help).
    """

    #: geometric mean over benchmarks/sampler_quality.py's grid of error / best spacing's: 1.28
    default_spacing = "quadratic"

    stochastic = True

    def __init__(
        self,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = math.inf,
        s_noise: float = 1.0,
    ) -> None:
        for name, value in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_noise", s_noise)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"heun {name} must be a number >= 0, got {value!r}")
        if isinstance(s_tmax, bool) or not isinstance(s_tmax, (int, float)) or not s_tmax >= s_tmin:
            raise ValueError(f"heun s_tmax must be a number >= s_tmin = {s_tmin}, got {s_tmax!r}")
        self.s_churn, self.s_tmin = float(s_churn), float(s_tmin)
        self.s_tmax, self.s_noise = float(s_tmax), float(s_noise)

    @property
    def is_stochastic(self) -> bool:
        return self.s_churn > 0

    def nfe(self, num_steps: int) -> int:
        return 2 * num_steps

    def plan(self, timesteps: Tensor, alpha_bar: Tensor) -> dict[str, Tensor]:
        v = vp(alpha_bar)
        ts = timesteps.to(torch.float64)
        num_steps = ts.numel() - 1
        ksig = torch.exp(-v.lam)  # Karras sigma = sigma / alpha (inf at zero SNR, 0 at t = 0)
        names = "t_hat ab_hat churn_scale churn_noise e_x e_d t2 ab2 c_x c_0 c_1".split()
        rows = []
        for i in range(num_steps):
            k_i = float(ksig[i])
            gamma = 0.0
            if (
                self.s_churn > 0
                and i > 0
                and math.isfinite(float(ksig[i - 1]))
                and self.s_tmin <= k_i <= self.s_tmax
            ):
                gamma = min(self.s_churn / num_steps, math.sqrt(2) - 1)
                gamma = min(gamma, float(ksig[i - 1]) / k_i - 1)
            if gamma > 0:
                k_hat = k_i * (1 + gamma)
                lam_hat = -math.log(k_hat)
                frac = (float(v.lam[i]) - lam_hat) / float(v.lam[i] - v.lam[i - 1])
                t_hat = float(ts[i]) + frac * float(ts[i - 1] - ts[i])
                ab_hat = 1.0 / (1.0 + k_hat**2)
                a_hat, s_hat = math.sqrt(ab_hat), math.sqrt(1 - ab_hat)
                churn_scale = a_hat / float(v.alpha[i])
                churn_noise = a_hat * math.sqrt(k_hat**2 - k_i**2) * self.s_noise
            else:
                k_hat, t_hat, ab_hat = k_i, float(ts[i]), float(alpha_bar[i])
                a_hat, s_hat = float(v.alpha[i]), float(v.sigma[i])
                churn_scale, churn_noise = 1.0, 0.0
            a_n, s_n, k_n = float(v.alpha[i + 1]), float(v.sigma[i + 1]), float(ksig[i + 1])
            ratio = s_n / s_hat
            q = k_n / k_hat  # 0 at the last step and after an infinite-noise start
            last = i == num_steps - 1
            if last:  # Euler to sigma = 0; the second call repeats the first, weight 0
                e_x, e_d, t2, ab2 = 1.0, 0.0, t_hat, ab_hat
            else:
                e_x, e_d, t2, ab2 = ratio, a_n * (1 - q), float(ts[i + 1]), float(alpha_bar[i + 1])
            if q > 0:  # the exponential trapezoid over h = lambda_next - lambda_hat
                n_0, n_1 = exp_moments(-math.log(q), 2)
                c_0, c_1 = a_n * n_1, a_n * (n_0 - n_1)
            else:  # Euler: the last step, or the first after an infinite-noise start
                c_0, c_1 = a_n, 0.0
            rows.append(
                (t_hat, ab_hat, churn_scale, churn_noise, e_x, e_d, t2, ab2, ratio, c_0, c_1)
            )
        cols = torch.tensor(rows, dtype=torch.float64).reshape(num_steps, len(names))
        return {name: cols[:, k] for k, name in enumerate(names)}

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
        d0 = denoise(x, c["t_hat"], c["ab_hat"]).x0
        x_pred = c["e_x"] * x + c["e_d"] * d0
        d1 = denoise(x_pred, c["t2"], c["ab2"]).x0
        return c["c_x"] * x + c["c_0"] * d0 + c["c_1"] * d1, state
