r"""UniPC: unified predictor-corrector (Zhao et al. 2023, "UniPC: A Unified
Predictor-Corrector Framework for Fast Sampling of Diffusion Models"), data prediction,
B(h) = e^h - 1 ("bh2", default) or h ("bh1")."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor

from tinydiff.process import PathValues
from tinydiff.samplers._exp import solve_vandermonde, step_orders
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


def _unipc_weights(
    lam: list[float],
    alpha_n: float,
    sigma_ratio: float,
    order: int,
    corrector: bool,
    variant: str = "bh2",
    rho: float | None = None,
) -> tuple[float, list[float]]:
    r"""Coefficients of one UniP (predictor) or UniC (corrector) update, data prediction.

    ``lam`` = [lambda_n (target), lambda_c (current), lambda_{c-1}, ...] (finite except
    lambda_n may be +inf for a first-order predictor). Returns (coefficient of x_c, weights)
    where weights are for [D_c, D_{c-1}, ..., D_{c-order+1}] and, for the corrector, a last
    weight for D_n (the model output at the predicted point).

    With h = lambda_n - lambda_c, r_m = (lambda_{c-m} - lambda_c)/h and
    :math:`\varphi_1 = e^{-h} - 1`, :math:`\varphi_{k+1} = \varphi_k/(-h) - 1/k!`, the
    coefficients a solve :math:`\sum_m a_m r_m^{k-1} = k!\,\varphi_{k+1}/B(h)`, k = 1..p
    (Zhao et al. 2023, Alg. 2 / eq. 8, with the last node r = 1 for the corrector).
    ``variant`` picks B(h): "bh1" is B(h) = h, "bh2" is B(h) = e^h - 1. A float ``rho``
    replaces the solved coefficient when there is a single one (order-2 predictor, order-1
    corrector); any a = 1/2 + O(h) keeps the order, since B(h) = O(h) multiplies it.
    """
    h = lam[0] - lam[1]
    hh = -h
    phi_1 = math.expm1(hh)  # -1 for h = inf
    # bh1's B(h) = h is infinite on a step from or to infinite noise level (lambda = -inf at
    # the start of rectified flow, +inf at t = 0), where B(h) * a would be inf * 0 (NaN) for
    # the last predictor and inf for a fixed rho: such a step takes bh2's finite B(h) = -1
    b_h = hh if variant == "bh1" and math.isfinite(hh) else phi_1
    x_coef = sigma_ratio
    w0 = -alpha_n * phi_1
    num_hist = order - 1
    size = order if corrector else order - 1
    if size == 0:
        return x_coef, [w0]
    rks = [(lam[1 + m] - lam[1]) / h for m in range(1, num_hist + 1)]
    if corrector:
        rks.append(1.0)
    g, phi_k, fact = [], phi_1 / hh - 1.0, 1.0
    for k in range(1, size + 1):
        g.append(phi_k * fact / b_h)
        fact *= k + 1
        phi_k = phi_k / hh - 1.0 / fact
    coeffs = [rho] if rho is not None and size == 1 else solve_vandermonde(rks, g)
    weights = [w0] + [0.0] * num_hist + ([0.0] if corrector else [])
    # x_n = ratio x_c - alpha phi_1 D_c - alpha B(h) sum_m rho_m (D_m - D_c) / r_m
    for m, (r, a) in enumerate(zip(rks, coeffs, strict=True)):
        coef = -alpha_n * b_h * a / r
        weights[1 + m] += coef
        weights[0] -= coef
    return x_coef, weights


@register("unipc", aliases=("uni_pc", "unipc_bh2"))
class UniPC(Sampler):
    r"""UniPC-p with the B(h) = e^h - 1 variant (bh2), data prediction, multistep.

    Step i: evaluate :math:`m_i = D(\tilde x_i, t_i)` at the predicted point; correct the
    previous step with UniC (which uses :math:`m_i`, so it costs no extra evaluation),
    :math:`x^c_i`; then predict :math:`\tilde x_{i+1}` from :math:`x^c_i` with UniP-p using
    :math:`m_i, m_{i-1}, \dots` (Zhao et al. 2023, Alg. 1-3). The corrector of a step of
    order p has order p + 1. Lower orders (first steps, an infinite-noise start under zero
    terminal SNR, the last steps with ``lower_order_final``) are zero weights in the plan.
    The last step to t = 0 has h = inf, so its predictor is first order,
    :math:`x_S = m_{S-1}`, and it is not corrected (no evaluation at t = 0). That step is
    exact only where D is constant along the flow below $\sigma_{S-1}$; for a data
    component of standard deviation s its error is about
    $|y - \mu|\,\hat\sigma_{S-1}^2/(2s^2)$ ($\hat\sigma = \sigma/\alpha$), so
    on times whose last nonzero level falls like 1/S (``trailing``, ``uniform``, diffusers'
    flow grid) it bounds the global order by 2 and dominates from about 10 steps on (the
    "plateau" of benchmarks/results/flow_quality.md); spacings that end lower
    (``quadratic``) keep the full order.

    Args:
        order: 1, 2 (default) or 3; the predictor order.
        lower_order_final: with fewer than ``LOWER_ORDER_FINAL_STEPS`` (15) steps, cap the order of step i at S - i.
        variant: the B(h) of the UniP / UniC update (Zhao et al. 2023, sec. 3.2, eq. 8;
            diffusers' ``solver_type``): with h the step in lambda, every history term
            enters as $-\alpha_{i+1} B(h) \sum_m a_m (D_m - D_i)/r_m$, and the order
            conditions $\sum_m a_m r_m^{k-1} = k!\,\varphi_{k+1}(h)/B(h)$ fix the
            a_m. "bh2" (default): $B(h) = e^{h} - 1$ (as ``expm1`` of -h in the
            data-prediction sign convention); "bh1": $B(h) = h$. Both have the same
            order; with the fixed ``rho`` they differ on long steps, where bh1's
            $B(h)\rho$ grows like h. A step from or to an infinite noise level
            (lambda = -inf at x_T of rectified flow, +inf at t = 0) takes bh2's finite
            $B = -1$ in either variant (bh1's would be infinite: NaN samples before
            0.3). Measured over the mixtures of benchmarks/flow_quality.py's rectified-flow
            block (a 2-d ring, two Gaussians, a 64-d mixture) on VP linear and cosine and
            rectified flow with shift 1 and 3, NFE 5, 10, 20, every built-in spacing: bh1's
            error is 1.42x bh2's (geometric mean; best spacing per cell: 0.76 .. 29x, below
            1 only at NFE 5 and in one rectified-flow cell at NFE 10), hence bh2 by default.
        rho: 0.5 (default) fixes the single coefficient of the order-2 predictor and the
            order-1 corrector at its small-h limit, as the authors' code and diffusers do;
            None solves the order conditions for it as well. Orders are the same (see
            ``_unipc_weights``), but the fixed 1/2 is more accurate: over
            benchmarks/sampler_quality.py's grid its error is 0.81x the solved one's
            (geometric mean over every cell and spacing; up to 50x lower at NFE 10-20 on
            sharp modes, up to 1.8x higher at NFE 5). A float in (0, 1] fixes it there.
        last_step_blend: c in [0, 1), 0 by default. The last step to sigma = 0 returns
            $x_S = \alpha_S[(1 - c)\,m_{S-1} + c\,x^c_{S-1}/\alpha_{S-1}]$, a blend of
            the exact first-order step (c = 0: $x_S = m_{S-1}$, the default and the
            rule of every data-prediction solver) and the corrected iterate, in Karras'
            variables $y = x/\alpha$. c = 1/2 is the trapezoidal rule in
            $\hat\sigma$ for $\hat\epsilon = (y - D)/\hat\sigma$ with
            $\hat\epsilon \to 0$ at $\hat\sigma = 0$: exact to
            $O(\hat\sigma^4)$ for data with a smooth density (Gaussian components wider
            than $\hat\sigma_{S-1}$), but it leaves half the remaining noise where the
            data are sharper than that (images at 8 bits). Best fitted per model, like the
            times (benchmarks/results/flow_quality.md: c fitted in-sample took unipc's error
            on ``trailing`` to 0.10-1.00x that of c = 0). Ignored where sigma(0) > 0 and on
            a single step from x_T (alpha = 0).
        correction_scale: None (default: the exact method) or S floats $s_0, \dots,
            s_{S-1}$ (a list or tuple, one per step, finite), the weight of each step's
            higher-order terms. Step i's update is its first-order (DDIM) part plus
            $s_i$ times the rest: the predictor's history term
            $-\alpha_{i+1} B(h) \sum_m a_m (D_m - D_i)/r_m$ and, where the step's end
            point is corrected (every step but the last), the UniC terms that correct it
            (including the one in the new output $D_{i+1}$). $s_i = 1$ is the exact
            method; a first-order step (the first predictor, the last step to sigma = 0)
            has only the corrector's terms, or none (the last: its entry is ignored; fit
            ``last_step_blend`` there). Per-step solver coefficients fitted for the model
            are the idea of PAS (Wang et al. 2024, "Diffusion Sampling Correction via
            Approximately 10 Parameters") and S4S (Frankel et al. 2025, "S4S: Solving for
            a Diffusion Model Solver"), which learn corrections of a solver's update per
            step against a teacher trajectory, and of DPM-Solver-v3's empirical model
            statistics (Zheng et al. 2023); here one scalar per step, fitted by
            `tinydiff.timestep_search.optimize_timesteps` (``coefficients=True``). The
            plan's values change, not its shape: compiled sampling does not recompile.

    State: the last corrected iterate and ``order`` past model outputs.
    NFE: one per step, ``nfe(S) = S``.
    """

    #: geometric mean over benchmarks/sampler_quality.py's quick grid (VP and rectified flow)
    #: of error / best spacing's: 1.63
    default_spacing = "quadratic"
    tunable: ClassVar[Mapping[str, tuple[float, float]]] = {
        "last_step_blend": (0.0, 0.95),
        "correction_scale": (0.0, 2.0),
    }
    per_step: ClassVar[Mapping[str, float]] = {"correction_scale": 1.0}

    def __init__(
        self,
        order: int = 2,
        lower_order_final: bool = True,
        variant: str = "bh2",
        rho: float | None = 0.5,
        last_step_blend: float = 0.0,
        correction_scale: Sequence[float] | None = None,
    ) -> None:
        if isinstance(order, bool) or order not in (1, 2, 3):
            raise ValueError(f"unipc order must be 1, 2 or 3, got {order!r}")
        if not isinstance(lower_order_final, bool):
            raise ValueError(f"lower_order_final must be a bool, got {lower_order_final!r}")
        if variant not in ("bh1", "bh2"):
            raise ValueError(f"unipc variant must be 'bh1' or 'bh2', got {variant!r}")
        if rho is not None and (
            isinstance(rho, bool)
            or not isinstance(rho, (int, float))
            or not math.isfinite(rho)
            or not 0 < rho <= 1
        ):
            raise ValueError(f"unipc rho must be None or a float in (0, 1], got {rho!r}")
        if (
            isinstance(last_step_blend, bool)
            or not isinstance(last_step_blend, (int, float))
            or not 0 <= last_step_blend < 1
        ):
            raise ValueError(
                f"unipc last_step_blend must be a float in [0, 1), got {last_step_blend!r}; "
                "0 keeps the exact first-order last step"
            )
        self.last_step_blend = float(last_step_blend)
        self.correction_scale = check_per_step("unipc correction_scale", correction_scale)
        self.variant = variant
        self.rho = None if rho is None else float(rho)
        self.order = order
        self.lower_order_final = lower_order_final

    def plan(self, path: PathValues) -> dict[str, Tensor]:
        v = path
        lam = v.lam.tolist()
        num_steps = v.t.numel() - 1
        p = self.order
        orders = step_orders(v, p, lower_order_final=self.lower_order_final)
        # predictor columns: x^c_i, m_i, m_{i-1}, ... ; corrector columns: x^c_{i-1}, m_i
        # (new), m_{i-1}, ..., m_{i-p}, and "keep" (1 where x~_i is taken as is)
        pred = torch.zeros(num_steps, p + 1, dtype=torch.float64)
        corr = torch.zeros(num_steps, p + 2, dtype=torch.float64)
        keep = torch.zeros(num_steps, dtype=torch.float64)
        scale = per_step_values("correction_scale", self.correction_scale, num_steps)
        for i in range(num_steps):
            ratio = float(v.sigma[i + 1] / v.sigma[i])
            alpha_n = float(v.alpha[i + 1])
            o = orders[i]
            nodes = [lam[i + 1]] + [lam[i - j] for j in range(o)]
            x_coef, w = _unipc_weights(
                nodes, alpha_n, ratio, o, corrector=False, variant=self.variant, rho=self.rho
            )
            pred[i, 0] = x_coef
            pred[i, 1 : 1 + len(w)] = torch.tensor(w)
            if scale is not None:  # first-order part (x_coef, w0_first) + s_i (the rest)
                first = -alpha_n * math.expm1(lam[i] - lam[i + 1])
                pred[i, 2:] *= scale[i]
                pred[i, 1] = first + scale[i] * (pred[i, 1] - first)
            if i == 0:
                keep[i] = 1.0
                continue
            o = orders[i - 1]  # correct step i-1 -> i with that step's order
            nodes = [lam[i]] + [lam[i - 1 - j] for j in range(o)]
            x_coef, w = _unipc_weights(
                nodes,
                float(v.alpha[i]),
                float(v.sigma[i] / v.sigma[i - 1]),
                o,
                corrector=True,
                variant=self.variant,
                rho=self.rho,
            )
            corr[i, 0] = x_coef
            corr[i, 1] = w[-1]
            corr[i, 2 : 2 + o] = torch.tensor(w[:-1])
            if scale is not None:  # the correction of step i - 1, weighted by s_{i-1}
                first = -float(v.alpha[i]) * math.expm1(lam[i - 1] - lam[i])
                corr[i, 1] *= scale[i - 1]
                corr[i, 3:] *= scale[i - 1]
                corr[i, 2] = first + scale[i - 1] * (corr[i, 2] - first)
        # x_S = alpha_S (1 - c) m + c x^c / alpha_{S-1} (not from x_T itself where alpha = 0)
        if self.last_step_blend and math.isinf(lam[-1]) and float(v.alpha[-2]) > 0:
            c = self.last_step_blend
            pred[-1, 0] = c * float(v.alpha[-1] / v.alpha[-2])
            pred[-1, 1:] *= 1 - c
        return {"keep": keep, "pred": pred, "corr": corr}

    def init_state(self, x: Tensor) -> State:
        return tuple(torch.zeros_like(x) for _ in range(self.order + 1))

    def step(self, x: Tensor, state: State, c: Row, denoise: Denoiser, noise: Noise) -> StepResult:
        x_base, *hist = state  # x^c_{i-1}; m_{i-1}, ..., m_{i-p}
        m = denoise(x, c["point"]).x0
        corr, pred = c["corr"], c["pred"]
        x_c = c["keep"] * x + corr[0] * x_base + corr[1] * m
        for j, m_j in enumerate(hist):
            x_c = x_c + corr[j + 2] * m_j
        new_hist = [m, *hist[:-1]]
        x_next = pred[0] * x_c
        for j, m_j in enumerate(new_hist):
            x_next = x_next + pred[j + 1] * m_j
        return x_next, (x_c, *new_hist)
