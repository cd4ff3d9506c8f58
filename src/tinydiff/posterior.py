r"""Inpainting and linear inverse problems: sample x from $p(x \mid y)$ for $y = A x + s\,n$.

A diffusion model is a prior $p(x)$. Given an observation $y = A x + s\,n$, $n \sim
\mathcal N(0, I)$, with $A$ linear (a matrix over flattened samples, a linear callable, or a
mask: inpainting) and $s \ge 0$ (`noise_std`), the methods here draw approximate samples of
the posterior $p(x \mid y) \propto p(x)\,\mathcal N(y; A x, s^2 I)$ with the model's
denoiser $D(x_t, t) \approx \mathbb E[x_0 \mid x_t]$ and no training.

| name | method | network calls per sample | exact? |
|---|---|---|---|
| `repaint` | replacement with resampling jumps (Lugmayr et al. 2022); masks only | steps + jumps | no |
| `dps` | diffusion posterior sampling (Chung et al. 2023) | 2 per step (1 forward, 1 backward) | no |
| `mmps` | moment-matching posterior sampling (Rozet et al. 2024) | (2 + `cg_iters`) per step | no |
| `mcgdiff` | sequential Monte Carlo (Cardoso et al. 2024) | steps x `num_particles` | as particles, steps grow |

All methods step with the ancestral (DDPM) kernel of any Gaussian path (the posterior
$q(x_s \mid x_t, x_0 = \hat x_0)$, `tinydiff.variances.gaussian_posterior`), with an `eta`
in [0, 1] for the non-particle ones (0: deterministic DDIM steps). Masks follow RePaint's
convention: `known_mask` is 1 (True) where the value is known. diffusers' inpainting
pipelines use the opposite (1 = repaint).

Register your own method:

```python
@tinydiff.posterior.register("my_method")
class MyMethod(tinydiff.posterior.PosteriorMethod):
    def run(self, denoiser, process, times, obs, *, generator=None, callback=None,
            progress=False):
        ...  # return (bsz, *input_shape) samples
```
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from tinydiff import _validation, conditioning
from tinydiff._progress import progress_bar
from tinydiff._registry import Registry, class_check, instantiate
from tinydiff.denoiser import Denoiser
from tinydiff.process import GaussianProcess, Point
from tinydiff.samplers.base import Callback, check_replacement
from tinydiff.targets import Prediction
from tinydiff.variances import gaussian_posterior

if TYPE_CHECKING:
    from tinydiff.guidance import Guidance

__all__ = [
    "DEFAULT_METHOD",
    "DPS",
    "MMPS",
    "REGISTRY",
    "LinearCallable",
    "MCGDiff",
    "Observation",
    "PosteriorMethod",
    "PosteriorMixin",
    "RePaint",
    "build",
    "get",
    "inpaint",
    "names",
    "register",
    "sample",
]

LinearCallable = Callable[[Tensor], Tensor]
"""An operator given as a linear callable: `A(x)` for x (bsz, *input_shape) -> (bsz, m)."""


# -- the observation ------------------------------------------------------------------------------
class Observation:
    r"""An observation $y = A x + s\,n$ of a batch, checked, in the network's dtype.

    Build it with `Observation.linear` (a matrix or a linear callable) or
    `Observation.masked` (inpainting). Methods use `apply`, `adjoint` and, for Gaussian
    solves, `solve` and `quad` with matrices $c_1 A A^\top + c_2 I$ (diagonalised once:
    $A A^\top = U \Lambda U^\top$; a mask is already diagonal). A selection matrix (one 1 per
    row, distinct columns) is turned into a mask, so inpainting and `posterior_sample` with
    that matrix run the same code.

    Attributes:
        y: (bsz, m), or (bsz, *input_shape) for a mask (zero where unknown).
        noise_std: s.
        input_shape: the shape of one sample.
        mask: (bsz or 1, *input_shape), 1 where known (in y's dtype), or None.
    """

    def __init__(
        self,
        y: Tensor,
        noise_std: float,
        input_shape: tuple[int, ...],
        *,
        mask: Tensor | None = None,
        matrix: Tensor | None = None,
        fn: LinearCallable | None = None,
    ) -> None:
        self.y = y
        self.noise_std = float(noise_std)
        self.input_shape = tuple(input_shape)
        self.mask = mask
        self.matrix = matrix
        self.fn = fn
        self._eig: tuple[Tensor, Tensor] | None = None

    @property
    def bsz(self) -> int:
        """The batch size (rows of y)."""
        return self.y.shape[0]

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def linear(
        cls,
        y: Tensor,
        operator: Tensor | LinearCallable,
        noise_std: float,
        input_shape: Sequence[int],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Observation:
        """Check and build $y = A x + s n$.

        Args:
            y: (bsz, m) observations (or (m,): one observation, bsz = 1).
            operator: A as a matrix (m, d) over flattened samples, d = prod(input_shape), or
                a linear callable `A(x)` for x (bsz, *input_shape) -> (bsz, m).
            noise_std: s >= 0 (0: noiseless observations).
            input_shape: the shape of one sample.
            dtype, device: where to compute (default: y's).

        Raises:
            TypeError: y or a matrix that is not a floating-point tensor; an operator that is
                neither a tensor nor callable; a callable that does not return a tensor.
            ValueError: shapes that do not fit (the message gives the expected ones), NaN or
                inf in y or A, a negative noise_std.
        """
        shape = tuple(int(s) for s in input_shape)
        d = math.prod(shape)
        s = _validation.check_number("noise_std", noise_std, min=0.0)
        y = _floating("y", y)
        if y.dim() == 1:
            y = y[None]
        if y.dim() != 2 or y.shape[0] < 1:
            raise ValueError(
                f"y must have shape (bsz, m) (one observation vector per sample) or (m,), got "
                f"{tuple(y.shape)}; for inpainting use inpaint(x_known, known_mask)"
            )
        dtype = y.dtype if dtype is None else dtype
        device = y.device if device is None else torch.device(device)
        y = y.to(device=device, dtype=dtype)
        _finite("y", y)
        m = y.shape[1]
        if isinstance(operator, Tensor):
            A = _floating("operator", operator)
            if A.dim() != 2 or tuple(A.shape) != (m, d):
                raise ValueError(
                    f"operator matrix must have shape (m, d) = ({m}, {d}) (m: y.shape[1], d: "
                    f"prod(input_shape={shape})), got {tuple(A.shape)}"
                )
            cols = _selection_columns(A.detach().cpu())  # one transfer, at setup
            A = A.to(device=device, dtype=dtype)
            _finite("operator", A)
            if cols is not None:
                cols = cols.to(device)
                bsz = y.shape[0]
                mask = torch.zeros(1, d, device=device, dtype=dtype)
                mask[:, cols] = 1
                full = torch.zeros(bsz, d, device=device, dtype=dtype)
                full[:, cols] = y
                return cls(full.view(bsz, *shape), s, shape, mask=mask.view(1, *shape), matrix=A)
            return cls(y, s, shape, matrix=A)
        if not callable(operator):
            raise TypeError(
                "operator must be a matrix (m, d) or a linear callable A(x) -> (bsz, m), got "
                f"{type(operator).__name__}"
            )
        probe = torch.zeros(1, *shape, device=device, dtype=dtype)
        out = operator(probe)
        if not isinstance(out, Tensor) or tuple(out.shape) != (1, m):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"the operator callable must map x (bsz, *input_shape) to (bsz, m) = (bsz, {m}) "
                f"(m: y.shape[1]); on a batch of 1 it returned {got}"
            )
        return cls(y, s, shape, fn=operator)

    @classmethod
    def masked(
        cls,
        x_known: Tensor,
        known_mask: Tensor,
        input_shape: Sequence[int],
        noise_std: float = 0.0,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Observation:
        """Check and build the inpainting observation: the entries of x_known where
        known_mask is 1 (RePaint's convention; diffusers' inpainting pipelines use 1 for the
        entries to repaint).

        Args:
            x_known: (bsz, *input_shape); values where the mask is 0 are ignored.
            known_mask: bool or 0/1 tensor broadcastable to x_known's shape, e.g.
                (*input_shape,) (one mask for all) or (bsz, 1, H, W) (per sample, all channels).
            input_shape: the shape of one sample.
            noise_std: s >= 0, the noise of the known values.

        Raises:
            TypeError: x_known not floating point, a mask that is not a tensor.
            ValueError: a wrong x_known shape, a mask that does not broadcast or holds values
                other than 0 and 1, NaN or inf in the known values.
        """
        shape = tuple(int(s) for s in input_shape)
        s = _validation.check_number("noise_std", noise_std, min=0.0)
        x = _validation.check_data(x_known, shape, "x_known")
        dtype = x.dtype if dtype is None else dtype
        device = x.device if device is None else torch.device(device)
        if not isinstance(known_mask, Tensor):
            raise TypeError(f"known_mask must be a tensor, got {type(known_mask).__name__}")
        try:
            full = torch.broadcast_shapes(known_mask.shape, x.shape)
        except RuntimeError:
            full = None
        if full != x.shape:
            raise ValueError(
                f"known_mask of shape {tuple(known_mask.shape)} must broadcast against x_known "
                f"{tuple(x.shape)}: (*input_shape,), (bsz, *input_shape) or with size-1 dims"
            )
        if known_mask.dtype != torch.bool:
            if known_mask.is_complex() or not bool(((known_mask == 0) | (known_mask == 1)).all()):
                raise ValueError("known_mask must be bool or hold only 0 and 1 (1 = known)")
        mask = known_mask.to(device=device, dtype=dtype)
        while mask.dim() < x.dim():
            mask = mask[None]
        x = x.to(device=device, dtype=dtype)
        y = x * mask
        _finite("x_known where known_mask is 1", y)
        return cls(y, s, shape, mask=mask)

    # -- the operator ----------------------------------------------------------------------------
    def repeat(self, k: int) -> Observation:
        """The observation of each sample repeated k times (rows b*k .. b*k + k - 1): the
        observation of k particles per sample."""
        if k == 1:
            return self
        mask = self.mask
        if mask is not None and mask.shape[0] > 1:
            mask = mask.repeat_interleave(k, 0)
        out = Observation(
            self.y.repeat_interleave(k, 0),
            self.noise_std,
            self.input_shape,
            mask=mask,
            matrix=self.matrix,
            fn=self.fn,
        )
        out._eig = self._eig
        return out

    def apply(self, x: Tensor) -> Tensor:
        """A x for x (B, *input_shape): (B, m), or (B, *input_shape) for a mask."""
        if self.mask is not None:
            return x * self.mask
        if self.matrix is not None:
            return x.reshape(x.shape[0], -1) @ self.matrix.T
        assert self.fn is not None
        return self.fn(x)

    def adjoint(self, r: Tensor) -> Tensor:
        """A^T r for r of `apply`'s output shape: (B, *input_shape)."""
        if self.mask is not None:
            return r * self.mask
        if self.matrix is not None:
            return (r @ self.matrix).view(r.shape[0], *self.input_shape)
        with torch.enable_grad():
            x = torch.zeros(r.shape[0], *self.input_shape, device=r.device, dtype=r.dtype)
            x.requires_grad_(True)
            (grad,) = torch.autograd.grad(self.apply(x), x, grad_outputs=r)
        return grad

    def _eigen(self) -> tuple[Tensor, Tensor]:
        """(U, lam) with A A^T = U diag(lam) U^T, eigenvalues below 1e-10 max set to 0."""
        if self._eig is None:
            y = self.y
            if self.matrix is not None:
                gram = self.matrix @ self.matrix.T
            else:  # a callable: A A^T column by column, m adjoint and m forward applications
                m = y.shape[1]
                eye = torch.eye(m, device=y.device, dtype=y.dtype)
                gram = self.apply(self.adjoint(eye))
            lam, U = torch.linalg.eigh(0.5 * (gram + gram.T))
            lam = torch.where(lam > 1e-10 * lam.abs().max().clamp_min(1e-300), lam, 0)
            self._eig = (U, lam)
        return self._eig

    def _inv_diag(self, c1: float, c2: float) -> tuple[Tensor | None, Tensor]:
        """(U or None, 1 / (c1 lam + c2) with 0 where that is 0): the pseudo-inverse of
        c1 A A^T + c2 I in A A^T's eigenbasis."""
        if self.mask is not None:
            d = c1 * self.mask + c2
            U = None
        else:
            U, lam = self._eigen()
            d = c1 * lam + c2
        return U, torch.where(d > 0, 1 / torch.where(d > 0, d, 1), 0)

    def solve(self, r: Tensor, c1: float, c2: float) -> Tensor:
        """(c1 A A^T + c2 I)^+ r for r of `apply`'s output shape."""
        U, inv = self._inv_diag(c1, c2)
        if U is None:
            return r * inv
        return ((r @ U) * inv) @ U.T

    def quad(self, r: Tensor, c1: float, c2: float) -> Tensor:
        """r^T (c1 A A^T + c2 I)^+ r per row, (B,)."""
        U, inv = self._inv_diag(c1, c2)
        if U is None:
            return (r * r * inv).reshape(r.shape[0], -1).sum(1)
        c = r @ U
        return (c * c * inv).sum(1)

    def norm2(self, r: Tensor) -> Tensor:
        """Squared norm of each row of an observation-space tensor, (B,)."""
        return (r * r).reshape(r.shape[0], -1).sum(1)


def _floating(name: str, value: Any) -> Tensor:
    if not isinstance(value, Tensor) or not value.is_floating_point():
        got = f"a {value.dtype} tensor" if isinstance(value, Tensor) else type(value).__name__
        raise TypeError(f"{name} must be a floating-point tensor, got {got}")
    return value


def _finite(name: str, value: Tensor) -> None:
    if value.device.type == "cpu" and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} holds NaN or inf; pass finite values")


def _selection_columns(A: Tensor) -> Tensor | None:
    """The observed columns if A is a selection matrix (one 1 per row, zeros elsewhere,
    distinct columns), else None."""
    if A.shape[0] > A.shape[1]:
        return None
    ones = A == 1
    if not bool(((A == 0) | ones).all()) or not bool((ones.sum(1) == 1).all()):
        return None
    cols = ones.to(torch.int64).argmax(1)
    return cols if cols.unique().numel() == cols.numel() else None


# -- the method contract and registry ---------------------------------------------------------------
class PosteriorMethod:
    """Base class of posterior sampling methods. Options are keyword arguments of `__init__`.

    Subclasses implement `run`; particle methods set `num_particles`, methods that need
    gradients through the denoiser set `needs_grad`, and `calls` states the cost.
    """

    num_particles: int = 1
    """Particles per sample: the denoiser is called on bsz * num_particles rows."""
    needs_grad: bool = False
    """Whether `run` differentiates through the denoiser (it then runs with autograd on)."""

    def calls(self, num_steps: int) -> int:
        """Network evaluations per sample (a backward pass counts as one) for `num_steps`."""
        return num_steps * self.num_particles

    def run(
        self,
        denoiser: Denoiser,
        process: GaussianProcess,
        times: Tensor,
        obs: Observation,
        *,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
        progress: bool = False,
    ) -> Tensor:
        """Draw one posterior sample per row of the observation.

        Args:
            denoiser: the model as samplers see it, for bsz * num_particles rows.
            process: the Gaussian process of the model.
            times: float64 (S + 1,), strictly decreasing from T to 0.
            obs: the observation (bsz rows).
            generator: source of all randomness.
            callback: `callback(i, t_next, x_next, x0_hat)` after each step (particle
                methods: x_next holds all particles, (bsz * num_particles, *input_shape));
                a returned tensor replaces x_next.
            progress: show a progress bar.

        Returns:
            (bsz, *input_shape) samples.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({opts})"


REGISTRY: Registry[type[PosteriorMethod]] = Registry(
    "posterior method",
    class_check(
        "a posterior method must be a subclass of tinydiff.posterior.PosteriorMethod",
        base=PosteriorMethod,
    ),
)
register = REGISTRY.register
get = REGISTRY.get
names = REGISTRY.names

DEFAULT_METHOD = "mmps"
"""The method used when none is named: `mmps`, the best value per network call in high
dimension (0.1-0.3x RePaint's energy distance at 20-50 calls on a 64-d mixture) and never far
off in low dimension; `mcgdiff` is the consistent one, but its weights degenerate when many
coordinates are observed (34x the floor at 1000 calls on the 64-d mixture), and `repaint`
is the better choice for masks in low dimension (`benchmarks/posterior_quality.py`)."""


def build(name: str | None = None, options: Mapping[str, Any] | None = None) -> PosteriorMethod:
    """Instantiate the registered method `name` (default `DEFAULT_METHOD`) with
    `options`.

    Raises:
        ValueError: unknown name (with close matches) or a bad option value.
        TypeError: an unknown option name; the message lists the accepted ones.
    """
    name = DEFAULT_METHOD if name is None else name
    if not isinstance(name, str):
        raise TypeError(
            f"method must be a registered name ({', '.join(names())}), got {type(name).__name__}"
        )
    options = _validation.check_kwargs_dict("method_kwargs", options) or {}
    what = f"method_kwargs {options} for posterior method {name!r}"
    return instantiate(get(name), options, what)  # type: ignore[no-any-return]


# -- shared step helpers ------------------------------------------------------------------------------
class _Steps:
    """The plan of a run as Python floats (no host sync in the loop): alpha and sigma at the
    times, the network points, and per step the ancestral kernel from t_i to t_{i+1}
    (`tinydiff.variances.gaussian_posterior`)."""

    def __init__(self, process: GaussianProcess, times: Tensor, like: Tensor) -> None:
        t = torch.as_tensor(times, dtype=torch.float64).cpu()
        if t.dim() != 1 or t.numel() < 2:
            raise ValueError(f"times must be 1-d with at least 2 entries, got {tuple(t.shape)}")
        if not bool((t[1:] < t[:-1]).all()) or float(t[-1]) != 0.0:
            raise ValueError(f"times must be strictly decreasing and end at 0, got {t.tolist()}")
        process.check_times(t)
        alpha, sigma = process.alpha_sigma(t)
        self.t = t.tolist()
        self.alpha = alpha.tolist()
        self.sigma = sigma.tolist()
        self.num_steps = t.numel() - 1
        self.points = process.points(t).to(device=like.device)
        self.prior_std = process.prior_std()

    def point(self, i: int) -> Tensor:
        return self.points[i]

    def kernel(self, i: int, j: int | None = None) -> tuple[float, float, float]:
        """(coef_x0, coef_eps, var) of the ancestral step from t_i to t_j (default i + 1):
        x_j = coef_x0 x0 + coef_eps eps + sqrt(var) z, the posterior q(x_j | x_i, x0) written
        with eps = (x_i - alpha_i x0) / sigma_i."""
        j = i + 1 if j is None else j
        a_t, s_t, a_s, s_s = (
            torch.tensor(v, dtype=torch.float64)
            for v in (self.alpha[i], self.sigma[i], self.alpha[j], self.sigma[j])
        )
        c_x0, c_xt, _, var = gaussian_posterior(a_t, s_t, a_s, s_s)
        # c_x0 x0 + c_xt x_t = (c_x0 + c_xt a_t) x0 + c_xt s_t eps
        return float(c_x0 + c_xt * a_t), float(c_xt * s_t), float(var.clamp_min(0))


def _eta_step(
    steps: _Steps, i: int, x0: Tensor, eps: Tensor, eta: float, gen: torch.Generator | None
) -> Tensor:
    """The step from t_i to t_{i+1} with x0 and eps (DDIM with eta; eta = 1: ancestral)."""
    a_s, s_s = steps.alpha[i + 1], steps.sigma[i + 1]
    _, _, var = steps.kernel(i)
    c_noise = eta * math.sqrt(var)
    c_eps = math.sqrt(max(s_s * s_s - c_noise * c_noise, 0.0))
    out = a_s * x0 + c_eps * eps
    if c_noise > 0:
        out = out + c_noise * torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
    return out


class _Net:
    """The denoiser during a run: carries the guidance state from call to call."""

    def __init__(self, denoiser: Denoiser, x: Tensor) -> None:
        self.denoiser = denoiser
        self.state = denoiser.init_state(x)
        guided = denoiser.guidance is not None
        self.index = torch.zeros((), dtype=torch.int64, device=x.device) if guided else None

    def __call__(self, x: Tensor, point: Tensor) -> Prediction:
        pred, state = self.denoiser.predict(x, Point.of(point, x), self.state, self.index)
        self.state = tuple(s.detach() for s in state)
        return pred

    def next_step(self) -> None:
        if self.index is not None:
            self.index = self.index + 1


def _noise(x: Tensor, gen: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)


def _start(obs: Observation, steps: _Steps, k: int, gen: torch.Generator | None) -> Tensor:
    """x at times[0]: N(0, prior_std^2 I), (bsz * k, *input_shape)."""
    shape = (obs.bsz * k, *obs.input_shape)
    x = torch.randn(shape, generator=gen, device=obs.y.device, dtype=obs.y.dtype)
    return x if steps.prior_std == 1.0 else x * steps.prior_std


def _check_eta(eta: Any, owner: str) -> float:
    return _validation.check_number("eta", eta, min=0.0, max=1.0, owner=owner)


class _Loop:
    """Callback and progress bar of a run."""

    def __init__(self, total: int, callback: Callback | None, progress: bool) -> None:
        self.callback = callback
        self.bar = progress_bar(total=total, desc="posterior", leave=False) if progress else None

    def after(self, i: int, t_next: float, x: Tensor, x0: Tensor | None) -> Tensor:
        if self.bar is not None:
            self.bar.update(1)
        if self.callback is None:
            return x
        out = self.callback(i, t_next, x, x0)
        return x if out is None else check_replacement(out, x, i, "posterior")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- the methods ------------------------------------------------------------------------------------
@register("repaint")
class RePaint(PosteriorMethod):
    r"""Replacement with resampling jumps (Lugmayr et al. 2022, Alg. 1); masks only.

    Each step from t to s draws the unknown entries from the ancestral kernel and the known
    ones from the forward process, $x_s^{known} = \alpha_s y + \sqrt{\max(\sigma_s^2 -
    \alpha_s^2 s^2, 0)}\,z$; at s = 0 the known entries equal y exactly. After reaching a
    step index k with $S - k \in \{0, j, 2j, \dots\}$ and $k > j$ (j = `jump_length`; the
    paper's schedule, which also jumps back from the clean sample), the sample is noised
    back `jump_length` steps by $q(x_{t_{k - j}} \mid x_{t_k})$ and the steps are redone,
    `num_resample - 1` times, which harmonises known and generated parts.

    Cost: $S + (r - 1)\,j\,\lfloor (S - 1)/j \rfloor$ network calls per sample (S steps, j =
    `jump_length`, r = `num_resample`); r = 1 is plain replacement. Biased: the known
    entries are not conditioned on through the prior, so mixture weights of the posterior
    are wrong; the jumps reduce but do not remove the bias.

    Args:
        jump_length: j >= 1, steps per jump.
        num_resample: r >= 1, passes over each jumped stretch (1: no jumps).
        eta: 1 (ancestral, the paper's) or less (0: DDIM steps for the unknown entries).
    """

    def __init__(self, jump_length: int = 10, num_resample: int = 10, eta: float = 1.0) -> None:
        self.jump_length = _validation.check_int("jump_length", jump_length, min=1, owner="repaint")
        self.num_resample = _validation.check_int(
            "num_resample", num_resample, min=1, owner="repaint"
        )
        self.eta = _check_eta(eta, "repaint")

    def moves(self, num_steps: int) -> list[tuple[int, int]]:
        """The index moves (from, to) on the S + 1 times: down by one (a network call) or up
        by `jump_length` (forward noising)."""
        j, out = self.jump_length, []
        for k in range(1, num_steps + 1):
            out.append((k - 1, k))
            # the paper's schedule: jumps at t = 0, j, 2j, ... < S - j steps from the end
            if k > j and (num_steps - k) % j == 0:
                for _ in range(self.num_resample - 1):
                    out.append((k, k - j))
                    out.extend((n - 1, n) for n in range(k - j + 1, k + 1))
        return out

    def calls(self, num_steps: int) -> int:
        return sum(1 for a, b in self.moves(num_steps) if b > a)

    def run(
        self,
        denoiser: Denoiser,
        process: GaussianProcess,
        times: Tensor,
        obs: Observation,
        *,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
        progress: bool = False,
    ) -> Tensor:
        if obs.mask is None:
            raise ValueError(
                "repaint replaces observed entries: it needs a mask (inpaint) or a selection "
                f"matrix; for a general operator use one of {[n for n in names() if n != 'repaint']}"
            )
        steps = _Steps(process, times, obs.y)
        x = _start(obs, steps, 1, generator)
        net = _Net(denoiser, x)
        mask, y, s = obs.mask, obs.y, obs.noise_std
        moves = self.moves(steps.num_steps)
        loop = _Loop(sum(1 for a, b in moves if b > a), callback, progress)
        i = 0
        try:
            for a, b in moves:
                if b < a:  # noise back up: q(x_{t_b} | x_{t_a})
                    ratio = steps.alpha[b] / steps.alpha[a]
                    var = steps.sigma[b] ** 2 - ratio**2 * steps.sigma[a] ** 2
                    x = ratio * x + math.sqrt(max(var, 0.0)) * _noise(x, generator)
                    continue
                pred = net(x, steps.point(a))
                net.next_step()
                unknown = _eta_step(steps, a, pred.x0, pred.eps, self.eta, generator)
                a_s, s_s = steps.alpha[b], steps.sigma[b]
                known_std = math.sqrt(max(s_s**2 - (a_s * s) ** 2, 0.0))
                known = a_s * y + (known_std * _noise(x, generator) if known_std > 0 else 0)
                x = mask * known + (1 - mask) * unknown
                x = loop.after(i, steps.t[b], x, pred.x0)
                i += 1
        finally:
            loop.close()
        return x


def _grad_pred(net: _Net, x: Tensor, point: Tensor) -> tuple[Tensor, Prediction]:
    """(x with requires_grad, the prediction at it, with its graph)."""
    x = x.detach().requires_grad_(True)
    return x, net(x, point)


@register("dps")
class DPS(PosteriorMethod):
    r"""Diffusion posterior sampling (Chung et al. 2023, Alg. 1).

    Each step takes the ancestral (`eta` = 1) or DDIM step with the denoiser's
    $(\hat x_0, \hat\epsilon)$, then moves along the gradient of the residual norm through
    the denoiser: $x_s \leftarrow x_s - \zeta\,\nabla_{x_t}\lVert y - A\hat x_0(x_t)\rVert$,
    per sample (the authors' code; $\zeta$ = `step_size`).

    Cost: 2 network calls per step (a forward and a backward pass). Biased: the likelihood
    $p(y \mid x_t)$ is replaced by a point estimate at $\hat x_0$ with a hand-set step, so
    the samples are neither the posterior's spread nor its mixture weights; `noise_std`
    is not used.

    Args:
        step_size: zeta > 0.
        eta: in [0, 1] (1: ancestral steps, as in the paper).
    """

    needs_grad = True

    def __init__(self, step_size: float = 1.0, eta: float = 1.0) -> None:
        self.step_size = _validation.check_number("step_size", step_size, min=0.0, owner="dps")
        self.eta = _check_eta(eta, "dps")

    def calls(self, num_steps: int) -> int:
        return 2 * num_steps

    def run(
        self,
        denoiser: Denoiser,
        process: GaussianProcess,
        times: Tensor,
        obs: Observation,
        *,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
        progress: bool = False,
    ) -> Tensor:
        steps = _Steps(process, times, obs.y)
        x = _start(obs, steps, 1, generator)
        net = _Net(denoiser, x)
        loop = _Loop(steps.num_steps, callback, progress)
        try:
            for i in range(steps.num_steps):
                with torch.enable_grad():
                    xg, pred = _grad_pred(net, x, steps.point(i))
                    norm = obs.norm2(obs.y - obs.apply(pred.x0)).clamp_min(1e-300).sqrt()
                    (grad,) = torch.autograd.grad(norm.sum(), xg)
                net.next_step()
                x0, eps = pred.x0.detach(), pred.eps.detach()
                x = _eta_step(steps, i, x0, eps, self.eta, generator) - self.step_size * grad
                x = loop.after(i, steps.t[i + 1], x, x0)
        finally:
            loop.close()
        return x


@register("mmps")
class MMPS(PosteriorMethod):
    r"""Moment-matching posterior sampling (Rozet et al. 2024), a Tweedie-covariance method.

    At x_t the posterior of x_0 is approximated by a Gaussian with Tweedie's mean and
    covariance, $\hat x_0 = D(x_t)$ and $V = \mathrm{Cov}[x_0 \mid x_t] =
    \frac{\sigma_t^2}{\alpha_t}\,\partial D/\partial x_t$; conditioning it on y gives

    $$\hat x_0^y = \hat x_0 + V A^\top (s^2 I + A V A^\top)^{-1} (y - A\hat x_0),$$

    the system solved by `cg_iters` conjugate-gradient iterations whose products with V
    are vector-Jacobian products through the denoiser (no Jacobian is formed). The step
    then uses $(\hat x_0^y, \hat\epsilon^y = (x_t - \alpha_t \hat x_0^y)/\sigma_t)$. With
    $V = r_t^2 I$ in the solve this is PiGDM (Song et al. 2023).

    Cost: 1 forward and `cg_iters` + 1 backward passes per step: (2 + `cg_iters`)
    network calls. Biased on non-Gaussian priors (the Gaussian approximation of
    $p(x_0 \mid x_t)$), exact for a Gaussian prior with enough CG iterations.

    Args:
        cg_iters: conjugate-gradient iterations >= 1 (exact after m, the observation size).
        eta: in [0, 1] (1: ancestral steps).
    """

    needs_grad = True

    def __init__(self, cg_iters: int = 1, eta: float = 1.0) -> None:
        self.cg_iters = _validation.check_int("cg_iters", cg_iters, min=1, owner="mmps")
        self.eta = _check_eta(eta, "mmps")

    def calls(self, num_steps: int) -> int:
        return (2 + self.cg_iters) * num_steps

    def run(
        self,
        denoiser: Denoiser,
        process: GaussianProcess,
        times: Tensor,
        obs: Observation,
        *,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
        progress: bool = False,
    ) -> Tensor:
        steps = _Steps(process, times, obs.y)
        x = _start(obs, steps, 1, generator)
        net = _Net(denoiser, x)
        s2 = obs.noise_std**2
        loop = _Loop(steps.num_steps, callback, progress)

        def dot(a: Tensor, b: Tensor) -> Tensor:
            return (a * b).reshape(a.shape[0], -1).sum(1).view(-1, *([1] * (a.dim() - 1)))

        try:
            for i in range(steps.num_steps):
                a_t, s_t = steps.alpha[i], steps.sigma[i]
                scale = s_t * s_t / a_t if a_t > 0 else 0.0
                with torch.enable_grad():
                    xg, pred = _grad_pred(net, x, steps.point(i))
                    x0 = pred.x0

                    def cov(
                        v: Tensor, xg: Tensor = xg, x0: Tensor = x0, c: float = scale
                    ) -> Tensor:
                        (g,) = torch.autograd.grad(x0, xg, grad_outputs=v, retain_graph=True)
                        return c * g

                    def matvec(u: Tensor) -> Tensor:
                        return s2 * u + obs.apply(cov(obs.adjoint(u)))

                    if a_t > 0:  # at alpha = 0 (rectified flow's T) x_t says nothing of x0
                        r = obs.y - obs.apply(x0.detach())
                        u = torch.zeros_like(r)
                        p, rr = r, dot(r, r)
                        for _ in range(self.cg_iters):
                            q = matvec(p)
                            pq = dot(p, q)
                            step = torch.where(pq > 0, rr / pq.clamp_min(1e-300), 0)
                            u = u + step * p
                            r = r - step * q
                            rr_new = dot(r, r)
                            p = r + torch.where(rr > 0, rr_new / rr.clamp_min(1e-300), 0) * p
                            rr = rr_new
                        x0_y = (x0 + cov(obs.adjoint(u))).detach()
                    else:
                        x0_y = x0.detach()
                net.next_step()
                eps_y = (x - a_t * x0_y) / s_t
                x = _eta_step(steps, i, x0_y, eps_y, self.eta, generator)
                x = loop.after(i, steps.t[i + 1], x, x0_y)
        finally:
            loop.close()
        return x


@register("mcgdiff")
class MCGDiff(PosteriorMethod):
    r"""Sequential Monte Carlo with Gaussian-conditioned proposals (MCGdiff, Cardoso et al.
    2024), for any linear A via the Gaussian gain form.

    Each sample carries K = `num_particles` particles targeting $p(x_t)\,g_t(x_t)$ with
    the potential $g_t(x_t) = \mathcal N(\alpha_t y;\, A x_t,\, \Sigma_t)$, $\Sigma_t =
    \sigma_t^2 A A^\top + \alpha_t^2 s^2 I$ (the law of $A x_t$ when $A x_0$ is the
    observation); $g_0$ is the likelihood $\mathcal N(y; A x_0, s^2 I)$. A step from t to
    s moves each particle by the ancestral kernel $\mathcal N(m, v I)$ conditioned on
    $A x_s \sim \mathcal N(\alpha_s y, \Sigma_s)$:

    $$x_s = x' + v A^\top S^{-1}(\alpha_s y - A x' - e),\quad x' = m + \sqrt v\,z,\quad
    e \sim \mathcal N(0, \Sigma_s),\quad S = (v + \sigma_s^2) A A^\top + \alpha_s^2 s^2 I,$$

    and reweights it by $\mathcal N(\alpha_s y; A m, S) / g_t(x_t)$; particles are resampled
    (`resampling`) where the effective sample size falls below `ess_threshold` K. The
    last step, from $t_1$ to 0, is the ancestral chain's ($x_0 = \hat x_0$) for noise_std > 0;
    for noiseless observations it is $\mathcal N(\hat x_0, r^2 P)$, $P = A^\top (A
    A^\top)^+ A$ the projection on A's row space and $r^2 = \sigma_{t_1}^2 / (\alpha_{t_1}^2
    + \sigma_{t_1}^2)$ (Tweedie's variance for unit-variance data), so that the observed
    directions have a density and the others end at $\hat x_0$ as in the chain. One sample per row is drawn from
    the final weights.

    Cost: S x K network calls per sample, no backward pass; A A^T is diagonalised once
    (free for masks; for a callable, m applications of A and of its adjoint). Consistent:
    as K grows the samples tend to the posterior of the discretised model (the ancestral
    chain, whose error vanishes as the steps grow). For noise_std = 0 and a mask this is
    Cardoso et al.'s algorithm; here the potentials are written in A's own space.

    Args:
        num_particles: K >= 1.
        ess_threshold: resample where ESS < ess_threshold K, in [0, 1] (1: every step).
        resampling: `"systematic"` or `"multinomial"`.
    """

    def __init__(
        self,
        num_particles: int = 16,
        ess_threshold: float = 0.5,
        resampling: str = "systematic",
    ) -> None:
        self.num_particles = _validation.check_int(
            "num_particles", num_particles, min=1, owner="mcgdiff"
        )
        self.ess_threshold = _validation.check_number(
            "ess_threshold", ess_threshold, min=0.0, max=1.0, owner="mcgdiff"
        )
        if resampling not in ("systematic", "multinomial"):
            raise ValueError(
                f"mcgdiff resampling must be 'systematic' or 'multinomial', got {resampling!r}"
            )
        self.resampling = resampling

    def run(
        self,
        denoiser: Denoiser,
        process: GaussianProcess,
        times: Tensor,
        obs: Observation,
        *,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
        progress: bool = False,
    ) -> Tensor:
        k, bsz = self.num_particles, obs.bsz
        steps = _Steps(process, times, obs.y)
        part = obs.repeat(k)
        y, s2 = part.y, obs.noise_std**2
        x = _start(obs, steps, k, generator)
        net = _Net(denoiser, x)

        def log_g(i: int, x: Tensor) -> Tensor:
            a, sd = steps.alpha[i], steps.sigma[i]
            return -0.5 * part.quad(a * y - part.apply(x), sd * sd, a * a * s2)

        lg = log_g(0, x)
        logw = lg.view(bsz, k)
        loop = _Loop(steps.num_steps, callback, progress)
        try:
            for i in range(steps.num_steps):
                idx, logw = self._resample(logw, generator)
                flat = (idx + k * torch.arange(bsz, device=idx.device)[:, None]).reshape(-1)
                x, lg = x[flat], lg[flat]
                pred = net(x, steps.point(i))
                net.next_step()
                last = i == steps.num_steps - 1
                z = _noise(pred.x0, generator)
                if last and s2 == 0:  # noise only in A's row space: P z = A^T (A A^T)^+ A z
                    a_t, s_t = steps.alpha[i], steps.sigma[i]
                    m, v = pred.x0, s_t * s_t / (a_t * a_t + s_t * s_t)
                    z = part.adjoint(part.solve(part.apply(z), 1.0, 0.0))
                elif last:  # the ancestral chain's own last step: x0 = x0_hat
                    m, v = pred.x0, 0.0
                else:
                    c_x0, c_eps, v = steps.kernel(i)
                    m = c_x0 * pred.x0 + c_eps * pred.eps
                a_s, s_s = steps.alpha[i + 1], steps.sigma[i + 1]
                c1, c2 = v + s_s * s_s, a_s * a_s * s2
                x_prop = m + math.sqrt(v) * z
                e = s_s * part.apply(_noise(m, generator))
                if c2 > 0:
                    e = e + a_s * obs.noise_std * _noise(e, generator)
                innov = a_s * y - part.apply(x_prop) - e
                x = x_prop + v * part.adjoint(part.solve(innov, c1, c2))
                lg_new = log_g(i + 1, x)
                inc = -0.5 * part.quad(a_s * y - part.apply(m), c1, c2) - lg
                logw = logw + inc.view(bsz, k)
                lg = lg_new
                x = loop.after(i, steps.t[i + 1], x, pred.x0)
        finally:
            loop.close()
        choice = torch.multinomial(torch.softmax(logw, 1), 1, generator=generator)[:, 0]
        return x.reshape(bsz, k, *obs.input_shape)[torch.arange(bsz, device=x.device), choice]

    def _resample(self, logw: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """(ancestor indices (bsz, K), log weights after): resampled rows where the ESS is
        below the threshold (chosen with torch.where: no host sync), kept elsewhere."""
        bsz, k = logw.shape
        w = torch.softmax(logw, 1)
        keep = torch.arange(k, device=logw.device).expand(bsz, k)
        if k == 1:
            return keep, torch.zeros_like(logw)
        if self.resampling == "systematic":
            u = torch.rand(bsz, 1, generator=generator, device=w.device, dtype=w.dtype)
            pos = (u + torch.arange(k, device=w.device, dtype=w.dtype)) / k
            cdf = w.cumsum(1)
            cdf = cdf / cdf[:, -1:]
            idx = torch.searchsorted(cdf, pos).clamp_max(k - 1)
        else:
            idx = torch.multinomial(w, k, replacement=True, generator=generator)
        ess = 1.0 / (w * w).sum(1, keepdim=True)
        do = ess < self.ess_threshold * k
        if self.ess_threshold >= 1.0:
            do = torch.ones_like(do)
        idx = torch.where(do, idx, keep)
        return idx, torch.where(do, torch.zeros_like(logw), logw)


# -- functional forms ----------------------------------------------------------------------------------
def _method(method: str | PosteriorMethod | None, options: Mapping[str, Any] | None) -> Any:
    if isinstance(method, PosteriorMethod):
        if options:
            raise ValueError("method_kwargs apply to a method name, not to a PosteriorMethod")
        return method
    return build(method, options)


def _run(
    denoiser: Denoiser,
    process: GaussianProcess,
    times: Tensor,
    obs: Observation,
    method: str | PosteriorMethod | None,
    method_kwargs: Mapping[str, Any] | None,
    generator: torch.Generator | None,
    callback: Callback | None,
    progress: bool,
) -> Tensor:
    solver = _method(method, method_kwargs)
    generator = _validation.check_generator(generator)
    grad = torch.enable_grad() if solver.needs_grad else torch.no_grad()
    with grad:
        out = solver.run(
            denoiser, process, times, obs, generator=generator, callback=callback, progress=progress
        )
    return out.detach()


def sample(
    denoiser: Denoiser,
    process: GaussianProcess,
    times: Tensor,
    y: Tensor,
    operator: Tensor | LinearCallable,
    noise_std: float,
    input_shape: Sequence[int],
    *,
    method: str | PosteriorMethod | None = None,
    method_kwargs: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """Posterior samples for y = A x + noise_std n, one per row of y (functional form of
    `PosteriorMixin.posterior_sample`).

    Args:
        denoiser: the model as samplers see it; for a particle method its condition must
            have bsz * num_particles rows.
        process: the model's Gaussian process.
        times: float64 (S + 1,), strictly decreasing from T to 0.
        y: (bsz, m) (or (m,)).
        operator: a matrix (m, d) or a linear callable (bsz, *input_shape) -> (bsz, m).
        noise_std: >= 0.
        input_shape: the shape of one sample.
        method: a registered name (`names`; default `DEFAULT_METHOD`) or a `PosteriorMethod`.
        method_kwargs: the options of a named method.
        generator: source of all randomness.
        callback: `callback(i, t_next, x_next, x0_hat)` after each step.
        progress: show a progress bar.

    Returns:
        (bsz, *input_shape).
    """
    obs = Observation.linear(y, operator, noise_std, input_shape)
    return _run(denoiser, process, times, obs, method, method_kwargs, generator, callback, progress)


def inpaint(
    denoiser: Denoiser,
    process: GaussianProcess,
    times: Tensor,
    x_known: Tensor,
    known_mask: Tensor,
    *,
    noise_std: float = 0.0,
    method: str | PosteriorMethod | None = None,
    method_kwargs: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """Inpainting: fill in x_known where known_mask is 0 (functional form of
    `PosteriorMixin.inpaint`; the masked case of `sample`)."""
    obs = Observation.masked(x_known, known_mask, tuple(x_known.shape[1:]), noise_std)
    return _run(denoiser, process, times, obs, method, method_kwargs, generator, callback, progress)


# -- the model's methods -----------------------------------------------------------------------------
class PosteriorMixin:
    """`posterior_sample` and `inpaint` for `tinydiff.DiffusionModel` (thin delegates)."""

    input_shape: tuple[int, ...]
    process: GaussianProcess
    nn_module: torch.nn.Module

    def posterior_sample(
        self,
        y: Tensor,
        operator: Tensor | LinearCallable,
        noise_std: float,
        sampling_timesteps: int | None = None,
        *,
        method: str | PosteriorMethod | None = None,
        method_kwargs: dict[str, Any] | None = None,
        timestep_spacing: str | Sequence[float] | Tensor | None = None,
        cond: dict[str, Any] | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        guidance: str | Guidance | None = None,
        guidance_kwargs: dict[str, Any] | None = None,
        use_ema: bool = False,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
        compile: bool = False,
        progress: bool = False,
    ) -> Tensor:
        r"""Sample $p(x \mid y)$ for $y = A x + s\,n$ (`tinydiff.posterior`), one sample per
        row of y. Everything is checked before the first network call.

        Args:
            y: (bsz, m) observations, or (m,) for one; repeat a row for several samples.
            operator: A as a matrix (m, d) over flattened samples (d = prod(input_shape)) or
                a linear callable mapping x (bsz, *input_shape) to (bsz, m). A selection
                matrix is run as a mask (`inpaint`).
            noise_std: s >= 0 (0: noiseless).
            sampling_timesteps: S, the number of steps (default T).
            method: a `tinydiff.posterior` method name (default `"mmps"`, `DEFAULT_METHOD`) or object.
            method_kwargs: the method's options (e.g. `{"num_particles": 32}`).
            timestep_spacing: a spacing name or explicit times (default: config's, else the
                `ddpm` sampler's).
            cond: keyword arguments of the network, tensors with leading dim bsz.
            guidance_scale: w of classifier-free guidance (or of `guidance`).
            guidance_rescale: phi in [0, 1].
            guidance: a guidance method name or strategy (`tinydiff.guidance`).
            guidance_kwargs: its options.
            use_ema: use the EMA weights.
            generator: source of all randomness, on the network's device.
            callback: `callback(i, t_next, x_next, x0_hat)` after each step; may replace
                x_next (particle methods: all particles, (bsz K, *input_shape)).
            compile: run the network compiled (`torch.compile` with the options of
                `compile_sampler`: backend and mode). The methods' own loops (gradients,
                particles, resampling jumps) stay eager.
            progress: show a progress bar.

        Returns:
            (bsz, *input_shape) in the network's dtype.

        Raises:
            TypeError, ValueError: bad shapes, dtypes or options (see
                `tinydiff.posterior.Observation.linear`).
        """
        dtype, device = _validation.dtype_device(self.nn_module)
        obs = Observation.linear(
            y, operator, noise_std, self.input_shape, dtype=dtype, device=device
        )
        return self._posterior(
            obs, sampling_timesteps, method, method_kwargs, timestep_spacing, cond,
            guidance_scale, guidance_rescale, guidance, guidance_kwargs, use_ema, generator,
            callback, compile, progress,
        )  # fmt: skip

    def inpaint(
        self,
        x_known: Tensor,
        known_mask: Tensor,
        sampling_timesteps: int | None = None,
        *,
        noise_std: float = 0.0,
        method: str | PosteriorMethod | None = None,
        method_kwargs: dict[str, Any] | None = None,
        timestep_spacing: str | Sequence[float] | Tensor | None = None,
        cond: dict[str, Any] | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        guidance: str | Guidance | None = None,
        guidance_kwargs: dict[str, Any] | None = None,
        use_ema: bool = False,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
        compile: bool = False,
        progress: bool = False,
    ) -> Tensor:
        """Fill in the unknown entries of x_known: posterior samples given the entries where
        `known_mask` is 1 (`posterior_sample` with A selecting them).

        `known_mask` is 1 (True) where the value is known: RePaint's convention. diffusers'
        inpainting pipelines use the opposite (`mask_image` 1 = repaint), so pass
        `1 - mask` when coming from them. The arguments not listed here (`method_kwargs`,
        `timestep_spacing`, `cond`, the guidance options, `use_ema`, `generator`, `callback`,
        `compile`, `progress`) are those of `posterior_sample`.

        Args:
            x_known: (bsz, *input_shape); the values at unknown entries are ignored.
            known_mask: bool or 0/1, broadcastable to x_known (e.g. (*input_shape,) or
                (bsz, 1, H, W)).
            sampling_timesteps: S.
            noise_std: noise of the known values (default 0: kept exactly by `repaint`).
            method: as for `posterior_sample` (default `"mmps"`).

        Returns:
            (bsz, *input_shape) in the network's dtype.
        """
        dtype, device = _validation.dtype_device(self.nn_module)
        obs = Observation.masked(
            x_known, known_mask, self.input_shape, noise_std, dtype=dtype, device=device
        )
        return self._posterior(
            obs, sampling_timesteps, method, method_kwargs, timestep_spacing, cond,
            guidance_scale, guidance_rescale, guidance, guidance_kwargs, use_ema, generator,
            callback, compile, progress,
        )  # fmt: skip

    def _posterior(
        self,
        obs: Observation,
        sampling_timesteps: int | None,
        method: str | PosteriorMethod | None,
        method_kwargs: dict[str, Any] | None,
        timestep_spacing: str | Sequence[float] | Tensor | None,
        cond: dict[str, Any] | None,
        guidance_scale: float | None,
        guidance_rescale: float,
        guidance: str | Guidance | None,
        guidance_kwargs: dict[str, Any] | None,
        use_ema: bool,
        generator: torch.Generator | None,
        callback: Callback | None,
        compile: bool,
        progress: bool,
    ) -> Tensor:
        model: Any = self
        solver = _method(method, method_kwargs)
        generator = _validation.check_generator(generator)
        times = model.sampling_timesteps(sampling_timesteps, timestep_spacing, sampler="ddpm")
        network = model.network(use_ema)
        # the methods run their own loops (with gradients, particles, jumps): compile=True
        # compiles the network they call, with the model's `compile_sampler` options
        called = model._compile_options.compile(network) if compile else network
        if cond is not None:
            cond = conditioning.check_cond(network, cond, obs.bsz, device=obs.y.device)
            k = solver.num_particles
            if k > 1:
                cond = {
                    key: v.repeat_interleave(k, 0) if isinstance(v, Tensor) and v.dim() else v
                    for key, v in cond.items()
                }
        denoiser = model.denoiser(
            cond=cond,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            network=called,
            guidance=guidance,
            guidance_kwargs=guidance_kwargs,
        )
        with _validation.eval_mode(network):
            return _run(
                denoiser, self.process, times, obs, solver, None, generator, callback, progress
            )
