r"""The denoiser: a network, its prediction target and conditioning, seen as :math:`D(x_t, t)`.

Everything that calls the network goes through `Denoiser`: sampling (eager and
compiled alike), the likelihood, the training loss and the tests. It

1. forms the network input with the target's `tinydiff.targets.Target.network_input`
   (the raw (x_t, t) for eps / x0 / v; scaled for preconditioned targets), times in float32
   (float64 for float64 x: t up to T must stay exact);
2. calls ``network(x_in, t_in, **cond)`` and checks the output's shape (``channel_multiplier``
   times the channels for a variance type with extra channels); a caller that passes an end
   time ``r`` (a two-time network, e.g. a MeanFlow model's average velocity u(x_t, r, t);
   `tinydiff.samplers.flow_map`) gets ``network(x_in, t_in, r=r_in, **cond)``, with r on
   the same [0, T] scale and in the same dtype as t; without r nothing changes;
3. converts the output into `Prediction` (x0_hat, eps_hat, variance channels);
4. hands the conditional (and, where the strategy needs it, the unconditional) prediction to
   a guidance strategy (`tinydiff.guidance`), e.g. classifier-free guidance with rescale;
   the conditional and unconditional rows go through the network in one batch of 2 bsz. A
   strategy with a guide network (`tinydiff.guidance.Guidance.guide_network`, e.g.
   autoguidance) gets that network's prediction, on the same input and condition, instead
   of the unconditional one.

A denoiser is immutable. Guidance state that changes during a run (a momentum buffer, a step
count) lives in the sampling loop, which calls `Denoiser.bind` once per step: the bound view
is what the sampler calls, and it carries the state from call to call and records the step's
first estimate of x0 for per-step callbacks.

Samplers call ``denoiser(x, point)`` with ``point`` a row of the plan's ``point`` column
(`tinydiff.process.GaussianProcess.points`): the network time and the process
coefficients there, so they never need to know what the network was trained to predict
(k-diffusion's denoiser-wrapper idea, Karras et al. 2022).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from tinydiff import conditioning, variances
from tinydiff.guidance import CFG, Guidance, GuidanceState, resolve
from tinydiff.process import Point, vp_point
from tinydiff.targets import Prediction, Target
from tinydiff.variances import Variance

if TYPE_CHECKING:
    from tinydiff.process import GaussianProcess

__all__ = [
    "BoundDenoiser",
    "Denoiser",
    "ModelLike",
    "Prediction",
    "network_time_dtype",
    "takes_end_time",
]


def network_time_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the times handed to the network: float64 for float64 x, else float32
    (never half precision: t up to T must stay exact)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def takes_end_time(network: Any) -> bool:
    """Whether `network` is a two-time network, called as `network(x_t, t, r=r, **cond)`:
    its `end_time` attribute where it has one ([`MLP`][tinydiff.nn.MLP] and
    [`UNet`][tinydiff.nn.UNet] built with `end_time=True`), else whether its `forward` (or
    the callable itself) takes a parameter named `r`."""
    flag = getattr(network, "end_time", None)
    if flag is not None:
        return bool(flag)
    if isinstance(network, nn.Module):  # one look per class: the loss builds a denoiser a step
        cls = type(network)
        if cls not in _TAKES_R:
            _TAKES_R[cls] = _has_r(cls.forward)
        return _TAKES_R[cls]
    return _has_r(network)


_TAKES_R: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


def _has_r(fn: Any) -> bool:
    try:
        return "r" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature (a builtin): a one-time network
        return False


class Denoiser:
    """The model as samplers see it: ``denoiser(x_t, point) -> Prediction``.

    Args:
        network: called as ``network(x_in, t_in, **cond)``; any callable module.
        target: the prediction target (converts the output to (x0, eps)).
        variance: the variance type (splits off its channels).
        cond: keyword arguments of the network, tensors with leading dim bsz, or None.
        guidance_scale: w of classifier-free guidance (needs ``cond`` and a network with a null
            condition, see `tinydiff.conditioning`); None: no guidance. Shorthand for
            ``guidance=tinydiff.guidance.CFG(w, guidance_rescale)``.
        guidance_rescale: phi in [0, 1]; 0 disables.
        null_source: the module that defines the null condition (default: ``network``); set it
            when ``network`` is a wrapper.
        guidance: a guidance strategy (`tinydiff.guidance.Guidance`) instead of
            ``guidance_scale``. With ``cond=None`` the network is called without keyword
            arguments on the 2 bsz rows (it supplies the condition itself, as the compiled
            loop's network slot does).
        x0_limit: applied to every (guided) x0 estimate, e.g. a
            `tinydiff.thresholding.ClipX0` or `DynamicThreshold`; eps is left as the target
            computed it (diffusers' DDPM and DDIM schedulers do the same).
        guide_network: the network called for the strategy's guide (default: its
            `tinydiff.guidance.Guidance.guide_network`; the compiled loop passes its opaque
            slot).
        end_time: whether the network takes an end time ``r`` (a two-time network, see
            `takes_end_time`, which decides when None). Samplers read it to choose between
            a flow-map jump and a one-time step (`tinydiff.samplers.flow_map`).

    Raises:
        ValueError: guidance without cond; a network without a null condition; bad guidance
            options (`tinydiff.guidance.resolve`).
    """

    network: nn.Module | Callable[..., Tensor]
    target: Target
    variance: Variance
    channel_multiplier: int
    guidance: Guidance | None
    cond: dict[str, Any] | None
    guide_network: Callable[..., Tensor] | None
    _network_cond: dict[str, Any] | None
    x0_limit: Callable[[Tensor], Tensor] | None
    end_time: bool

    __slots__ = (
        "_network_cond",
        "channel_multiplier",
        "cond",
        "end_time",
        "guidance",
        "guide_network",
        "network",
        "target",
        "variance",
        "x0_limit",
    )

    def __init__(
        self,
        network: nn.Module | Callable[..., Tensor],
        target: Target,
        variance: Variance,
        *,
        cond: Mapping[str, Any] | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        null_source: Any = None,
        guidance: Guidance | None = None,
        guide_network: Callable[..., Tensor] | None = None,
        x0_limit: Callable[[Tensor], Tensor] | None = None,
        end_time: bool | None = None,
    ) -> None:
        if guidance is None:
            guidance = resolve(None, guidance_scale, guidance_rescale, cond=cond)
        elif guidance_scale is not None:
            raise ValueError("pass either guidance or guidance_scale, not both")
        if guide_network is None and guidance is not None:
            guide_network = guidance.guide_network()
        if guide_network is not None and (guidance is None or guidance.needs_null_cond):
            raise ValueError(
                "a guide network replaces the unconditional prediction: it needs a guidance "
                "strategy with needs_null_cond = False"
            )
        cond = None if cond is None else dict(cond)
        network_cond = cond
        if cond is not None and guidance is not None and guidance.needs_null_cond:
            source: Any = network if null_source is None else null_source
            network_cond = conditioning.concat_cond(cond, conditioning.null_cond(source, cond))
        init = object.__setattr__
        init(self, "network", network)
        init(self, "target", target)
        init(self, "variance", variance)
        init(self, "channel_multiplier", int(getattr(variance, "channel_multiplier", 1)))
        init(self, "guidance", guidance)
        init(self, "cond", cond)
        init(self, "guide_network", guide_network)
        init(self, "_network_cond", network_cond)
        init(self, "x0_limit", x0_limit)
        init(self, "end_time", takes_end_time(network) if end_time is None else bool(end_time))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(
            f"a Denoiser is immutable (cannot set {name!r}); build a new one, e.g. with "
            "model.denoiser(...)"
        )

    @property
    def guided(self) -> bool:
        """Whether a guidance strategy is applied."""
        return self.guidance is not None

    @property
    def guidance_scale(self) -> float | None:
        """The strategy's ``scale`` (w), or None without guidance."""
        return getattr(self.guidance, "scale", None)

    @property
    def guidance_rescale(self) -> float:
        """Classifier-free guidance's rescale phi (0 for other strategies)."""
        return self.guidance.rescale if isinstance(self.guidance, CFG) else 0.0

    @property
    def network_cond(self) -> dict[str, Any] | None:
        """The keyword arguments the network is called with: ``cond``, followed by its null
        version (2 bsz rows) when the guidance strategy needs the unconditional prediction."""
        return self._network_cond

    def forward_network(
        self,
        x_t: Tensor,
        p: Point,
        network: Callable[..., Tensor] | None = None,
        r: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """The raw network output at x_t, split into (model_out, var_out), in x_t's dtype.

        The network gets `network_cond` (the doubled one under guidance), so x_t must have
        its batch size. ``network`` replaces the model's network (the guide network is called
        with the same condition). ``r``: an end time, 0-dim or (bsz,), on the [0, T] scale,
        passed as ``r=`` in the network time's dtype (two-time networks only).

        Raises:
            ValueError: the network returned something other than a tensor of the expected
                shape.
        """
        x_in, t_in = self.target.network_input(x_t, p)
        bsz = x_t.shape[0]
        t_in = t_in.reshape(-1).expand(bsz) if t_in.dim() <= 1 else t_in.reshape(bsz)
        cond = self._network_cond
        net = self.network if network is None else network
        if r is None:
            out = net(x_in, t_in) if cond is None else net(x_in, t_in, **cond)
        else:
            r_in = r.to(t_in.dtype)
            r_in = r_in.reshape(-1).expand(bsz) if r_in.dim() <= 1 else r_in.reshape(bsz)
            out = net(x_in, t_in, r=r_in) if cond is None else net(x_in, t_in, r=r_in, **cond)
        expected = (bsz, x_t.shape[1] * self.channel_multiplier, *x_t.shape[2:])
        if not isinstance(out, Tensor) or tuple(out.shape) != expected:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            name = variances.REGISTRY.name_of(type(self.variance)) or type(self.variance).__name__
            extra = (
                f" (variance_type={name!r} needs {self.channel_multiplier}x the input channels "
                "on dim 1: the mean channels then the variance channels)"
                if self.channel_multiplier != 1
                else ""
            )
            who = "nn_module" if network is None else "the guide network"
            raise ValueError(f"{who} returned {got}; expected shape {expected}{extra}")
        return self.variance.split(out.to(x_t.dtype))

    def init_state(self, x: Tensor) -> GuidanceState:
        """The guidance strategy's state at the start of a run (``()`` without guidance)."""
        return () if self.guidance is None else self.guidance.init_state(x)

    def bind(self, state: GuidanceState, step: Tensor | None) -> BoundDenoiser:
        """The view a sampler calls during one step (see `BoundDenoiser`)."""
        return BoundDenoiser(self, state, step)

    def predict(
        self,
        x: Tensor,
        p: Point,
        state: GuidanceState = (),
        step: Tensor | None = None,
        r: Tensor | None = None,
    ) -> tuple[Prediction, GuidanceState]:
        """The (guided, x0-limited) prediction at x and the guidance state after it; with an
        end time ``r`` (two-time networks) the network output is u(x, r, t), converted by
        the target as if it were its one-time output."""
        pred, state = self._guided(x, p, state, step, r)
        if self.x0_limit is not None:
            pred = pred._replace(x0=self.x0_limit(pred.x0))
        return pred, state

    def _guided(
        self, x: Tensor, p: Point, state: GuidanceState, step: Tensor | None, r: Tensor | None
    ) -> tuple[Prediction, GuidanceState]:
        if self.guidance is None:
            model_out, var_out = self.forward_network(x, p, r=r)
            x0, eps = self.target.to_x0_eps(model_out, x, p)
            return Prediction(x0, eps, var_out), state
        if step is None:
            step = torch.zeros((), dtype=torch.int64, device=x.device)
        if not self.guidance.needs_null_cond:
            model_out, var_out = self.forward_network(x, p, r=r)
            x0_c, eps_c = self.target.to_x0_eps(model_out, x, p)
            cond_pred = Prediction(x0_c, eps_c, var_out)
            guide_pred = None
            if self.guide_network is not None:
                guide_out, guide_var = self.forward_network(x, p, self.guide_network, r)
                x0_g, eps_g = self.target.to_x0_eps(guide_out, x, p)
                guide_pred = Prediction(x0_g, eps_g, guide_var)
            x0, eps, state = self.guidance.combine(x, p, cond_pred, guide_pred, state, step)
            return Prediction(x0, eps, var_out), state
        bsz = x.shape[0]
        x2 = torch.cat([x, x])
        p2 = p if p.t.dim() == 0 else Point(*(torch.cat([f, f]) for f in p))
        r2 = r if r is None or r.dim() == 0 else torch.cat([r, r])
        model_out, var_out = self.forward_network(x2, p2, r=r2)
        x0_2, eps_2 = self.target.to_x0_eps(model_out, x2, p2)
        var_c = None if var_out is None else var_out[:bsz]
        var_u = None if var_out is None else var_out[bsz:]
        x0, eps, state = self.guidance.combine(
            x,
            p,
            Prediction(x0_2[:bsz], eps_2[:bsz], var_c),
            Prediction(x0_2[bsz:], eps_2[bsz:], var_u),
            state,
            step,
        )
        return Prediction(x0, eps, var_c), state

    def __call__(
        self,
        x: Tensor,
        point: Tensor,
        alpha_bar: Tensor | None = None,
        *,
        r: Tensor | None = None,
    ) -> Prediction:
        """Denoise x (bsz, *input_shape) at ``point`` ((5,) or (bsz, 5), see the module doc);
        ``r``: an end time for a two-time network (see `predict`).

        A stateful guidance strategy starts from its initial state at every direct call; the
        sampling loop calls `bind`'s view instead, which carries the state.

        ``denoise(x, t, alpha_bar)`` (a 0-dim time and alpha_bar) is the tinydiff 0.1 form
        that samplers written for it use; it describes variance-preserving processes only.
        """
        if alpha_bar is not None:
            point = vp_point(point, alpha_bar)
        return self.predict(x, Point.of(point, x), self.init_state(x), r=r)[0]


class BoundDenoiser:
    """A `Denoiser` during one sampling step: what `tinydiff.samplers.Sampler.step` calls.

    Each call threads the guidance state to the next (a sampler may call the denoiser more
    than once a step), and the first call's x0 estimate is kept for the loop's callback.

    Attributes:
        state: the guidance state after the calls so far.
        first_x0: the x0 estimate of the step's first call (None before it).
    """

    __slots__ = ("denoiser", "end_time", "first_x0", "state", "step", "variance")

    def __init__(self, denoiser: Denoiser, state: GuidanceState, step: Tensor | None) -> None:
        self.denoiser = denoiser
        self.variance = denoiser.variance
        self.end_time = denoiser.end_time
        self.state = state
        self.step = step
        self.first_x0: Tensor | None = None

    def __call__(self, x: Tensor, point: Tensor, r: Tensor | None = None) -> Prediction:
        pred, self.state = self.denoiser.predict(x, Point.of(point, x), self.state, self.step, r)
        if self.first_x0 is None:
            self.first_x0 = pred.x0
        return pred


class ModelLike(Protocol):
    """What the likelihood, the timestep search and serialization need of a model: the
    public surface of `tinydiff.DiffusionModel`, so that those modules never import it."""

    process: GaussianProcess
    target: Target
    variance: Variance
    input_shape: tuple[int, ...]
    config: Any
    nn_module: nn.Module

    @property
    def num_timesteps(self) -> int: ...

    @property
    def alphas_cumprod(self) -> Tensor: ...

    def check_data(self, x: Any, name: str = "x") -> Tensor: ...

    def network(self, use_ema: bool = False) -> nn.Module: ...

    def denoiser(self, *args: Any, **kwargs: Any) -> Denoiser: ...

    def sample(self, *args: Any, **kwargs: Any) -> Tensor: ...

    def make_sampler(self, *args: Any, **kwargs: Any) -> Any: ...

    def sampling_timesteps(self, *args: Any, **kwargs: Any) -> Tensor: ...
