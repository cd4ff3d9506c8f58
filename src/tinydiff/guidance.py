r"""Guidance strategies: how conditional and unconditional predictions become one.

A strategy is a small immutable object (its options) registered by name. The denoiser
(`tinydiff.denoiser.Denoiser`) calls the network, turns each output into an
$(\hat x_0, \hat\epsilon)$ pair with the model's target, and hands the pairs to the strategy,
which returns the guided pair. Per-run state (a momentum buffer, a step count) is not kept on
the strategy: it is a tuple of tensors that the sampling loop carries from step to step
(`Guidance.init_state`), so one strategy object serves any number of runs, eager or
compiled, and the compiled step stays a pure function.

Every built-in strategy works in the $(\hat x_0, \hat\epsilon)$ prediction space
(`Guidance.space`): for the affine targets (eps, x0, v, velocity) an affine combination
there equals the same combination of the raw network outputs; diffusers' guiders combine the
raw outputs.

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

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor

from tinydiff._registry import Registry, class_check, instantiate
from tinydiff._validation import check_number
from tinydiff.conditioning import apply_guidance
from tinydiff.process import Point
from tinydiff.targets import Prediction

__all__ = [
    "CFG",
    "REGISTRY",
    "Guidance",
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

    #: the prediction space `combine` works in
    space: ClassVar[str] = "x0_eps"
    #: whether the denoiser also evaluates the network on the null condition (batched with
    #: the conditional rows: one network call of 2 bsz rows)
    needs_null_cond: ClassVar[bool] = True

    def init_state(self, x: Tensor) -> GuidanceState:
        """The state at the start of a run (x: the initial sample, (bsz, *input_shape))."""
        return ()

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


def build(name: str, options: Mapping[str, Any] | None = None) -> Guidance:
    """Instantiate the registered guidance method ``name`` with ``options``.

    Raises:
        ValueError: unknown name (with close matches) or a bad option value.
        TypeError: an unknown option name; the message lists the accepted ones.
    """
    options = dict(options or {})
    return instantiate(get(name), options, f"guidance_kwargs {options} for guidance {name!r}")  # type: ignore[no-any-return]


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
