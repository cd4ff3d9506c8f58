r"""The variational bound on the negative log-likelihood, in bits per dimension.

For integer times :math:`0 = s_0 < s_1 < \dots < s_K \le T` (all of 1..T by default) the
reverse process that steps :math:`s_K \to s_{K-1} \to \dots \to s_0` defines a valid
generative model whatever subset is chosen (respacing, Nichol & Dhariwal 2021, sec. 4), so

.. math::
    -\log p(x_0) \le
      \underbrace{D_{KL}(q(x_{s_K}\mid x_0)\,\|\,\mathcal N(0, I))}_{\text{prior}}
    + \sum_{i=2}^{K} \mathbb E_q\, D_{KL}\big(q(x_{s_{i-1}}\mid x_{s_i}, x_0)\,\|\,
      p(x_{s_{i-1}}\mid x_{s_i})\big)
    + \mathbb E_q[-\log p(x_0 \mid x_{s_1})]

(Ho et al. 2020, eq. 5; Nichol & Dhariwal 2021, eq. 4-7). Each expectation is estimated
with one draw of :math:`x_{s_i} \sim q(x_{s_i} \mid x_0)` per sample and term, as in Ho et
al.'s evaluation; the result is an unbiased estimate of the bound. The reverse steps are
Gaussian with the posterior mean at the model's :math:`\hat x_0` and the model's variance
type; for the last step the variance is that of :class:`tinydiff.samplers.ddpm.DDPM`
(:math:`\tilde\beta` clipped to the neighbouring step, or :math:`\beta`). Coarser subsets
give looser bounds; as the steps shrink and the model approaches the exact denoiser the
bound approaches the true NLL.

Decoders (the last term):

* ``"discrete"``: image data in [-1, 1] quantised to 256 levels; the probability of the
  bin of width 2/255 around x (open-ended at -1 and 1) under the Gaussian (Ho et al. 2020,
  sec. 3.3). A probability, so the bound is >= 0 and comparable to bits/dim of 8-bit images.
* ``"continuous"``: the Gaussian density itself, for real-valued data; a density bound,
  which can be negative in bits/dim.

Bits per dimension: the bound in nats summed over all dimensions, divided by D ln 2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from tinydiff import conditioning
from tinydiff._validation import in_eval_mode
from tinydiff.process import DiscreteVP
from tinydiff.variances import clipped_log_beta_tilde, gaussian_kl, gaussian_posterior

if TYPE_CHECKING:
    from collections.abc import Callable

    from tinydiff.denoiser import ModelLike as DiffusionModel
    from tinydiff.process import GaussianProcess

__all__ = [
    "DECODERS",
    "DIVERGENCES",
    "discretized_gaussian_log_likelihood",
    "nll",
    "nll_bound",
    "ode_nll",
    "vlb_applies",
    "vlb_terms",
]

DECODERS = ("discrete", "continuous")
"""The values of the `decoder` argument of [`nll_bound`][tinydiff.likelihood.nll_bound]: the
data term of the bound for 8-bit data in [-1, 1] or for continuous data."""


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """log P(bin of x) under N(mean, exp(log_var)) for data on 256 levels in [-1, 1].

    The bin is [x - 1/255, x + 1/255], extended to -inf at x = -1 and +inf at x = 1
    (Ho et al. 2020, eq. 13). Elementwise, in nats; float64 internally.
    """
    x, mean = x.double(), mean.double()
    inv_std = torch.exp(-0.5 * log_var.double())
    upper = (x - mean + 1 / 255) * inv_std
    lower = (x - mean - 1 / 255) * inv_std
    # subtract in the tail where the CDFs are not both close to 1 (no cancellation)
    mid = torch.where(
        lower > 0,
        torch.special.ndtr(-lower) - torch.special.ndtr(-upper),
        torch.special.ndtr(upper) - torch.special.ndtr(lower),
    )
    log_mid = torch.log(mid.clamp_min(1e-300))
    return torch.where(
        x < -0.999,
        torch.special.log_ndtr(upper),
        torch.where(x > 0.999, torch.special.log_ndtr(-lower), log_mid),
    )


def _times(model: DiffusionModel, timesteps: Any) -> list[int]:
    T = model.num_timesteps
    if timesteps is None:
        return list(range(1, T + 1))
    if isinstance(timesteps, int) and not isinstance(timesteps, bool):
        if not 1 <= timesteps <= T:
            raise ValueError(f"timesteps (a number of steps) must be in 1..{T}, got {timesteps}")
        return sorted({round(T * i / timesteps) for i in range(1, timesteps + 1)})
    times = torch.as_tensor(timesteps).flatten()
    if times.is_floating_point() or times.is_complex():
        raise ValueError(f"timesteps must be integers in 1..{T}, got dtype {times.dtype}")
    values = sorted(set(times.tolist()))
    if not values or values[0] < 1 or values[-1] > T:
        raise ValueError(f"timesteps must be non-empty integers in 1..{T}, got {values[:10]}")
    return values


@torch.no_grad()
def vlb_terms(
    model: DiffusionModel,
    x: Tensor,
    *,
    timesteps: int | Sequence[int] | Tensor | None = None,
    decoder: str = "discrete",
    cond: dict[str, Any] | None = None,
    use_ema: bool = False,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """The terms of the bound (module docstring) per sample, in nats, float64.

    Args:
        model: the diffusion model.
        x: data, (bsz, *input_shape); in [-1, 1] for the discrete decoder.
        timesteps: None (all of 1..T), an int K (K roughly evenly spaced steps ending at T,
            stride T / K when K divides T), or explicit integer times in 1..T.
        decoder: "discrete" or "continuous".
        cond: keyword arguments of the network (tensors with leading dim bsz).
        use_ema: use the EMA weights.
        generator: source of the q(x_t | x_0) draws, on x's device.

    Returns:
        dict with ``prior`` (bsz,), ``kl`` (bsz, K - 1) ordered by decreasing time,
        ``decoder`` (bsz,) (the negative log-likelihood of x0), and ``times`` (K,) int64.

    Raises:
        ValueError: unknown decoder; data outside [-1, 1] with the discrete decoder; bad
            timesteps.
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    x = model.check_data(x)
    if decoder == "discrete" and (x.min() < -1 or x.max() > 1):
        raise ValueError(
            f"the discrete decoder models image data in [-1, 1] (256 levels), but x spans "
            f"[{x.min().item():.4g}, {x.max().item():.4g}]; rescale x to [-1, 1] or use "
            "decoder='continuous' for real-valued data"
        )
    bsz = x.shape[0]
    denoise = _denoiser(model, cond, use_ema, bsz)
    times = _times(model, timesteps)
    steps = _reverse_steps(model, times)
    x64 = x.double()

    a_T, s_T = steps.alpha[0].to(x.device), steps.sigma[0].to(x.device)
    prior = gaussian_kl(a_T * x64, (2 * torch.log(s_T)).expand_as(x64), 0 * x64, 0 * x64)
    kls: list[Tensor] = []
    dec = x64.new_zeros(bsz)
    for i in range(len(times)):
        x_t, mean_p, log_var = _reverse_step(model, denoise, steps, i, x, x64, generator)
        if i < len(times) - 1:
            cx0, cxt = steps.coef_x0[i].to(x.device), steps.coef_xt[i].to(x.device)
            mean_q = cx0 * x64 + cxt * x_t
            kl = gaussian_kl(mean_q, torch.log(steps.beta_tilde[i]).to(x.device), mean_p, log_var)
            kls.append(kl.reshape(bsz, -1).sum(1))
        else:
            dec = _decoder_nll(decoder, x64, mean_p, log_var)
    return {
        "prior": prior.reshape(bsz, -1).sum(1),
        "kl": torch.stack(kls, dim=1) if kls else x64.new_zeros(bsz, 0),
        "decoder": dec,
        "times": torch.tensor(times, dtype=torch.int64),
    }


def _denoiser(
    model: DiffusionModel, cond: dict[str, Any] | None, use_ema: bool, bsz: int
) -> Callable[..., Any]:
    """The model's denoiser with its (EMA) network and the checked conditioning."""
    network = model.network(use_ema)
    if cond is not None:
        cond = conditioning.check_cond(network, cond, bsz)
    return model.denoiser(cond=cond, network=network)


class _ReverseSteps(NamedTuple):
    """The times in sampling order (``desc``: s_K, ..., s_1, 0), float64: alpha and sigma
    (K + 1,), the network's time points (K,) and, per step s_i -> s_{i-1}, the posterior
    coefficients of x0 and x_t, beta_tilde, log beta and the clipped log beta_tilde (K,)."""

    alpha: Tensor
    sigma: Tensor
    points: Tensor
    coef_x0: Tensor
    coef_xt: Tensor
    beta_tilde: Tensor
    log_beta: Tensor
    log_bt: Tensor


def _reverse_steps(model: DiffusionModel, times: list[int]) -> _ReverseSteps:
    desc = torch.tensor([*times[::-1], 0], dtype=torch.float64)
    path = model.process.path_values(desc)  # float64 (K + 1,), sampling order
    points = model.process.points(desc[:-1])
    alpha, sigma = path.alpha, path.sigma
    coef_x0, coef_xt, beta, beta_tilde = gaussian_posterior(
        alpha[:-1], sigma[:-1], alpha[1:], sigma[1:]
    )
    log_beta, log_bt = torch.log(beta), clipped_log_beta_tilde(beta, beta_tilde)
    return _ReverseSteps(alpha, sigma, points, coef_x0, coef_xt, beta_tilde, log_beta, log_bt)


def _reverse_step(
    model: DiffusionModel,
    denoise: Callable[..., Any],
    steps: _ReverseSteps,
    i: int,
    x: Tensor,
    x64: Tensor,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One draw x_t ~ q(x_t | x_0) at the i-th time in sampling order and the model's
    reverse step from it: (x_t, its mean, its log variance), float64, shaped like x."""
    a_t, s_t = steps.alpha[i].to(x.device), steps.sigma[i].to(x.device)
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float64)
    x_t = a_t * x64 + s_t * eps
    pred = denoise(x_t.to(x.dtype), steps.points[i].to(x.device))
    cx0, cxt = steps.coef_x0[i].to(x.device), steps.coef_xt[i].to(x.device)
    mean_p = cx0 * pred.x0.double() + cxt * x_t
    var_out = None if pred.var_out is None else pred.var_out.double()
    log_var = model.variance.log_variance(
        steps.log_beta[i].to(x.device), steps.log_bt[i].to(x.device), var_out
    )
    log_var = torch.as_tensor(log_var, dtype=torch.float64, device=x.device).expand_as(x64)
    return x_t, mean_p, log_var


def _decoder_nll(decoder: str, x64: Tensor, mean_p: Tensor, log_var: Tensor) -> Tensor:
    """-log p(x_0 | x_{s_1}) per sample (bsz,), in nats, under the decoder."""
    bsz = x64.shape[0]
    if decoder == "discrete":
        return -discretized_gaussian_log_likelihood(x64, mean_p, log_var).reshape(bsz, -1).sum(1)
    nll = 0.5 * (math.log(2 * math.pi) + log_var + (x64 - mean_p) ** 2 * torch.exp(-log_var))
    return nll.reshape(bsz, -1).sum(1)


def nll_bound(
    model: DiffusionModel,
    x: Tensor,
    *,
    timesteps: int | Sequence[int] | Tensor | None = None,
    decoder: str = "discrete",
    cond: dict[str, Any] | None = None,
    use_ema: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Variational bound on -log p(x) in bits per dimension, float64 (bsz,).

    Args: as :func:`vlb_terms`. The bound is ``(prior + kl.sum(1) + decoder) / (D ln 2)``
    with D = prod(input_shape).
    """
    terms = vlb_terms(
        model,
        x,
        timesteps=timesteps,
        decoder=decoder,
        cond=cond,
        use_ema=use_ema,
        generator=generator,
    )
    total = terms["prior"] + terms["kl"].sum(1) + terms["decoder"]
    return total / (math.prod(model.input_shape) * math.log(2.0))


# -- the probability-flow ODE likelihood -------------------------------------------------------

DIVERGENCES = ("auto", "exact", "hutchinson")
"""The values of the `divergence` argument of [`ode_nll`][tinydiff.likelihood.ode_nll]: how the
divergence of the ODE's field is computed."""


def _divergence(field: Tensor, y: Tensor, method: str, probe: Tensor | None) -> Tensor:
    """div_y field(y), per sample (bsz,), float64: exact (one backward pass per dimension) or
    Hutchinson's estimate probe^T J probe (Hutchinson 1989; Grathwohl et al. 2019)."""
    flat = field.reshape(field.shape[0], -1)
    if method == "hutchinson":
        assert probe is not None
        (vjp,) = torch.autograd.grad(field, y, probe.view_as(field), retain_graph=False)
        return (vjp * probe).reshape(y.shape[0], -1).sum(1)
    total = y.new_zeros(y.shape[0])
    dim = flat.shape[1]
    for k in range(dim):
        (g,) = torch.autograd.grad(flat[:, k].sum(), y, retain_graph=k < dim - 1)
        total = total + g.reshape(y.shape[0], -1)[:, k]
    return total


def ode_nll(
    model: DiffusionModel,
    x: Tensor,
    *,
    num_steps: int = 64,
    divergence: str = "auto",
    cond: dict[str, Any] | None = None,
    use_ema: bool = False,
    generator: torch.Generator | None = None,
    noise_range: tuple[float, float] = (1e-3, 1e3),
) -> Tensor:
    r"""-log p(x) in bits per dimension under the probability-flow ODE, float64 (bsz,).

    The instantaneous change of variables (Chen et al. 2018; Song et al. 2021, sec. D.2),
    in Karras' variables :math:`y = x/\alpha`, :math:`u = \log(\sigma/\alpha) = -\lambda`,
    where the probability-flow ODE of any Gaussian path is :math:`dy/du = f = y - D(\alpha y, t(u))`
    (Karras et al. 2022, eq. 4):

    .. math::
        \log p_{u_0}(y(u_0)) = \log p_{u_1}(y(u_1)) + \int_{u_0}^{u_1}\nabla_y\cdot f\,du,
        \qquad \log p_x(x) = \log p_y(x/\alpha) - D\log\alpha.

    The ODE is integrated from the data (the clean end, at :math:`\hat\sigma = \sigma/\alpha`
    = max(``noise_range[0]``, the process's own at t = 0)) to the noisy end
    (min(``noise_range[1]``, its value at t = T)) with classical RK4, ``num_steps`` steps
    uniform in u, the divergence integrated alongside. The prior at the noisy end is the
    model's own, :math:`x_T \sim \mathcal N(0, (\alpha^2 + \sigma^2) I)`
    (:meth:`~tinydiff.process.GaussianProcess.prior_std`), i.e. :math:`y \sim \mathcal N(0,
    (1 + \hat\sigma^2) I)`. Truncating at :math:`\hat\sigma = 10^{-3}` and :math:`10^3`
    changes log p by O(1e-6) nats per dimension for data of unit scale.

    Args:
        model: the diffusion model (any process; its network through its denoiser).
        x: data, (bsz, *input_shape).
        num_steps: RK4 steps (4 denoiser calls each).
        divergence: ``"exact"`` (D backward passes per evaluation), ``"hutchinson"`` (one,
            with a Rademacher probe fixed along each trajectory: an unbiased estimate), or
            ``"auto"``: exact for D <= 16, else Hutchinson.
        cond: keyword arguments of the network.
        use_ema: use the EMA weights.
        generator: source of the Hutchinson probes, on x's device.
        noise_range: (smallest, largest) Karras noise level sigma / alpha integrated over.

    Returns:
        float64 (bsz,): -log p(x) / (D ln 2).

    Raises:
        ValueError: unknown divergence method, bad num_steps or noise_range.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    lo_noise, hi_noise = (float(v) for v in noise_range)
    if not 0 < lo_noise < hi_noise:
        raise ValueError(f"noise_range must be (lo, hi) with 0 < lo < hi, got {noise_range}")
    x = model.check_data(x)
    bsz, dim = x.shape[0], math.prod(model.input_shape)
    method = divergence if divergence != "auto" else ("exact" if dim <= 16 else "hutchinson")
    denoise = _denoiser(model, cond, use_ema, bsz)
    u1, du, points = _ode_grid(model.process, lo_noise, hi_noise, noise_range, num_steps)
    points = points.to(x.device)
    alphas, dtype = points[:, 1], x.dtype
    probe = _rademacher(x, generator) if method == "hutchinson" else None

    def f(y: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The field y - D(alpha y, t) at node k and its divergence (bsz,)."""
        with torch.enable_grad():
            y = y.detach().requires_grad_(True)
            field = y - denoise((alphas[k] * y).to(dtype), points[k]).x0.to(torch.float64)
            div = _divergence(field, y, method, probe)
        return field.detach(), div.detach()

    a_start = float(alphas[0])
    y, log_det = _rk4_with_divergence(f, x.to(torch.float64) / a_start, du, num_steps)
    var_end = 1 + math.exp(2 * u1)
    flat = y.reshape(bsz, -1)
    log_prior = -0.5 * (flat**2 / var_end + math.log(2 * math.pi * var_end)).sum(1)
    log_px = log_prior + log_det - dim * math.log(a_start)
    return -log_px / (dim * math.log(2.0))


def _ode_grid(
    process: GaussianProcess,
    lo_noise: float,
    hi_noise: float,
    noise_range: tuple[float, float],
    num_steps: int,
) -> tuple[float, float, Tensor]:
    """(u1, du, the process's points at the 2 num_steps + 1 nodes): the RK4 steps' ends and
    midpoints in u = log(sigma / alpha), uniform from u0 to u1, the ends of ``noise_range``
    (lo_noise, hi_noise) cut to the process's own range."""
    lam_T, lam_0 = process.lam_range()
    u0 = max(-lam_0, math.log(lo_noise))
    u1 = min(-lam_T, math.log(hi_noise))
    if not u0 < u1:
        raise ValueError(
            f"the process's noise range [{math.exp(-lam_0):.3g}, {math.exp(-lam_T):.3g}] does "
            f"not overlap noise_range {noise_range}"
        )
    du = (u1 - u0) / num_steps
    nodes = torch.tensor(
        [u0 + k * du / 2 for k in range(2 * num_steps + 1)], dtype=torch.float64
    ).clamp(u0, u1)  # step ends and midpoints (clamped: rounding at the ends)
    return u1, du, process.points(process.time_at_lam(-nodes))


def _rademacher(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """A probe of +-1 shaped like x, float64 (Hutchinson's estimator)."""
    probe = torch.randint(0, 2, x.shape, generator=generator, device=x.device)
    return (2 * probe - 1).to(torch.float64)


def _rk4_with_divergence(
    f: Callable[[Tensor, int], tuple[Tensor, Tensor]], y: Tensor, du: float, num_steps: int
) -> tuple[Tensor, Tensor]:
    """Classical RK4 on dy/du = f over ``num_steps`` steps of ``du`` (f at node 2i, 2i + 1 and
    2i + 2 in step i), and the integral of the divergence alongside: (y, log_det (bsz,))."""
    log_det = torch.zeros(y.shape[0], dtype=torch.float64, device=y.device)
    for i in range(num_steps):
        k = 2 * i
        f1, g1 = f(y, k)
        f2, g2 = f(y + 0.5 * du * f1, k + 1)
        f3, g3 = f(y + 0.5 * du * f2, k + 1)
        f4, g4 = f(y + du * f3, k + 2)
        y = y + du / 6 * (f1 + 2 * f2 + 2 * f3 + f4)
        log_det = log_det + du / 6 * (g1 + 2 * g2 + 2 * g3 + g4)
    return y, log_det


def vlb_applies(model: DiffusionModel) -> str | None:
    """None if the variational bound applies to the model's process, else the reason: it
    needs sigma(0) = 0 (the decoder sits at the data) and a prior N(0, I) at t = T."""
    process = model.process
    alpha0, sigma0 = process.alpha_sigma(torch.zeros((), dtype=torch.float64))
    if float(sigma0) != 0.0 or float(alpha0) != 1.0:
        return (
            f"sigma(0) = {float(sigma0):.3g} > 0 on {process!r}: the bound's decoder term needs "
            "the clean data at t = 0"
        )
    if abs(process.prior_std() - 1.0) > 1e-12:
        return (
            f"the prior of {process!r} has std {process.prior_std():.4g}, not 1: the bound's "
            "prior term is a KL to N(0, I)"
        )
    return None


@in_eval_mode
def nll(
    model: DiffusionModel,
    x: Tensor,
    *,
    method: str | None = None,
    timesteps: int | Sequence[int] | Tensor | None = None,
    decoder: str = "discrete",
    cond: dict[str, Any] | None = None,
    use_ema: bool = False,
    generator: torch.Generator | None = None,
    **ode_options: Any,
) -> Tensor:
    """Negative log-likelihood of x in bits per dimension, (bsz,) (``model.nll``).

    Args:
        model: the diffusion model.
        x: data, (bsz, *input_shape).
        method: ``"vlb"``, the variational bound (`nll_bound`; ``timesteps`` and
            ``decoder`` apply), or ``"ode"``, the probability-flow ODE likelihood (`ode_nll`;
            ``ode_options`` such as ``num_steps`` and ``divergence`` apply). Default:
            ``"vlb"`` for a discrete VP schedule, ``"ode"`` for a continuous path.
        timesteps: ``method="vlb"`` only, see `nll_bound`.
        decoder: ``method="vlb"`` only, ``"discrete"`` or ``"continuous"``.
        cond: keyword arguments of the network.
        use_ema: use the EMA weights.
        generator: source of the random draws (VLB noise, Hutchinson probes).
        **ode_options: options of `ode_nll`.

    Raises:
        ValueError: unknown method; ``"vlb"`` on a process where the bound does not apply
            (sigma(0) > 0 or a prior other than N(0, I), e.g. ``edm``).
        TypeError: ODE options with ``method="vlb"``.
    """
    if method is None:
        method = "vlb" if isinstance(model.process, DiscreteVP) else "ode"
    if method == "ode":
        return ode_nll(model, x, cond=cond, use_ema=use_ema, generator=generator, **ode_options)
    if method != "vlb":
        raise ValueError(f"nll method must be 'vlb' or 'ode', got {method!r}")
    if ode_options:
        raise TypeError(f"options {sorted(ode_options)} apply to method='ode' only")
    reason = vlb_applies(model)
    if reason is not None:
        raise ValueError(
            f"method='vlb' does not apply to this model: {reason}. Use method='ode' (the "
            "probability-flow ODE likelihood, valid on every process)."
        )
    return nll_bound(
        model,
        x,
        timesteps=timesteps,
        decoder=decoder,
        cond=cond,
        use_ema=use_ema,
        generator=generator,
    )
