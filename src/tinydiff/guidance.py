r"""Guidance strategies: how conditional and unconditional predictions become one.

A strategy is a small immutable object (its options) registered by name. The denoiser
(`tinydiff.denoiser.Denoiser`) calls the network, turns each output into an
$(\hat x_0, \hat\epsilon)$ pair with the model's target, and hands the pairs to the strategy,
which returns the guided pair. Per-run state (a momentum buffer, a step count) is not kept on
the strategy: it is a tuple of tensors that the sampling loop carries from step to step
(`Guidance.init_state`), so one strategy object serves any number of runs, eager or
compiled, and the compiled step stays a pure function.

Every strategy returns an $(\hat x_0, \hat\epsilon)$ pair. The affine ones (`cfg`,
`autoguidance`) combine the pairs directly: for the affine targets (eps, x0, v, velocity) an
affine combination of the pairs equals the same combination of the raw network outputs, which
is what diffusers' guiders combine. The nonlinear ones (`apg`, `cfg_zero_star`) act on one
prediction of the sample, chosen by their ``space`` option (``"x0"``, ``"eps"``, ``"v"`` or
``"velocity"``: `tinydiff.targets`' conversions), and turn the guided prediction back into a
consistent pair with $x_t$; diffusers' guiders act on the raw network output, so the two
agree where ``space`` names the model's prediction type. `cfg_pp` returns a deliberately
inconsistent pair (guided $\hat x_0$, unconditional $\hat\epsilon$).

Any method can be restricted to a range of noise levels (Kynkäänniemi et al. 2024) with the
option ``interval=(sigma_lo, sigma_hi)`` (`GuidanceInterval`).

| name | method | options (besides ``scale``) | space |
|---|---|---|---|
| ``cfg`` | Ho & Salimans 2022, rescale: Lin et al. 2024 | ``rescale`` | (x0, eps) pair |
| ``cfg_pp`` | CFG++, Chung et al. 2024 | | x0 guided, eps unconditional |
| ``apg`` | Sadat et al. 2024 | ``eta``, ``norm_threshold``, ``momentum``, ``space`` | ``space`` (x0) |
| ``cfg_zero_star`` | Fan et al. 2025 | ``zero_init_steps``, ``space`` | ``space`` (velocity) |
| ``autoguidance`` | Karras et al. 2024 | ``guide`` (the weaker network) | (x0, eps) pair |

Register your own:

```python
@tinydiff.guidance.register("my_guidance")
class MyGuidance(tinydiff.guidance.Guidance):
    def __init__(self, scale: float = 3.0) -> None:
        self.scale = scale

    def combine(self, x, p, cond, uncond, state, step):
        x0 = uncond.x0 + self.scale * (cond.x0 - uncond.x0)
        eps = uncond.eps + self.scale * (cond.eps - uncond.eps)
        return x0, eps, state
```

and sample with `model.sample(..., cond=c, guidance="my_guidance",
guidance_kwargs={"scale": 2.0})`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from tinydiff._registry import Registry, class_check, instantiate
from tinydiff._validation import check_number
from tinydiff.conditioning import apply_guidance
from tinydiff.process import Point
from tinydiff.targets import PredEps, Prediction, PredV, PredVelocity, PredX0, Target

__all__ = [
    "APG",
    "CFG",
    "REGISTRY",
    "SPACES",
    "AutoGuidance",
    "CFGPlusPlus",
    "CFGZeroStar",
    "Guidance",
    "GuidanceInterval",
    "GuidanceState",
    "Guided",
    "Pred",
    "State",
    "build",
    "get",
    "names",
    "register",
    "resolve",
]

#: the per-run state a strategy carries between steps
GuidanceState = tuple[Tensor, ...]
State = GuidanceState
#: a prediction handed to `Guidance.combine`: (x0, eps, var_out)
Pred = Prediction
#: what `Guidance.combine` returns: (x0, eps, state)
Guided = tuple[Tensor, Tensor, GuidanceState]


class Guidance:
    """Base class of guidance strategies. Options are keyword arguments of ``__init__``.

    Subclasses implement `combine`, and override `init_state` (per-run state) and
    `needs_null_cond` where needed.
    """

    #: the prediction space `combine` works in: ``"x0_eps"`` (the pair), or the name of the
    #: prediction in `SPACES` for strategies with a ``space`` option
    space: str = "x0_eps"
    #: whether the denoiser also evaluates the network on the null condition (batched with
    #: the conditional rows: one network call of 2 bsz rows)
    needs_null_cond: ClassVar[bool] = True

    def init_state(self, x: Tensor) -> GuidanceState:
        """The state at the start of a run (x: the initial sample, (bsz, *input_shape))."""
        return ()

    def guide_network(self) -> Callable[..., Tensor] | None:
        """A second network that the denoiser calls on the same input and condition as the
        model (through the same target conversion); its prediction reaches `combine` as
        ``uncond``. None (the default): ``uncond`` is the model's unconditional prediction
        where `needs_null_cond`, else None. Used by `AutoGuidance`."""
        return None

    def combine(
        self, x: Tensor, p: Point, cond: Pred, uncond: Pred | None, state: State, step: Tensor
    ) -> Guided:
        """The guided prediction at ``x`` (bsz, *input_shape).

        Args:
            x: the current sample x_t.
            p: the process point at x's time (`tinydiff.process.Point`, fields
                broadcastable against x).
            cond: the conditional prediction (x0, eps, var_out).
            uncond: the unconditional prediction (None unless `needs_null_cond`).
            state: this run's state (from `init_state` or the previous call).
            step: the sampling step's index, a 0-dim int64 tensor on x's device.

        Returns:
            (x0, eps, state), x0 and eps of x's shape.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({opts})"

    # strategies are immutable option objects: equal options make equal strategies (so that a
    # strategy nested in another's options, e.g. in `GuidanceInterval`, keys compiled steps
    # by value, not by identity)
    def _key(self) -> tuple[Any, ...]:
        items: list[tuple[str, Any]] = []
        for name, value in sorted(vars(self).items()):
            try:
                hash(value)
            except TypeError:
                value = repr(value)
            items.append((name, value))
        return (type(self), tuple(items))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Guidance):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


REGISTRY: Registry[type[Guidance]] = Registry(
    "guidance method",
    class_check(
        "a guidance method must be a subclass of tinydiff.guidance.Guidance", base=Guidance
    ),
)
register = REGISTRY.register
get = REGISTRY.get
names = REGISTRY.names


@register("cfg")
class CFG(Guidance):
    r"""Classifier-free guidance (Ho & Salimans 2022), optionally rescaled (Lin et al. 2024).

    $\hat x_0 = \hat x_0^u + w(\hat x_0^c - \hat x_0^u)$ and the same for $\hat\epsilon$:
    both use weights $1 - w$ and $w$, so $x_t = \alpha\hat x_0 + \sigma\hat\epsilon$ still
    holds. With rescale $\phi > 0$ (Lin et al. 2024, sec. 3.4) the guided $\hat x_0$ is
    rescaled towards the conditional one's standard deviation (per sample, over all
    non-batch dims), $\hat x_0 \leftarrow \phi\,\hat x_0\,\sigma_c/\sigma_g + (1-\phi)\hat x_0$,
    and $\hat\epsilon$ is recomputed from $x_t$ so that the pair stays consistent.

    Args:
        scale: w (0: unconditional, 1: conditional, > 1: guided); finite.
        rescale: phi in [0, 1]; 0 disables.
    """

    def __init__(self, scale: float = 3.0, rescale: float = 0.0) -> None:
        self.scale = check_number("guidance_scale", scale)
        self.rescale = check_number("guidance_rescale", rescale, min=0.0, max=1.0)

    def combine(
        self, x: Tensor, p: Point, cond: Pred, uncond: Pred | None, state: State, step: Tensor
    ) -> Guided:
        assert uncond is not None  # needs_null_cond
        x0, eps = apply_guidance(
            x, p.alpha, p.sigma, cond[:2], uncond[:2], self.scale, self.rescale
        )
        return x0, eps, state


#: the prediction spaces a nonlinear strategy can act in: the prediction of x_t of that name
#: and its conversion back to an (x0, eps) pair (`tinydiff.targets`). ``"eps"`` needs
#: alpha > 0; ``"velocity"`` reads the point's path derivatives, which every sampling plan's
#: points carry (the tinydiff 0.1 call ``denoise(x, t, alpha_bar)`` has none: use another
#: space there)
SPACES: dict[str, Target] = {
    "x0": PredX0(),
    "eps": PredEps(),
    "v": PredV(),
    "velocity": PredVelocity(),
}


def _check_space(space: Any, owner: str) -> str:
    if not isinstance(space, str) or space not in SPACES:
        close = difflib.get_close_matches(str(space), list(SPACES), n=2)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"{owner} space must be one of {', '.join(map(repr, SPACES))} (the prediction the "
            f"guidance acts on), got {space!r}.{hint}"
        )
    return space


def _in_space(
    space: str, cond: Pred, uncond: Pred | None, p: Point
) -> tuple[Target, Tensor, Tensor]:
    """The target of ``space`` and the conditional and unconditional predictions in it."""
    assert uncond is not None  # the strategies that call this need the null condition
    target = SPACES[space]
    return target, target.target(cond.x0, cond.eps, p), target.target(uncond.x0, uncond.eps, p)


def _dims(x: Tensor) -> tuple[int, ...]:
    """The non-batch dims: norms and inner products are per sample."""
    return tuple(range(1, x.dim()))


@register("cfg_pp", aliases=("cfgpp",))
class CFGPlusPlus(Guidance):
    r"""CFG++ (Chung et al. 2024, "CFG++: Manifold-constrained classifier free guidance for
    diffusion models", Algorithm 1): guidance on the denoised estimate, and the
    *unconditional* noise estimate for renoising,

    $$\hat x_0 = \hat x_0^u + \lambda(\hat x_0^c - \hat x_0^u), \qquad \hat\epsilon = \hat\epsilon^u.$$

    The pair is deliberately inconsistent ($x_t \ne \alpha\hat x_0 + \sigma\hat\epsilon$), so
    CFG++ is only meaningful for samplers whose update reads both: it is exact for ``ddim``
    (the paper's DDIM form, $x_s = \alpha_s\hat x_0 + \sigma_s\hat\epsilon$; with ``eta > 0``
    the same substitution in DDIM's stochastic update) and enters ``deis`` through its eps
    history. Samplers that read only $\hat x_0$ (``euler``, ``heun``, ``dpmpp_*``, ``unipc``,
    ``ddpm``) see plain guidance of $\hat x_0$ with scale $\lambda$, which is not CFG++; use
    ``cfg`` with them.

    Args:
        scale: lambda >= 0; the paper uses lambda in [0, 1] (0: unconditional, 1:
            conditional x0 with unconditional renoising).
    """

    def __init__(self, scale: float = 0.6) -> None:
        self.scale = check_number("guidance_scale", scale, min=0.0, owner="cfg_pp")

    def combine(
        self, x: Tensor, p: Point, cond: Pred, uncond: Pred | None, state: State, step: Tensor
    ) -> Guided:
        assert uncond is not None  # needs_null_cond
        x0 = uncond.x0 + self.scale * (cond.x0 - uncond.x0)
        return x0, uncond.eps, state


@register("apg", aliases=("adaptive_projected_guidance",))
class APG(Guidance):
    r"""Adaptive projected guidance (Sadat et al. 2024, "Eliminating oversaturation and
    artifacts of high guidance scales in diffusion models", Algorithm 1).

    In the prediction space ``space`` (default ``"x0"``, the paper's denoised prediction D),
    with $c$ and $u$ the conditional and unconditional predictions,

    1. $\Delta = c - u$; with momentum $\beta \ne 0$: $\Delta \leftarrow \Delta + \beta\,m$ and
       $m \leftarrow \Delta$ (the running average $m$, zero at the start, is the per-run state;
       it is updated at every denoiser call, i.e. once per network evaluation);
    2. norm threshold $r > 0$: $\Delta \leftarrow \Delta\min(1, r/\lVert\Delta\rVert)$;
    3. $\Delta_\parallel = \langle\Delta, \hat c\rangle\hat c$ with
       $\hat c = c/\lVert c\rVert$, $\Delta_\perp = \Delta - \Delta_\parallel$;
    4. guided prediction $c + (w - 1)(\Delta_\perp + \eta\,\Delta_\parallel)$,

    norms and inner products per sample over all non-batch dims. The guided prediction is
    turned back into an (x0, eps) pair with x_t (`SPACES`). With eta = 1, r = 0 and
    beta = 0 this is classifier-free guidance in that space.

    diffusers' ``AdaptiveProjectedGuidance`` computes the same steps on the raw network
    output; its default form anchors at the unconditional prediction, $u + w'(\ldots)$, its
    ``use_original_formulation=True`` form is the paper's, with $w' = w - 1$.

    Args:
        scale: w (1: conditional).
        eta: weight of the parallel component (the paper recommends 0).
        norm_threshold: r >= 0; 0 disables. The scale of the norm depends on the data's
            dimension and the space (the paper tunes r per model).
        momentum: beta (the paper recommends negative values, e.g. -0.5); 0 disables.
        space: the prediction the guidance acts on (``"x0"``, ``"eps"``, ``"v"``,
            ``"velocity"``).
    """

    def __init__(
        self,
        scale: float = 3.0,
        eta: float = 0.0,
        norm_threshold: float = 0.0,
        momentum: float = 0.0,
        space: str = "x0",
    ) -> None:
        self.scale = check_number("guidance_scale", scale, owner="apg")
        self.eta = check_number("eta", eta, owner="apg")
        self.norm_threshold = check_number("norm_threshold", norm_threshold, min=0.0, owner="apg")
        self.momentum = check_number("momentum", momentum, owner="apg")
        self.space = _check_space(space, "apg")

    def init_state(self, x: Tensor) -> GuidanceState:
        return (torch.zeros_like(x),) if self.momentum != 0 else ()

    def combine(
        self, x: Tensor, p: Point, cond: Pred, uncond: Pred | None, state: State, step: Tensor
    ) -> Guided:
        target, c, u = _in_space(self.space, cond, uncond, p)
        diff = c - u
        dims = _dims(diff)
        if self.momentum != 0:
            diff = diff + self.momentum * state[0]
            state = (diff,)
        if self.norm_threshold > 0:
            norm = diff.norm(dim=dims, keepdim=True)
            diff = diff * (self.norm_threshold / norm).clamp(max=1.0)
        unit = c / c.norm(dim=dims, keepdim=True).clamp_min(1e-12)
        parallel = (diff * unit).sum(dim=dims, keepdim=True) * unit
        update = diff - parallel + self.eta * parallel
        x0, eps = target.to_x0_eps(c + (self.scale - 1) * update, x, p)
        return x0, eps, state


@register("cfg_zero_star", aliases=("cfg_zero", "cfgzero_star"))
class CFGZeroStar(Guidance):
    r"""CFG-Zero* (Fan et al. 2025, "CFG-Zero*: Improved classifier-free guidance for flow
    matching models"): an optimized scale and zero-init.

    In the prediction space ``space`` (default ``"velocity"``, the paper's flow-matching
    velocity), with $c$ and $u$ the conditional and unconditional predictions,

    $$s^* = \frac{\langle c, u\rangle}{\lVert u\rVert^2}\ \text{(per sample)},\qquad
    \hat p = s^* u + w\,(c - s^* u),$$

    and $\hat p = 0$ at the first ``zero_init_steps`` sampling steps (the step index that the
    sampling loop passes: every denoiser call of those steps). The guided prediction is turned
    back into an (x0, eps) pair with x_t (`SPACES`); a zero velocity keeps x_t where it is
    under a first-order step.

    diffusers' ``ClassifierFreeZeroStarGuidance`` computes the same on the raw network output
    (so they agree when ``space`` names the model's prediction type).

    Args:
        scale: w (1: conditional).
        zero_init_steps: K >= 0 (the paper: about the first 4% of the steps; diffusers'
            default 1).
        space: the prediction the guidance acts on (``"x0"``, ``"eps"``, ``"v"``,
            ``"velocity"``).
    """

    def __init__(
        self, scale: float = 3.0, zero_init_steps: int = 1, space: str = "velocity"
    ) -> None:
        self.scale = check_number("guidance_scale", scale, owner="cfg_zero_star")
        if (
            isinstance(zero_init_steps, bool)
            or not isinstance(zero_init_steps, int)
            or zero_init_steps < 0
        ):
            raise ValueError(
                f"cfg_zero_star zero_init_steps must be an int >= 0 (steps whose prediction is "
                f"zeroed), got {zero_init_steps!r}"
            )
        self.zero_init_steps = zero_init_steps
        self.space = _check_space(space, "cfg_zero_star")

    def combine(
        self, x: Tensor, p: Point, cond: Pred, uncond: Pred | None, state: State, step: Tensor
    ) -> Guided:
        target, c, u = _in_space(self.space, cond, uncond, p)
        dims = _dims(c)
        s = (c * u).sum(dim=dims, keepdim=True) / (u * u).sum(dim=dims, keepdim=True).clamp_min(
            torch.finfo(u.dtype).tiny
        )
        out = s * u + self.scale * (c - s * u)
        if self.zero_init_steps > 0:
            out = torch.where(step < self.zero_init_steps, torch.zeros_like(out), out)
        x0, eps = target.to_x0_eps(out, x, p)
        return x0, eps, state


@register("autoguidance", aliases=("auto_guidance",))
class AutoGuidance(Guidance):
    r"""Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of
    itself", eq. 2): guide with a weaker model of the *same* condition,

    $$D_w = D_0 + w\,(D_1 - D_0)$$

    for $D_1$ the model and $D_0$ the guide, on the (x0, eps) pair (affine, so the pair stays
    consistent and this equals the same combination of raw outputs). The guide is called on
    the same network input and condition as the model, and its output goes through the model's
    target conversion: it must be trained with the same process and target. No null condition
    is needed (unconditional models can be autoguided). Each step costs one call of each
    network (not batched: they differ). Compiled sampling runs the guide eagerly, like the
    model's network, as an opaque operator.

    diffusers' ``AutoGuidance`` skips layers of the one network instead of calling a second
    one.

    Args:
        guide: the weaker network (``guide(x_in, t_in, **cond)``, the model's network
            contract) or a `tinydiff.DiffusionModel` (its live network is used).
        scale: w (1: the model alone; Karras et al. report values around 2 to 3).
    """

    needs_null_cond = False

    def __init__(self, guide: Any = None, scale: float = 2.0) -> None:
        network = getattr(guide, "nn_module", guide)
        if guide is None or not callable(network):
            raise TypeError(
                "autoguidance needs guidance_kwargs={'guide': network}: a weaker network of the "
                "same condition (called as guide(x_t, t, **cond)) or a DiffusionModel, got "
                f"{guide!r:.100}"
            )
        self.guide = network
        self.scale = check_number("guidance_scale", scale, owner="autoguidance")

    def guide_network(self) -> Callable[..., Tensor]:
        return self.guide

    def combine(
        self, x: Tensor, p: Point, cond: Pred, uncond: Pred | None, state: State, step: Tensor
    ) -> Guided:
        assert uncond is not None  # the guide's prediction
        x0 = uncond.x0 + self.scale * (cond.x0 - uncond.x0)
        eps = uncond.eps + self.scale * (cond.eps - uncond.eps)
        return x0, eps, state


class GuidanceInterval(Guidance):
    r"""Apply a guidance strategy only on a range of noise levels (Kynkäänniemi et al. 2024,
    "Applying guidance in a limited interval improves sample and distribution quality in
    diffusion models"); elsewhere the conditional prediction is used (w = 1).

    The noise level is EDM's $\sigma/\alpha$ (Karras et al. 2022; for a variance-preserving
    process $\sqrt{(1-\bar\alpha)/\bar\alpha}$; infinite where alpha = 0), the variable the
    paper states its intervals in: guidance is on where
    $\sigma_{lo} < \sigma/\alpha \le \sigma_{hi}$. The choice is made per sample with
    ``torch.where`` (no host sync), so the network calls are not saved outside the interval.
    Per-run state of the wrapped strategy (e.g. APG's momentum) is frozen outside it.

    Given by name as the option ``interval`` of any method:
    ``guidance_kwargs={"interval": (0.28, 5.42)}``.

    Args:
        guidance: the strategy to restrict.
        interval: (sigma_lo, sigma_hi) with 0 <= sigma_lo < sigma_hi <= inf.
    """

    def __init__(self, guidance: Guidance, interval: Sequence[float]) -> None:
        if not isinstance(guidance, Guidance):
            raise TypeError(f"guidance must be a tinydiff.guidance.Guidance, got {guidance!r}")
        if (
            isinstance(interval, (str, bytes))
            or not isinstance(interval, Sequence)
            or len(interval) != 2
        ):
            raise ValueError(
                "a guidance interval is (sigma_lo, sigma_hi), noise levels sigma/alpha with "
                f"0 <= sigma_lo < sigma_hi <= inf, got {interval!r}"
            )
        lo = check_number("interval[0] (sigma_lo)", interval[0], min=0.0)
        hi = check_number("interval[1] (sigma_hi)", interval[1], finite=False)
        if not lo < hi:
            raise ValueError(f"a guidance interval needs sigma_lo < sigma_hi, got {interval!r}")
        self.guidance = guidance
        self.interval = (lo, hi)
        self.needs_null_cond = guidance.needs_null_cond  # type: ignore[misc]
        self.space = guidance.space

    @property
    def scale(self) -> float | None:
        """The wrapped strategy's scale (None if it has none)."""
        return getattr(self.guidance, "scale", None)

    def init_state(self, x: Tensor) -> GuidanceState:
        return self.guidance.init_state(x)

    def guide_network(self) -> Callable[..., Tensor] | None:
        return self.guidance.guide_network()

    def combine(
        self, x: Tensor, p: Point, cond: Pred, uncond: Pred | None, state: State, step: Tensor
    ) -> Guided:
        x0, eps, new_state = self.guidance.combine(x, p, cond, uncond, state, step)
        level = p.sigma / p.alpha  # +inf at alpha = 0
        lo, hi = self.interval
        inside = level > lo
        if not math.isinf(hi):
            inside = inside & (level <= hi)
        x0 = torch.where(inside, x0, cond.x0)
        eps = torch.where(inside, eps, cond.eps)
        kept = tuple(
            torch.where(inside, new, old)
            if torch.broadcast_shapes(new.shape, inside.shape) == new.shape
            else new
            for new, old in zip(new_state, state, strict=True)
        )
        return x0, eps, kept


def build(name: str, options: Mapping[str, Any] | None = None) -> Guidance:
    """Instantiate the registered guidance method ``name`` with ``options``; the option
    ``interval=(sigma_lo, sigma_hi)`` (any method) wraps it in a `GuidanceInterval`.

    Raises:
        ValueError: unknown name (with close matches) or a bad option value.
        TypeError: an unknown option name; the message lists the accepted ones.
    """
    opts = dict(options or {})
    interval = opts.pop("interval", None)
    what = f"guidance_kwargs {dict(options or {})} for guidance {name!r}"
    strategy = instantiate(get(name), opts, what, also=("interval",))
    return strategy if interval is None else GuidanceInterval(strategy, interval)


def resolve(
    guidance: str | Guidance | None = None,
    guidance_scale: Any = None,
    guidance_rescale: Any = 0.0,
    guidance_kwargs: Mapping[str, Any] | None = None,
    *,
    cond: Mapping[str, Any] | None = None,
) -> Guidance | None:
    """The guidance strategy of a call's options; the one place they are checked.

    ``guidance_scale`` alone means classifier-free guidance (``"cfg"``) with
    ``guidance_rescale``; a ``guidance`` name takes its options from ``guidance_kwargs``, with
    ``guidance_scale`` (and ``guidance_rescale``) passed as its ``scale`` (and ``rescale``)
    when given. Everything is checked before sampling starts.

    Raises:
        TypeError: a non-numeric scale (bools and strings refused), a guidance that is neither
            a name nor a `Guidance`.
        ValueError: a NaN or infinite scale, rescale outside [0, 1] or without a scale,
            guidance options without a method, or a method that needs the null condition
            without ``cond``.
    """
    if guidance_kwargs is not None and not isinstance(guidance_kwargs, Mapping):
        raise TypeError(f"guidance_kwargs must be a dict, got {type(guidance_kwargs).__name__}")
    if guidance_scale is not None:
        check_number("guidance_scale", guidance_scale)
    rescale = check_number("guidance_rescale", guidance_rescale, min=0.0, max=1.0)
    if rescale > 0 and guidance_scale is None:
        raise ValueError("guidance_rescale needs guidance_scale")
    if guidance is None:
        if guidance_kwargs:
            raise ValueError("guidance_kwargs was given without guidance (a method name)")
        if guidance_scale is None:
            return None
        guidance = "cfg"
    if isinstance(guidance, Guidance):
        if guidance_scale is not None or guidance_kwargs:
            raise ValueError(
                "pass options either in the Guidance object or as guidance_scale / "
                "guidance_kwargs, not both"
            )
        strategy = guidance
    elif isinstance(guidance, str):
        options = dict(guidance_kwargs or {})
        if guidance_scale is not None:
            options["scale"] = guidance_scale
        if rescale > 0:
            options["rescale"] = rescale
        strategy = build(guidance, options)
    else:
        raise TypeError(
            f"guidance must be a method name ({', '.join(names())}) or a "
            f"tinydiff.guidance.Guidance, got {type(guidance).__name__}"
        )
    if strategy.needs_null_cond and cond is None:
        given = "guidance_scale" if guidance_scale is not None else f"guidance {strategy!r}"
        raise ValueError(
            f"{given} was given without cond: {strategy!r} needs the condition to guide "
            "towards, e.g. cond={'class_labels': labels}"
        )
    return strategy
