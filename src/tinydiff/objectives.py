r"""Training objectives: what `model.loss(x)` computes, registered by name.

The config field `training_objective` (default `"diffusion"`) names one; its options go in
`training_objective_kwargs`. [`DiffusionModel.loss`][tinydiff.DiffusionModel.loss]
delegates to the objective's [`loss`][tinydiff.objectives.Objective.loss], and an objective
names the sampler the model uses by default
([`default_sampler`][tinydiff.objectives.Objective.default_sampler], filled into
`sampler_type` when the config leaves it out).

| name | the network learns | reference |
|---|---|---|
| `diffusion` | the configured target (eps, x0, v, velocity, EDM's F) | Ho et al. 2020 and on |
| `meanflow` | the average velocity $u(x_t, r, t)$ over $[r, t]$: a 1- or 2-step generator (sampler `flow_map`) | Geng et al. 2025 |
| `consistency` | the consistency function $f(x_t, t)$ (the x0 estimate) constant along the ODE: 1-2 step sampling (sampler `consistency`), tuned from a diffusion model (`consistency_tuning`) | Song et al. 2023; Geng et al. 2024 (ECT); Lu & Song 2024 (sCM) |

Register your own (a class; options are keyword arguments of `__init__`):

```python
@tinydiff.objectives.register("my_objective")
class MyObjective(tinydiff.objectives.Objective):
    def loss(self, model, x, **options):
        ...  # (bsz, *input_shape) unreduced losses
```

Third-party packages register from a module named under the `tinydiff.plugins` entry-point
group, as for every registry.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, cast

import torch
from torch import Tensor

import tinydiff._validation as _validation
from tinydiff import conditioning, losses, time_sampling, variances
from tinydiff._registry import Registry, class_check, instantiate
from tinydiff.denoiser import Denoiser, takes_end_time
from tinydiff.process import Point

if TYPE_CHECKING:
    from tinydiff.denoiser import ModelLike

    _Model = TypeVar("_Model", bound=ModelLike)

__all__ = [
    "CONSISTENCY_DISTANCES",
    "CONSISTENCY_FORMS",
    "DERIVATIVES",
    "REGISTRY",
    "Consistency",
    "Diffusion",
    "MeanFlow",
    "Objective",
    "build",
    "consistency_tuning",
    "get",
    "names",
    "register",
]

DERIVATIVES = ("auto", "jvp", "finite_difference")
"""How [`MeanFlow`][tinydiff.objectives.MeanFlow] and
[`Consistency`][tinydiff.objectives.Consistency] compute a total derivative in t."""
CONSISTENCY_FORMS = ("finite_difference", "tangent")
"""The two forms of [`Consistency`][tinydiff.objectives.Consistency]."""
CONSISTENCY_DISTANCES = ("l2", "pseudo_huber")
"""The distances of [`Consistency`][tinydiff.objectives.Consistency]'s finite-difference form."""

_F64 = torch.float64


class Objective:
    """Base class of training objectives. Options are keyword arguments of `__init__`.

    Subclasses implement `loss`; they may override `check_config` (refuse config
    combinations that cannot work, with the reason), `check_network` and
    `default_sampler`.
    """

    default_sampler: ClassVar[str | None] = None
    """The sampler a model trained with this objective samples with when its config names
    none (None: the config field's own default)."""

    uses_step: ClassVar[bool] = False
    """Whether `loss` takes the optimizer step count as `step=` (a schedule over training,
    e.g. [`Consistency`][tinydiff.objectives.Consistency]'s shrinking interval);
    `tinydiff.Trainer` passes it where this is True."""

    def check_config(self, config: Any) -> None:
        """Raise ValueError if `config` (a `tinydiff.DiffusionModelConfig`) cannot be
        trained with this objective; the default accepts any."""

    def check_network(self, network: Any) -> None:
        """Raise ValueError if `network` cannot be trained with this objective (called when
        the model is built); the default accepts any."""

    def loss(
        self,
        model: ModelLike,
        x: Tensor,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        cond: dict[str, Any] | None = None,
        cond_drop_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        check_finite: bool | None = None,
        **options: Any,
    ) -> Tensor:
        """Unreduced training loss, (bsz, *input_shape); `.mean()` is the objective.

        Args:
            model: the model (a `tinydiff.DiffusionModel`).
            x: clean data, (bsz, *input_shape).
            t, noise, cond, cond_drop_mask, generator, check_finite: as in
                `tinydiff.DiffusionModel.loss`.
            **options: the objective's own per-call options (raise TypeError on unknown ones).
        """
        raise NotImplementedError


def _no_options(name: str, options: dict[str, Any], accepted: str = "none") -> None:
    if options:
        raise TypeError(
            f"training objective {name!r} got unexpected loss options {sorted(options)}; "
            f"its own options: {accepted}"
        )


REGISTRY: Registry[type[Objective]] = Registry(
    "training objective",
    class_check(
        "a training objective must be a class with a loss(model, x, **options) method "
        "(subclass tinydiff.objectives.Objective)",
        methods=("loss",),
    ),
)
register = REGISTRY.register
get = REGISTRY.get
names = REGISTRY.names


def build(name: str, kwargs: dict[str, Any] | None = None) -> Objective:
    """Instantiate the registered objective `name` with its options.

    Raises:
        ValueError: an unknown name (with close matches) or a bad option value.
        TypeError: an unknown option (the message lists the accepted ones).
    """
    cls = get(name)
    return instantiate(cls, kwargs or {}, f"training_objective_kwargs for {name!r}")  # type: ignore[no-any-return]


def _common_inputs(
    model: ModelLike,
    x: Tensor,
    generator: torch.Generator | None,
    check_finite: bool | None,
    cond: dict[str, Any] | None,
) -> tuple[Tensor, torch.Generator | None, dict[str, Any] | None]:
    """x, the generator and cond checked as every objective checks them."""
    x = model.check_data(x)
    _validation.check_dtype_matches(x, _validation.dtype_device(model.nn_module)[0])
    _validation.check_finite("x", x, check_finite)
    generator = _validation.check_generator(generator)
    if cond is not None:
        cond = conditioning.check_cond(model.nn_module, cond, x.shape[0])
    return x, generator, cond


def _dropout(
    model: ModelLike,
    cond: dict[str, Any] | None,
    mask: Tensor | None,
    x: Tensor,
    generator: torch.Generator | None,
) -> dict[str, Any] | None:
    return conditioning.dropout(
        model.nn_module,
        cond,
        model.config.cond_drop_prob,
        mask,
        x.shape[0],
        generator=generator,
        device=x.device,
    )


def _total_derivative(
    owner: Any,
    name: str,
    fn: Callable[..., Tensor],
    primals: tuple[Tensor, ...],
    tangents: tuple[Tensor, ...],
) -> tuple[Tensor, Tensor]:
    r"""(fn(*primals), the derivative of fn along `tangents`): the total derivative of a
    training target in $s = t/T$ that [`MeanFlow`][tinydiff.objectives.MeanFlow] and
    [`Consistency`][tinydiff.objectives.Consistency] need.

    One forward-mode pass, `torch.func.jvp`, under the math scaled-dot-product-attention
    backend (fused attention kernels have no forward-mode rule). Where `jvp` fails (an
    operation without a forward-mode rule) and `owner.derivative` is `"auto"`, it warns
    once, sets `owner._jvp_failed` and from then on takes the central difference
    $(fn(p + h\,\dot p) - fn(p - h\,\dot p)) / 2h$ with `h = owner.fd_step` (two extra
    forward passes without gradients); `owner.derivative == "finite_difference"` always
    does, `"jvp"` raises instead.

    Args:
        owner: the objective (attributes `derivative`, `fd_step`, `_jvp_failed`).
        name: the objective's name, for messages.
        fn: a function of the primals returning a tensor.
        primals: the point (tensors).
        tangents: the direction, per unit s (the primals' shapes and dtypes).

    Returns:
        (value, derivative): the value carries gradients, the derivative is detached.
    """
    if owner.derivative != "finite_difference" and not owner._jvp_failed:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        try:
            with sdpa_kernel(SDPBackend.MATH):
                out = torch.func.jvp(fn, primals, tangents)
        except (RuntimeError, NotImplementedError) as err:
            if owner.derivative == "jvp":
                raise RuntimeError(
                    f"{name}: torch.func.jvp failed on this network "
                    f"({type(err).__name__}: {str(err)[:200]}); an operation has no "
                    "forward-mode rule. Use training_objective_kwargs={'derivative': "
                    "'finite_difference'} (or 'auto', which falls back by itself)"
                ) from err
            owner._jvp_failed = True
            warnings.warn(
                f"{name}: torch.func.jvp failed on this network ({type(err).__name__}: "
                f"{str(err)[:200]}); the total derivative is taken by central finite "
                f"differences from now on (two extra forward passes, step {owner.fd_step:g} "
                "in t/T). Set training_objective_kwargs={'derivative': 'finite_difference'} "
                "to silence this, or make the network forward-mode differentiable",
                RuntimeWarning,
                stacklevel=5,
            )
        else:
            return cast(Tensor, out[0]), cast(Tensor, out[1]).detach()
    value = fn(*primals)
    with torch.no_grad():
        h = owner.fd_step
        plus = fn(*(p + h * d for p, d in zip(primals, tangents, strict=True)))
        minus = fn(*(p - h * d for p, d in zip(primals, tangents, strict=True)))
    return value, (plus - minus) / (2 * h)


@register("diffusion", aliases=("denoising",))
class Diffusion(Objective):
    """The denoising objective (Ho et al. 2020 and its refinements): tinydiff's default.

    Draws t (`tinydiff.time_sampling`) and eps ~ N(0, I), forms x_t = alpha(t) x +
    sigma(t) eps, and compares the network output with the configured target, weighted by
    min-SNR-gamma where configured, plus the variance type's extra (VLB) term; with
    `cond_drop_prob` p each condition is dropped with probability p (Ho & Salimans 2022).
    """

    def loss(
        self,
        model: ModelLike,
        x: Tensor,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        cond: dict[str, Any] | None = None,
        cond_drop_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        check_finite: bool | None = None,
        **options: Any,
    ) -> Tensor:
        """See `tinydiff.DiffusionModel.loss` for the arguments."""
        _no_options("diffusion", options)
        x, generator, cond = _common_inputs(model, x, generator, check_finite, cond)
        bsz, T = x.shape[0], model.num_timesteps
        config = model.config
        if t is None:
            name, options = config.training_times()
            t = time_sampling.training_times(
                name, options, bsz, model.process, generator=generator, device=x.device
            )
        else:
            t = _validation.check_loss_times(t, T, bsz, x.device, allow_real=True)
        noise = _validation.check_noise(noise, x, generator, check_finite)
        p = Point.at(model.process, t, x, derivatives=model.target.uses_derivatives)
        x_t = p.alpha * x + p.sigma * noise
        cond = _dropout(model, cond, cond_drop_mask, x, generator)
        model_out, var_out = model.denoiser(cond=cond).forward_network(x_t, p)
        loss_fn = losses.get(config.loss_type)
        loss = loss_fn(model_out, model.target.target(x, noise, p), **config.loss_kwargs)
        if config.min_snr_gamma is not None:
            snr = model.process.snr(t.to(_F64)).view(p.alpha.shape)
            weight = losses.min_snr_weight(
                snr, config.min_snr_gamma, model.target.x0_error_scale(snr)
            )
            loss = loss * weight.to(x.dtype)
        extra = variances.vlb_extra_loss(
            model.variance, model.process, model.target, t, p, x, x_t, model_out, var_out
        )
        return loss if extra is None else loss + extra


def _check_end_times(r: Any, t: Tensor, owner: str, meaning: str, before_t: bool = False) -> Tensor:
    """The loss option r (bsz,) as float64 on t's device, in [0, t] (or [0, t) with
    `before_t`); the range is checked for CPU tensors (no host sync on accelerators).

    Raises:
        ValueError: not a float tensor of t's shape, or out of range (`meaning` says why).
    """
    if not isinstance(r, Tensor) or not r.is_floating_point() or r.shape != t.shape:
        got = f"shape {tuple(r.shape)}, {r.dtype}" if isinstance(r, Tensor) else type(r)
        raise ValueError(f"{owner} loss: r must be a float tensor of t's shape, got {got}")
    r = r.to(device=t.device, dtype=_F64)
    late = r >= t if before_t else r > t
    if r.device.type == "cpu" and bool(((r < 0) | late).any()):
        bound = "t)" if before_t else "t]"
        raise ValueError(f"{owner} loss: r must lie in [0, {bound} ({meaning})")
    return r


def _number(
    name: str, value: Any, low: float, high: float | None = None, owner: str = "meanflow"
) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not value >= low or (high is not None and not value <= high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{owner} {name} must be a number {bound}, got {value!r}")
    return float(value)


@register("meanflow", aliases=("mean_flow",))
class MeanFlow(Objective):
    r"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"): train a
    two-time network u(x_t, r, t) to be the average velocity of the probability-flow ODE
    over [r, t], so that one evaluation jumps from t to r (sampler `flow_map`).

    With $s = t/T$ (tinydiff's velocity unit: $u = dx/ds$), the average velocity
    $(s_t - s_r)\,u(x_t, r, t) = \int_{s_r}^{s_t} v(x_\tau, \tau)\,d\tau$, differentiated
    in $s_t$, gives the MeanFlow identity (their eq. 6)

    $$
    u(x_t, r, t) = v(x_t, t) - (s_t - s_r)\,\frac{d}{ds_t}u(x_t, r, t),\qquad
    \frac{d}{ds_t} = v\cdot\nabla_x + \partial_{s_t},
    $$

    which is regressed with the conditional velocity $v = \alpha'(s)\,x_0 +
    \sigma'(s)\,\epsilon$ of the path in place of the marginal one (their eq. 9-10, linear in
    v, so the minimiser is unchanged) and the right side held fixed (stop-gradient):

    $$
    \mathcal L = w\,\big\lVert u_\theta(x_t, r, t) - \mathrm{sg}\big(v - (s_t - s_r)
    (v\cdot\nabla_x u_\theta + \partial_{s_t}u_\theta)\big)\big\rVert^2,\qquad
    w = \mathrm{sg}\big(1/(\lVert\Delta\rVert^2 + c)^p\big).
    $$

    The total derivative is one forward-mode pass, `torch.func.jvp` with tangents
    (v, T, 0) on (x_t, t, r), under the math scaled-dot-product-attention backend (fused
    attention kernels have no forward-mode rule); where `jvp` fails (an operation without
    a forward-mode rule), `derivative="auto"` warns once and takes the central difference
    of u along the same direction, two extra forward passes without gradients.

    Any Gaussian path works (rectified flow, VP, ...): v is its velocity in s. The network
    must be a two-time network (`tinydiff.nn.MLP` / `UNet` with `end_time=True`, best
    with `time_scale=0.1`, see [`ConditionEmbedding`][tinydiff.nn.embeddings.ConditionEmbedding]) trained
    with `target_type="pred_velocity"`: its output at r = t is the instantaneous velocity,
    so every ODE sampler also runs it. Cost per step: about 1.5-3x a diffusion step (the
    jvp carries a tangent through the forward pass, and the backward pass is the same).

    Guidance folded into training (their sec. 4.2, eq. 13-16 and appendix B.1): with
    `guidance_scale` $\omega \ne 1$ the network learns the average velocity of the
    classifier-free-guided ODE, $v^{\mathrm{cfg}} = \omega' v(x_t, t \mid c) + (1 - \omega')
    v(x_t, t)$, $\omega' = \omega / (1 - \kappa)$. For the samples that keep their
    condition, v is replaced, in the jvp tangent and in the target alike, by

    $$
    \tilde v = \omega\,v + \kappa\,\mathrm{sg}\big(u_\theta(x_t, t, t \mid c)\big)
    + (1 - \omega - \kappa)\,\mathrm{sg}\big(u_\theta(x_t, t, t \mid \varnothing)\big),
    $$

    whose expectation given (x_t, c) is $v^{\mathrm{cfg}}$ at the minimiser; the samples
    whose condition was dropped (`cond_drop_prob`) keep v, so the null condition learns the
    unconditional model the formula needs. Cost: one extra forward pass without gradients
    per step (at r = t, with the null condition; with $\kappa \ne 0$ the conditional
    output in the same call, 2 bsz rows). The trained model samples the guided
    distribution with `cond` and no sampling-time guidance (`flow_map` refuses it on two-time
    networks). $\omega = 1$, $\kappa = 0$ is the plain objective, bitwise.

    Times (their sec. 4.3): t and r are two draws from the training-time distribution
    (`time_sampling`; without one, logit-normal with mean `time_mean` and std
    `time_std`), sorted so that r <= t; a fraction `1 - flow_map_fraction` of the batch
    then has r = t (the plain flow-matching loss).

    Args:
        flow_map_fraction: the fraction of samples with r < t (paper: 0.25).
        adaptive_p: p of the adaptive weight (paper: 1; 0 is the plain squared error).
        adaptive_c: c of the adaptive weight (paper: 1e-3).
        time_mean: mean of the logit-normal times (paper: -0.4).
        time_std: std of the logit-normal times (paper: 1.0).
        derivative: `"auto"` (jvp, falling back to finite differences with a warning),
            `"jvp"` or `"finite_difference"`.
        fd_step: the step h in s = t / T of the central difference (default 1e-4, i.e.
            t +- 0.1 at T = 1000: `tinydiff.nn`'s time embedding turns fastest at one
            radian per unit of t, so h T must stay well below 1).
        guidance_scale: $\omega$, the training-time classifier-free guidance scale
            (default 1: none; needs `cond_drop_prob > 0` and a `cond` in every loss call
            otherwise).
        guidance_mix: $\kappa$ in [0, 1): the share of the target's guidance term taken
            from the network's own conditional output (their appendix B.1); the effective
            scale is $\omega / (1 - \kappa)$ (default 0).
    """

    default_sampler = "flow_map"

    def __init__(
        self,
        flow_map_fraction: float = 0.25,
        adaptive_p: float = 1.0,
        adaptive_c: float = 1e-3,
        time_mean: float = -0.4,
        time_std: float = 1.0,
        derivative: str = "auto",
        fd_step: float = 1e-4,
        guidance_scale: float = 1.0,
        guidance_mix: float = 0.0,
    ) -> None:
        self.flow_map_fraction = _number("flow_map_fraction", flow_map_fraction, 0.0, 1.0)
        self.adaptive_p = _number("adaptive_p", adaptive_p, 0.0)
        self.adaptive_c = _number("adaptive_c", adaptive_c, 0.0)
        self.time_mean = _number("time_mean", time_mean, -1e3, 1e3)
        self.time_std = _number("time_std", time_std, 1e-6)
        self.fd_step = _number("fd_step", fd_step, 1e-12, 0.5)
        if derivative not in DERIVATIVES:
            raise ValueError(
                f"meanflow derivative must be one of {', '.join(map(repr, DERIVATIVES))}, "
                f"got {derivative!r}"
            )
        if self.adaptive_p > 0 and self.adaptive_c <= 0:
            raise ValueError("meanflow adaptive_c must be > 0 when adaptive_p > 0")
        self.derivative = derivative
        self.guidance_scale = _number("guidance_scale", guidance_scale, -1e3, 1e3)
        self.guidance_mix = _number("guidance_mix", guidance_mix, 0.0, 1.0)
        if self.guidance_mix >= 1:
            raise ValueError(
                "meanflow guidance_mix (kappa) must be < 1: the effective guidance scale is "
                "guidance_scale / (1 - guidance_mix)"
            )
        self._jvp_failed = False

    @property
    def guided(self) -> bool:
        """Whether training folds classifier-free guidance in (omega != 1 or kappa != 0)."""
        return self.guidance_scale != 1.0 or self.guidance_mix != 0.0

    @property
    def effective_guidance_scale(self) -> float:
        """omega / (1 - kappa): the guidance scale of the distribution the model samples."""
        return self.guidance_scale / (1.0 - self.guidance_mix)

    def check_config(self, config: Any) -> None:
        """MeanFlow regresses the network output on the velocity: `pred_velocity`, the
        `l2` loss, no learned variance, no min-SNR weighting."""
        if config.target_type != "pred_velocity":
            raise ValueError(
                f"training_objective='meanflow' trains the network to output the average "
                f"velocity u(x_t, r, t), got target_type={config.target_type!r}: set "
                "target_type='pred_velocity' (e.g. with noise_schedule_type='rectified_flow')"
            )
        if variances.get(config.variance_type).extra_loss is not variances.Variance.extra_loss:
            raise ValueError(
                f"training_objective='meanflow' has no variational-bound term: "
                f"variance_type={config.variance_type!r} needs one; use 'upper_bound' or "
                "'lower_bound'"
            )
        if config.min_snr_gamma is not None:
            raise ValueError(
                "training_objective='meanflow' weights its loss adaptively (adaptive_p, "
                "adaptive_c in training_objective_kwargs); drop min_snr_gamma"
            )
        if config.loss_type != "l2":
            raise ValueError(
                f"training_objective='meanflow' uses the squared error (its adaptive weight with "
                f"adaptive_p=0.5 is a robust loss), got loss_type={config.loss_type!r}: "
                "use loss_type='l2'"
            )
        if self.guided and not config.cond_drop_prob > 0:
            raise ValueError(
                f"training_objective='meanflow' with guidance_scale={self.guidance_scale:g} "
                f"(guidance_mix={self.guidance_mix:g}) needs the unconditional model, learnt "
                "from the samples whose condition is dropped: set cond_drop_prob > 0 (the "
                "paper uses 0.1), or guidance_scale=1 for an unguided model"
            )

    def check_network(self, network: Any) -> None:
        """The network must take the end time r (`tinydiff.denoiser.takes_end_time`)."""
        if not takes_end_time(network):
            raise ValueError(
                f"training_objective='meanflow' needs a two-time network called as "
                f"network(x_t, t, r=r); {type(network).__name__} takes no end time r. Build it "
                "with end_time=True (tinydiff.nn.MLP(..., end_time=True), "
                "tinydiff.nn.UNet(..., end_time=True)) or give your network's forward an r "
                "argument (r <= t, on the same [0, T] scale)"
            )

    # -- times -----------------------------------------------------------------------------------
    def sample_times(
        self,
        model: ModelLike,
        bsz: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> tuple[Tensor, Tensor]:
        """(t, r), float64 (bsz,) each, r <= t, r = t on a fraction `1 - flow_map_fraction`."""
        config = model.config
        if config.time_sampling is None:
            name, options = "logit_normal", {"m": self.time_mean, "s": self.time_std}
        else:
            name, options = config.training_times()

        def draw() -> Tensor:
            return time_sampling.sample_times(
                name, bsz, model.process, options, generator=generator, device=device
            ).to(_F64)

        a, b = draw(), draw()
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        jump = torch.rand(bsz, generator=generator, device=device, dtype=_F64)
        return t, torch.where(jump < self.flow_map_fraction, r, t)

    # -- the regression pair ---------------------------------------------------------------------
    def regression_pair(
        self, denoiser: Denoiser, x_t: Tensor, p: Point, r: Tensor, v: Tensor, num_timesteps: int
    ) -> tuple[Tensor, Tensor]:
        r"""(u_theta(x_t, r, t), the stop-gradient target $v - (s_t - s_r)\,du/ds_t$).

        Args:
            denoiser: the model's denoiser (network and condition).
            x_t: (bsz, *input_shape).
            p: the process point at t (with derivatives), t (bsz,) in network time.
            r: end times (bsz,), float64, r <= t.
            v: the conditional velocity dx_t/ds, x_t's shape.
            num_timesteps: T.

        Returns:
            (u, target), each x_t's shape; u carries gradients, the target none.
        """
        T = num_timesteps
        r_in = r.to(p.t.dtype)

        def u_of(z: Tensor, t: Tensor) -> Tensor:
            return denoiser.forward_network(z, p._replace(t=t), r=r_in)[0]

        tangent_t = torch.full_like(p.t, float(T))  # dt/ds = T
        u, dudt = _total_derivative(self, "meanflow", u_of, (x_t, p.t), (v, tangent_t))
        return u, self._target(v, dudt, p, r, T)

    @staticmethod
    def _target(v: Tensor, dudt: Tensor, p: Point, r: Tensor, num_timesteps: int) -> Tensor:
        view = (-1,) + (1,) * (v.dim() - 1)
        interval = ((p.t.to(_F64) - r) / num_timesteps).to(v.dtype).view(view)  # s_t - s_r
        return (v - interval * dudt).detach()

    def loss(
        self,
        model: ModelLike,
        x: Tensor,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        cond: dict[str, Any] | None = None,
        cond_drop_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        check_finite: bool | None = None,
        r: Tensor | None = None,
        **options: Any,
    ) -> Tensor:
        """Unreduced MeanFlow loss, (bsz, *input_shape): the per-element squared error times
        the per-sample adaptive weight.

        Args: as `tinydiff.DiffusionModel.loss`, plus `r`: end times (bsz,) in [0, t]
        (with `t`; default r = t). Without `t` both are drawn (`sample_times`).
        """
        _no_options("meanflow", options, "r")
        x, generator, cond = _common_inputs(model, x, generator, check_finite, cond)
        bsz, T = x.shape[0], model.num_timesteps
        if t is None:
            if r is not None:
                raise ValueError("meanflow loss: r was given without t; give both or neither")
            t, r = self.sample_times(model, bsz, generator=generator, device=x.device)
        else:
            t = _validation.check_loss_times(t, T, bsz, x.device, allow_real=True).to(_F64)
            r = t if r is None else _check_end_times(r, t, "meanflow", "the end time of the jump")
        noise = _validation.check_noise(noise, x, generator, check_finite)
        p = Point.at(model.process, t, x, derivatives=True)
        x_t = p.alpha * x + p.sigma * noise
        v = p.d_alpha * x + p.d_sigma * noise
        if self.guided:
            cond, v = self._guided_velocity(model, x_t, p, v, cond, cond_drop_mask, generator)
        else:
            cond = _dropout(model, cond, cond_drop_mask, x, generator)
        u, target = self.regression_pair(model.denoiser(cond=cond), x_t, p, r, v, T)
        err = (u - target) ** 2
        if self.adaptive_p == 0:
            return err
        per_sample = err.detach().flatten(1).sum(1)
        weight = (per_sample + self.adaptive_c).pow(-self.adaptive_p)
        return err * weight.view((-1,) + (1,) * (x.dim() - 1))

    def _guided_velocity(
        self,
        model: ModelLike,
        x_t: Tensor,
        p: Point,
        v: Tensor,
        cond: dict[str, Any] | None,
        cond_drop_mask: Tensor | None,
        generator: torch.Generator | None,
    ) -> tuple[dict[str, Any], Tensor]:
        """(the condition after dropout, the guided field v~): v~ = omega v + kappa
        sg(u(x_t, t, t | c)) + (1 - omega - kappa) sg(u(x_t, t, t | null)) where the
        condition is kept, v where it is dropped (class docstring)."""
        if cond is None:
            raise ValueError(
                f"meanflow with guidance_scale={self.guidance_scale:g} trains a guided "
                "conditional model: pass the condition to loss (cond={...}; the Trainer's "
                "cond=...)"
            )
        bsz = x_t.shape[0]
        if cond_drop_mask is None:  # the draw conditioning.dropout would make
            prob = model.config.cond_drop_prob
            cond_drop_mask = torch.rand(bsz, generator=generator, device=x_t.device) < prob
        kept = cond
        cond = cast(dict[str, Any], _dropout(model, cond, cond_drop_mask, x_t, generator))
        null = conditioning.null_cond(model.nn_module, kept)
        both = self.guidance_mix != 0.0
        with torch.no_grad():
            if both:  # conditional and unconditional outputs in one call of 2 bsz rows
                rows = conditioning.concat_cond(kept, null)
                p2 = Point(*(torch.cat([f, f]) for f in p))
                out = model.denoiser(cond=rows).forward_network(torch.cat([x_t, x_t]), p2, r=p2.t)
                u_cond, u_null = out[0].chunk(2)
            else:
                u_null = model.denoiser(cond=null).forward_network(x_t, p, r=p.t)[0]
        omega, kappa = self.guidance_scale, self.guidance_mix
        guided = omega * v + (1.0 - omega - kappa) * u_null
        if both:
            guided = guided + kappa * u_cond
        drop = cond_drop_mask.to(v.device).view((-1,) + (1,) * (v.dim() - 1))
        return cond, torch.where(drop, v, guided.to(v.dtype)).detach()


# -- consistency ------------------------------------------------------------------------------------
#: probes of the boundary check: f(x, 0) must be x up to this fraction of the network output
_BOUNDARY_TOLERANCE = 0.05
#: the step in s of the one-sided difference of the path's slopes (second derivatives)
_SLOPE_STEP = 1e-6


def _path_tangents(process: Any, t: Tensor, second: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(alpha', sigma', alpha'', sigma'') in s = t/T at float64 times t: the first from the
    process (one-sided at a table's integers), the second (only with `second`, else zeros)
    by a one-sided difference of the first, step `_SLOPE_STEP` in s (forward, backward at
    t = T)."""
    d_alpha, d_sigma = process.derivatives(t)
    if not second:
        zero = torch.zeros_like(d_alpha)
        return d_alpha, d_sigma, zero, zero
    T = process.num_timesteps
    up = t + _SLOPE_STEP * T <= T
    h = torch.where(up, _SLOPE_STEP, -_SLOPE_STEP).to(_F64)
    d_alpha_h, d_sigma_h = process.derivatives(t + h * T)
    return d_alpha, d_sigma, (d_alpha_h - d_alpha) / h, (d_sigma_h - d_sigma) / h


def _boundary_gap(config: Any) -> float:
    """How far the configured target's x0 estimate at t = 0 is from the identity f(x, 0) = x:
    the largest deviation over two probes (x = 1, output 0; x = 0, output 1), NaN where the
    target is undefined there."""
    from tinydiff import targets

    process = config.process()
    target = targets.build(config.target_type, config.target_kwargs)
    x = torch.tensor([[1.0], [0.0]], dtype=_F64)
    out = torch.tensor([[0.0], [1.0]], dtype=_F64)
    t = torch.full((2,), 1e-6 * process.num_timesteps, dtype=_F64)
    p = Point.of(process.points(t), x)
    x0 = target.to_x0_eps(out, x, p)[0]
    return float((x0 - x).abs().max())


@register("consistency", aliases=("ect", "consistency_training"))
class Consistency(Objective):
    r"""Continuous-time consistency training and tuning (Song et al. 2023, "Consistency
    Models"; Geng et al. 2024, "Consistency Models Made Easy" (ECT); Lu & Song 2024,
    "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models" (sCM)).

    The consistency function is the model's x0 estimate,
    $f_\theta(x_t, t) = \hat x_0$ of [`Denoiser`][tinydiff.denoiser.Denoiser] (its target
    turns the network output into it), and training makes it constant along the
    probability-flow ODE, so that $f_\theta(x_t, t)$ is the ODE's end point at t = 0: one
    evaluation from noise is a sample (sampler `consistency`). The boundary
    $f(x, 0) = x$ is built into every target but `pred_x_0` (refused): for eps, v,
    velocity and EDM targets the x0 estimate at sigma = 0 is x_t whatever the network
    outputs (up to EDM's sigma_min on the `edm` path).

    Times in $s = t/T$. Along the conditional path $x_t = \alpha_t x + \sigma_t\epsilon$,
    with velocity $v = \alpha'(s)\,x + \sigma'(s)\,\epsilon$:

    * `form="finite_difference"` (ECT): an earlier time r < t on the same path with the
      same noise, $x_r = \alpha_r x + \sigma_r\epsilon$, and

        $$
        \mathcal L = w\,d\big(f_\theta(x_t, t),\ \mathrm{sg}\,f_\theta(x_r, r)\big),\qquad
        w = \frac{1}{s_t - s_r},
        $$

      with $f(x_r, 0) = x_r$ at r = 0. The interval shrinks over training (ECT's
      schedule): $(s_t - s_r)/s_t = \min\big(1, \max(\rho_{min}, n(t)/q^{k+1})\big)$,
      $k = \lfloor \mathrm{step} / \mathrm{stage\_steps}\rfloor$,
      $n(t) = 1 + k_n\,\mathrm{sigmoid}(-b\,\sigma_t/\alpha_t)$ (larger intervals at low
      noise; $\sigma/\alpha$ is EDM's sigma on the `edm` path, where this is ECT's
      $n(t)$). Stage -1 would be r = 0 everywhere: the x0-regression loss weighted by
      $1/s_t$, i.e. the diffusion pretraining that tuning starts from. Distance d:
      `"l2"` (per element, $w\,(f_t - f_r)^2$) or `"pseudo_huber"`
      ($w(\sqrt{\lVert f_t - f_r\rVert^2 + c^2} - c)$ per sample, spread evenly over its
      elements; Song & Dhariwal 2023).
    * `form="tangent"` (the limit r -> t; Song et al. 2023, sec. 6; sCM): with the total
      derivative $g = df_\theta/ds = \partial_s f_\theta + (\nabla_x f_\theta)\,v$ (one
      forward-mode pass),

        $$
        \mathcal L = \big\lVert f_\theta - \mathrm{sg}(f_\theta - g)\big\rVert^2,\qquad
        \nabla_\theta\mathcal L = 2\,(\nabla_\theta f_\theta)^\top g,
        $$

      the limit of the l2 finite-difference gradient as $s_t - s_r \to 0$ (error
      $O(s_t - s_r)$). Its value, $\lVert g\rVert^2$, measures how far f is from constant
      along the paths. `tangent_normalization=c` uses $g/(\lVert g\rVert + c)$ per sample
      instead (sCM, c = 0.1), a robust variant that changes the minimiser's weighting.

    Both have mean gradient zero at the exact flow map to t = 0: conditioned on x_t,
    $E[v \mid x_t]$ is the ODE's velocity, along which the flow map is constant (the
    conditional velocity may replace the marginal one because the gradient is linear in it).

    Cost per step: the finite-difference form is a diffusion step plus one forward pass
    without gradients; the tangent form carries a tangent through the forward pass (about
    1.5-3x a diffusion step), under the math attention backend, and falls back to finite
    differences where `torch.func.jvp` fails (`derivative="auto"`, as in
    [`MeanFlow`][tinydiff.objectives.MeanFlow]).

    Times t follow the config's training-time distribution (`time_sampling`). The
    finite-difference schedule needs the optimizer step: `loss(..., step=n)`;
    `tinydiff.Trainer` passes it (`uses_step`); without `step` the objective counts its
    own `loss` calls (`calls`), which a checkpoint does not restore.

    Args:
        form: `"finite_difference"` (ECT, default) or `"tangent"`.
        distance: `"l2"` (default) or `"pseudo_huber"` (finite-difference form only).
        huber_c: c of the pseudo-Huber distance (default $0.00054\sqrt{D}$, D the number
            of elements of a sample; Song & Dhariwal 2023).
        q: the interval shrinks by this factor each stage (ECT: 2).
        stage_steps: optimizer steps per stage (default 200: sized for tuning runs of a few
            hundred to a few thousand steps; ECT uses many thousands on images).
        k: $k_n$ of n(t) (ECT: 8).
        b: b of n(t) (ECT: 1).
        min_ratio: the smallest $(s_t - s_r)/s_t$ (default 1e-3: below it the difference of
            two float32 network outputs is mostly rounding).
        tangent_normalization: sCM's c (tangent form only); None (default) leaves g as is.
        derivative: `"auto"`, `"jvp"` or `"finite_difference"` (tangent form).
        fd_step: the central difference's step in s where jvp is not used (tangent form).
    """

    default_sampler = "consistency"
    uses_step = True

    def __init__(
        self,
        form: str = "finite_difference",
        distance: str = "l2",
        huber_c: float | None = None,
        q: float = 2.0,
        stage_steps: int = 200,
        k: float = 8.0,
        b: float = 1.0,
        min_ratio: float = 1e-3,
        tangent_normalization: float | None = None,
        derivative: str = "auto",
        fd_step: float = 1e-4,
    ) -> None:
        for name, value, choices in (
            ("form", form, CONSISTENCY_FORMS),
            ("distance", distance, CONSISTENCY_DISTANCES),
            ("derivative", derivative, DERIVATIVES),
        ):
            if value not in choices:
                raise ValueError(
                    f"consistency {name} must be one of {', '.join(map(repr, choices))}, "
                    f"got {value!r}"
                )
        if form == "tangent" and distance != "l2":
            raise ValueError(
                "consistency distance='pseudo_huber' applies to form='finite_difference': in "
                "the tangent limit it only rescales the l2 gradient by 1/(2c). For a robust "
                "tangent form use tangent_normalization (sCM: 0.1)"
            )
        if form == "finite_difference" and tangent_normalization is not None:
            raise ValueError(
                "consistency tangent_normalization applies to form='tangent'; the "
                "finite-difference form's robust variant is distance='pseudo_huber'"
            )
        num = "consistency"
        self.huber_c = None if huber_c is None else _number("huber_c", huber_c, 1e-12, None, num)
        self.q = _number("q", q, 1.0 + 1e-9, None, num)
        if isinstance(stage_steps, bool) or not isinstance(stage_steps, int) or stage_steps < 1:
            raise ValueError(f"consistency stage_steps must be an int >= 1, got {stage_steps!r}")
        self.stage_steps = stage_steps
        self.k = _number("k", k, 0.0, None, num)
        self.b = _number("b", b, 0.0, None, num)
        self.min_ratio = _number("min_ratio", min_ratio, 1e-12, 1.0, num)
        self.tangent_normalization = (
            None
            if tangent_normalization is None
            else _number("tangent_normalization", tangent_normalization, 1e-12, None, num)
        )
        self.fd_step = _number("fd_step", fd_step, 1e-12, 0.5, num)
        self.form, self.distance, self.derivative = form, distance, derivative
        self.calls = 0
        self._jvp_failed = False

    def check_config(self, config: Any) -> None:
        """The target must carry the boundary f(x, 0) = x; the loss is the objective's own
        (`loss_type='l2'`, no min-SNR weighting)."""
        gap = _boundary_gap(config)
        if not gap <= _BOUNDARY_TOLERANCE:
            raise ValueError(
                f"training_objective='consistency' takes the model's x0 estimate as the "
                f"consistency function f(x_t, t) and needs its boundary f(x, 0) = x built into "
                f"the target, but target_type={config.target_type!r} on "
                f"noise_schedule_type={config.noise_schedule_type!r} gives an x0 estimate at "
                f"t = 0 that is off by {gap:.3g} per unit of network output (pred_x_0 returns "
                "the output itself). Use target_type='pred_v', 'pred_eps', 'pred_velocity' "
                "or 'edm'"
            )
        if config.min_snr_gamma is not None:
            raise ValueError(
                "training_objective='consistency' weights its loss by 1/(s_t - s_r) (ECT); "
                "drop min_snr_gamma"
            )
        if config.loss_type != "l2":
            raise ValueError(
                f"training_objective='consistency' has its own distance, got "
                f"loss_type={config.loss_type!r}: use loss_type='l2' and "
                "training_objective_kwargs={'distance': 'pseudo_huber'} for a robust loss"
            )

    # -- times -----------------------------------------------------------------------------------
    def sample_times(
        self,
        model: ModelLike,
        bsz: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """t, float64 (bsz,), from the config's training-time distribution."""
        name, options = model.config.training_times()
        return time_sampling.training_times(
            name, options, bsz, model.process, generator=generator, device=device
        ).to(_F64)

    def interval_ratio(self, model: ModelLike, t: Tensor, step: int) -> Tensor:
        r"""ECT's $(s_t - s_r)/s_t$ at float64 times t (bsz,) and optimizer step `step`:
        $\min(1, \max(\rho_{min}, n(t)/q^{k+1}))$, $k = \lfloor step/stage\_steps\rfloor$."""
        alpha, sigma = model.process.alpha_sigma(t)
        nsr = (sigma / alpha).clamp(max=1e300)  # inf at alpha = 0: finite, so that b = 0 works
        n = 1 + self.k * torch.sigmoid(-self.b * nsr)
        decay = self.q ** -float(step // self.stage_steps + 1)  # underflows to 0, never inf
        return (n * decay).clamp(min=self.min_ratio, max=1.0)

    # -- the loss ----------------------------------------------------------------------------------
    @staticmethod
    def _f(denoiser: Denoiser) -> Callable[..., Tensor]:
        """f(x, t, alpha, sigma, d_alpha, d_sigma): the x0 estimate as a function of x and of
        every time-dependent input (so that a jvp sees all of them)."""
        target = denoiser.target

        def f_of(z: Tensor, *point: Tensor) -> Tensor:
            q = Point(*point)
            return target.to_x0_eps(denoiser.forward_network(z, q)[0], z, q)[0]

        return f_of

    def tangent(
        self, denoiser: Denoiser, x_t: Tensor, p: Point, v: Tensor, process: Any
    ) -> tuple[Tensor, Tensor]:
        r"""(f_theta(x_t, t), its total derivative $df/ds = \partial_s f + (\nabla_x f) v$),
        the derivative detached.

        Args:
            denoiser: the model's denoiser (network, target and condition).
            x_t: (bsz, *input_shape).
            p: the process point at t (with derivatives), fields (bsz, 1, ..., 1).
            v: the direction dx/ds, x_t's shape (the conditional velocity in training).
            process: the model's process (for the second derivatives of velocity targets).
        """
        t64 = p.t.to(_F64)
        second = bool(getattr(denoiser.target, "uses_derivatives", False))
        tangents = _path_tangents(process, t64, second)
        like = p.alpha
        coefs = tuple(d.to(like.dtype).reshape(like.shape) for d in tangents)
        tangent_t = torch.full_like(p.t, float(process.num_timesteps))  # dt/ds = T
        return _total_derivative(
            self, "consistency", self._f(denoiser), (x_t, *p), (v, tangent_t, *coefs)
        )

    def loss(
        self,
        model: ModelLike,
        x: Tensor,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        cond: dict[str, Any] | None = None,
        cond_drop_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        check_finite: bool | None = None,
        r: Tensor | None = None,
        step: int | None = None,
        **options: Any,
    ) -> Tensor:
        """Unreduced consistency loss, (bsz, *input_shape).

        Args: as `tinydiff.DiffusionModel.loss`, plus
            r: end times (bsz,) in [0, t) (with `t`; finite-difference form only) instead
                of ECT's schedule.
            step: the optimizer step (0-based) that places ECT's schedule; default: the
                number of earlier calls (`calls`).
        """
        _no_options("consistency", options, "r, step")
        x, generator, cond = _common_inputs(model, x, generator, check_finite, cond)
        if step is None:
            step = self.calls
        elif isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"consistency loss: step must be an int >= 0, got {step!r}")
        self.calls += 1
        bsz, T = x.shape[0], model.num_timesteps
        if t is None:
            if r is not None:
                raise ValueError("consistency loss: r was given without t; give both or neither")
            t = self.sample_times(model, bsz, generator=generator, device=x.device)
        else:
            t = _validation.check_loss_times(t, T, bsz, x.device, allow_real=True).to(_F64)
        if r is not None and self.form == "tangent":
            raise ValueError(
                "consistency loss: r applies to form='finite_difference'; the tangent form "
                "is the limit r -> t"
            )
        noise = _validation.check_noise(noise, x, generator, check_finite)
        cond = _dropout(model, cond, cond_drop_mask, x, generator)
        denoiser = model.denoiser(cond=cond)
        if self.form == "tangent":
            p = Point.at(model.process, t, x, derivatives=True)
            x_t = p.alpha * x + p.sigma * noise
            v = p.d_alpha * x + p.d_sigma * noise
            f, g = self.tangent(denoiser, x_t, p, v, model.process)
            if self.tangent_normalization is not None:
                norm = g.flatten(1).norm(dim=1).view((-1,) + (1,) * (x.dim() - 1))
                g = g / (norm + self.tangent_normalization)
            return (f - (f.detach() - g)) ** 2
        if r is None:
            r = t * (1 - self.interval_ratio(model, t, step))
        else:
            r = _check_end_times(
                r,
                t,
                "consistency",
                "the earlier time of the pair; the weight 1/(s_t - s_r) is infinite at r = t",
                before_t=True,
            )
        uses = bool(getattr(model.target, "uses_derivatives", False))
        p_t = Point.at(model.process, t, x, derivatives=uses)
        p_r = Point.at(model.process, r, x, derivatives=uses)
        f_of = self._f(denoiser)
        f_t = f_of(p_t.alpha * x + p_t.sigma * noise, *p_t)
        with torch.no_grad():
            x_r = p_r.alpha * x + p_r.sigma * noise
            at_zero = (r == 0).view(p_r.alpha.shape)
            f_r = torch.where(at_zero, x_r, f_of(x_r, *p_r))  # the boundary f(x, 0) = x
        view = (-1,) + (1,) * (x.dim() - 1)
        weight = (T / (t - r)).to(x.dtype).view(view)  # 1 / (s_t - s_r)
        diff = f_t - f_r
        if self.distance == "l2":
            return weight * diff**2
        numel = diff[0].numel()
        c = self.huber_c if self.huber_c is not None else 0.00054 * numel**0.5
        per_sample = (diff.flatten(1).pow(2).sum(1) + c * c).sqrt() - c
        return (weight * (per_sample / numel).view(view)).expand_as(x)


def consistency_tuning(model: _Model, *, use_ema: bool = False, **objective_kwargs: Any) -> _Model:
    """A few-step model tuned from a trained diffusion model (Geng et al. 2024, ECT): a new
    model of `model`'s class with a deep copy of its network (the EMA copy with `use_ema`)
    and `training_objective="consistency"` (options `objective_kwargs`, see
    [`Consistency`][tinydiff.objectives.Consistency]), sampler `consistency`.

    The copy's config keeps the process, target and data fields and drops what belongs to
    the diffusion loss (`loss_type` becomes `"l2"`, `loss_kwargs` and `min_snr_gamma` are
    cleared). Train it like any model (its `loss`, or `tinydiff.Trainer`, which passes the
    step ECT's schedule needs); `model` itself is untouched. The new model has no EMA
    (enable it with `enable_ema`).

    ```python
    tuned = tinydiff.objectives.consistency_tuning(model)
    tinydiff.Trainer(tuned, data, lr=1e-4).fit(2000)
    x = tuned.sample(64, 1)  # one network call
    ```

    Raises:
        ValueError: the model's target cannot carry the consistency boundary (`pred_x_0`),
            or bad options.
    """
    network = copy.deepcopy(model.network(use_ema))
    if use_ema:  # the EMA copy is frozen: train its copy with the live network's flags
        live = model.nn_module
        for mine, theirs in zip(network.parameters(), live.parameters(), strict=True):
            mine.requires_grad_(theirs.requires_grad)
        network.train(live.training)
    fields = model.config.model_dump()
    fields.update(
        training_objective="consistency",
        training_objective_kwargs=dict(objective_kwargs),
        sampler_type="consistency",
        sampler_kwargs={},
        loss_type="l2",
        loss_kwargs={},
        min_snr_gamma=None,
    )
    return cast("_Model", type(model)(network, fields))  # type: ignore[call-arg]
