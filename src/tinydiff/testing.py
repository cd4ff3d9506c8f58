r"""Gaussian mixtures with the exact denoiser: validate samplers, schedules and plugins
without training.

For data :math:`x_0 \sim \sum_k w_k\,\mathcal N(\mu_k, \mathrm{diag}(s_k^2))` and any
Gaussian process :math:`x_t = a\,x_0 + \sigma\,\epsilon` (:math:`a = \alpha(t)`), the
marginal of x_t is the mixture :math:`\sum_k w_k\,\mathcal N(a\mu_k, a^2 s_k^2 + \sigma^2)`,
and the optimal denoiser is available in closed form:

.. math::
    \mathbb E[x_0 \mid x_t] = \sum_k r_k(x_t)\Big(\mu_k + \frac{a s_k^2}{a^2 s_k^2 + \sigma^2}
    (x_t - a\mu_k)\Big),

with :math:`r_k` the posterior responsibilities. :class:`ExactDenoiser` turns it into the
network output a :class:`tinydiff.DiffusionModel` expects, for any registered target.

For guidance, `ClassConditionalMixture` gives each class its own mixture: the
conditional denoiser :math:`\mathbb E[x_0 \mid x_t, y]` is the same formula restricted to
class y's components, the unconditional one uses all of them (weighted by the class
probabilities), and `ClassConditionalDenoiser` is the class-conditional network (with a
null class) that a `DiffusionModel` samples with any guidance method, without training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from tinydiff import targets, variances
from tinydiff.config import DiffusionModelConfig
from tinydiff.process import GaussianProcess, Point

__all__ = [
    "ClassConditionalDenoiser",
    "ClassConditionalMixture",
    "ExactDenoiser",
    "GaussianMixture",
    "GuidedMixtureDenoiser",
    "MixtureDenoiser",
    "MixturePosterior",
    "flow_map_reference",
    "probability_flow_reference",
]


class MixtureDenoiser(Protocol):
    """Anything with an exact posterior mean ``denoise(x_t, alpha, sigma) -> E[x0 | x_t]``
    (a `GaussianMixture`, a `GuidedMixtureDenoiser`): what `probability_flow_reference`
    integrates."""

    def denoise(self, x_t: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor: ...


class GaussianMixture:
    """A mixture of axis-aligned Gaussians.

    Args:
        means: (K, *event_shape) component means.
        stds: per-component standard deviations: (K,) (isotropic), (K, *event_shape), or a
            scalar shared by all.
        weights: (K,) mixture weights, positive (normalised here); default uniform.

    All computations run in float64; outputs have the input's dtype where one is given.
    """

    def __init__(
        self,
        means: Tensor | Sequence[Any],
        stds: Tensor | float | Sequence[Any],
        weights: Tensor | Sequence[float] | None = None,
    ) -> None:
        means_t = torch.as_tensor(means, dtype=torch.float64)
        if means_t.dim() < 2:
            raise ValueError(f"means must have shape (K, *event_shape), got {tuple(means_t.shape)}")
        self.num_components = means_t.shape[0]
        self.event_shape = tuple(means_t.shape[1:])
        self.means = means_t.reshape(self.num_components, -1)
        dim = self.means.shape[1]
        stds_t = torch.as_tensor(stds, dtype=torch.float64)
        if stds_t.dim() == 0:
            stds_t = stds_t.expand(self.num_components)
        if stds_t.dim() == 1:
            if stds_t.shape[0] != self.num_components:
                raise ValueError(
                    f"stds of shape (K,) needs K = {self.num_components}, got {stds_t.shape[0]}"
                )
            stds_t = stds_t[:, None].expand(-1, dim)
        self.stds = stds_t.reshape(self.num_components, -1).expand(-1, dim).clone()
        if (self.stds <= 0).any():
            raise ValueError("stds must be positive")
        if weights is None:
            weights_t = torch.full(
                (self.num_components,), 1.0 / self.num_components, dtype=torch.float64
            )
        else:
            weights_t = torch.as_tensor(weights, dtype=torch.float64).flatten()
        if weights_t.shape != (self.num_components,) or (weights_t <= 0).any():
            raise ValueError(
                f"weights must be {self.num_components} positive numbers, got {weights_t.tolist()}"
            )
        self.weights = weights_t / weights_t.sum()

    @property
    def dim(self) -> int:
        """Number of dimensions of one sample."""
        return self.means.shape[1]

    def sample(
        self, n: int, generator: torch.Generator | None = None, *, return_components: bool = False
    ) -> Any:
        """Draw n samples, (n, *event_shape) float64 (and the component indices (n,))."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = (self.means[comp] + self.stds[comp] * noise).reshape(n, *self.event_shape)
        return (x, comp) if return_components else x

    def mean(self) -> Tensor:
        """Mixture mean, (D,) float64."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """Mixture covariance, (D, D) float64."""
        mu = self.mean()
        second = torch.einsum("k,kd,ke->de", self.weights, self.means, self.means)
        second = second + torch.diag(self.weights @ self.stds**2)
        return second - torch.outer(mu, mu)

    def _noised_log_resp(
        self, x: Tensor, a: Tensor, s: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(log w_k N(x; a mu_k, var_k)) (n, K) and var_k (n, K, D) for x (n, D), a and s (n,)
        (s defaults to sqrt(1 - a^2), variance preserving)."""
        a = a[:, None, None]
        s2 = (1 - a**2) if s is None else s[:, None, None] ** 2
        var = a**2 * self.stds[None] ** 2 + s2
        diff = x[:, None, :] - a * self.means[None]
        logp = -0.5 * ((diff**2) / var + torch.log(2 * math.pi * var)).sum(-1)
        return logp + torch.log(self.weights)[None], var

    def log_prob(self, x: Tensor) -> Tensor:
        """log density at x (n, *event_shape) -> (n,), float64."""
        x64 = x.reshape(x.shape[0], -1).to(torch.float64)
        logp, _ = self._noised_log_resp(x64, torch.ones(x64.shape[0], dtype=torch.float64))
        return torch.logsumexp(logp, dim=1)

    def responsibilities(self, x: Tensor) -> Tensor:
        """Posterior component probabilities of clean samples x, (n, K)."""
        x64 = x.reshape(x.shape[0], -1).to(torch.float64)
        logp, _ = self._noised_log_resp(x64, torch.ones(x64.shape[0], dtype=torch.float64))
        return torch.softmax(logp, dim=1)

    def posterior_mean(self, x_t: Tensor, alpha_bar: Tensor | float) -> Tensor:
        """E[x0 | x_t] for x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps.

        Args:
            x_t: (n, *event_shape).
            alpha_bar: scalar or (n,), in [0, 1].

        Returns:
            (n, *event_shape) in x_t's dtype.
        """
        ab = torch.as_tensor(alpha_bar, dtype=torch.float64)
        return self.denoise(x_t, ab.sqrt(), (1 - ab).clamp_min(0).sqrt())

    def denoise(self, x_t: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
        """E[x0 | x_t] for x_t = alpha x0 + sigma eps (any Gaussian process).

        Args:
            x_t: (n, *event_shape).
            alpha: scalar or (n,), >= 0.
            sigma: scalar or (n,), > 0.

        Returns:
            (n, *event_shape) in x_t's dtype.
        """
        return self._denoise(x_t, alpha, sigma)

    def _denoise(
        self,
        x_t: Tensor,
        alpha: Tensor | float,
        sigma: Tensor | float,
        mask: Tensor | None = None,
    ) -> Tensor:
        """`denoise`, restricted per sample to the components where ``mask`` (bool (n, K))
        is True (the posterior of the mixture renormalised over them)."""
        n = x_t.shape[0]
        x = x_t.reshape(n, -1).to(torch.float64)
        a = torch.as_tensor(alpha, dtype=torch.float64, device=x.device).expand(n)
        s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).expand(n)
        logp, var = self._noised_log_resp(x, a, s)
        if mask is not None:
            logp = logp.masked_fill(~mask, -math.inf)
        resp = torch.softmax(logp, dim=1)
        gain = a[:, None, None] * self.stds[None] ** 2 / var
        comp_mean = self.means[None] + gain * (x[:, None, :] - a[:, None, None] * self.means[None])
        out = (resp[:, :, None] * comp_mean).sum(1)
        return out.reshape(x_t.shape).to(x_t.dtype)

    def posterior(
        self, y: Tensor | Sequence[float], operator: Tensor | Sequence[Any], noise_std: float
    ) -> MixturePosterior:
        r"""The exact posterior of x given one observation y = A x + s n, n ~ N(0, I).

        Each component k (mean m_k, covariance C_k) gives a Gaussian posterior, in the gain
        form that also holds for s = 0:

        $$S_k = A C_k A^\top + s^2 I,\quad K_k = C_k A^\top S_k^{-1},\quad
        \mu_k' = m_k + K_k (y - A m_k),\quad C_k' = C_k - K_k A C_k,$$

        with weights $w_k' \propto w_k\,\mathcal N(y; A m_k, S_k)$. Use it to validate a
        posterior sampler (`tinydiff.posterior`): draw ``posterior(...).sample(n)`` and compare
        (e.g. with `tinydiff.metrics.energy_distance`). For inpainting, A is the selection
        matrix ``torch.eye(D)[known_indices]``.

        Args:
            y: (m,) the observation.
            operator: A, (m, D) over flattened samples.
            noise_std: s >= 0; with s = 0, A must have full row rank.

        Returns:
            a `MixturePosterior`.
        """
        A = torch.as_tensor(operator, dtype=torch.float64)
        yv = torch.as_tensor(y, dtype=torch.float64).reshape(-1)
        if A.dim() != 2 or A.shape[1] != self.dim or A.shape[0] != yv.numel():
            raise ValueError(
                f"operator must have shape (m, D) = ({yv.numel()}, {self.dim}) for y of shape "
                f"({yv.numel()},), got {tuple(A.shape)}"
            )
        if not noise_std >= 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        m = A.shape[0]
        cov = torch.diag_embed(self.stds**2)  # (K, D, D)
        AC = A @ cov  # (K, m, D)
        S = AC @ A.T + noise_std**2 * torch.eye(m, dtype=torch.float64)
        L = torch.linalg.cholesky(S)
        gain = torch.linalg.solve(S, AC).transpose(-1, -2)  # C A^T S^-1 (S symmetric)
        resid = yv[None] - self.means @ A.T  # (K, m)
        means = self.means + (gain @ resid[..., None])[..., 0]
        covs = cov - gain @ AC
        z = torch.linalg.solve_triangular(L, resid[..., None], upper=False)[..., 0]
        logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        loglik = -0.5 * ((z**2).sum(-1) + logdet + m * math.log(2 * math.pi))
        weights = torch.softmax(torch.log(self.weights) + loglik, 0)
        return MixturePosterior(
            weights, means, 0.5 * (covs + covs.transpose(-1, -2)), self.event_shape
        )


class MixturePosterior:
    """A mixture of full-covariance Gaussians: the exact posterior of a `GaussianMixture`
    under a linear Gaussian observation (`GaussianMixture.posterior`).

    Attributes:
        weights: (K,) posterior component probabilities.
        means: (K, D) component means.
        covariances: (K, D, D) component covariances (singular in observed directions when
            noise_std = 0).
        event_shape: the shape of one sample.
    """

    def __init__(
        self, weights: Tensor, means: Tensor, covariances: Tensor, event_shape: tuple[int, ...]
    ) -> None:
        self.weights = weights
        self.means = means
        self.covariances = covariances
        self.event_shape = tuple(event_shape)
        lam, U = torch.linalg.eigh(covariances)
        # rounding leaves ~1e-17 in observed directions of a noiseless posterior: drop it, so
        # that samples match the observation exactly there
        lam = torch.where(lam > 1e-12 * lam.amax(-1, keepdim=True), lam, 0)
        self._roots = U * lam.sqrt()[:, None, :]  # root @ root^T = covariance

    def mean(self) -> Tensor:
        """Posterior mean, (D,) float64."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """Posterior covariance, (D, D) float64."""
        mu = self.mean()
        second = torch.einsum("k,kd,ke->de", self.weights, self.means, self.means)
        second = second + torch.einsum("k,kde->de", self.weights, self.covariances)
        return second - torch.outer(mu, mu)

    def std(self) -> Tensor:
        """Posterior standard deviations per coordinate, (*event_shape,) float64."""
        return self.covariance().diagonal().clamp_min(0).sqrt().reshape(self.event_shape)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw n exact posterior samples, (n, *event_shape) float64."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        x = self.means[comp] + (self._roots[comp] @ z[..., None])[..., 0]
        return x.reshape(n, *self.event_shape)


class ExactDenoiser(nn.Module):
    """A parameter-free "network" that outputs the exact configured target for a mixture.

    It follows the tinydiff network contract ``net(x_t, t) -> out`` and can be dropped into
    :class:`tinydiff.DiffusionModel` in place of a trained network. For ``learned_range`` it
    returns v = -1 in the variance channels (the posterior variance beta-tilde).

    Sampling runs in this module's dtype: float32 by default; call ``.double()`` for float64.

    Args:
        mixture: the data distribution.
        model_or_config: a DiffusionModel, a DiffusionModelConfig or a config dict; supplies
            the process (alpha(t), sigma(t) at real t), the target and the variance type. The
            network input is mapped back to (x_t, t) by the target's ``from_network_input``
            (the identity for eps, x0, v and velocity; EDM's preconditioning is inverted).
    """

    def __init__(self, mixture: GaussianMixture, model_or_config: Any) -> None:
        super().__init__()
        cfg = getattr(model_or_config, "config", model_or_config)
        if isinstance(cfg, dict):
            cfg = DiffusionModelConfig(**cfg)
        if not isinstance(cfg, DiffusionModelConfig):
            raise TypeError(
                f"model_or_config must be a DiffusionModel, DiffusionModelConfig or dict, "
                f"got {type(model_or_config).__name__}"
            )
        if cfg.input_shape is not None and tuple(cfg.input_shape) != mixture.event_shape:
            raise ValueError(
                f"the mixture's event shape {mixture.event_shape} differs from the config's "
                f"input_shape {tuple(cfg.input_shape)}"
            )
        self.mixture = mixture
        process = getattr(model_or_config, "process", None)
        self.process = process if isinstance(process, GaussianProcess) else cfg.process()
        self.target = targets.build(cfg.target_type, cfg.target_kwargs)
        self.channel_multiplier = variances.get(cfg.variance_type).channel_multiplier
        # a buffer, so that .double()/.to() set the dtype DiffusionModel samples in
        self.register_buffer("dtype_anchor", torch.zeros(()), persistent=False)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Exact target for the network input (bsz, *input_shape) at network times (bsz,)
        (for identity-input targets: x_t and t in [0, T])."""
        return self._exact_output(x_t, t, self.mixture.denoise)

    def _exact_output(
        self, x_t: Tensor, t: Tensor, posterior_mean: Callable[[Tensor, Tensor, Tensor], Tensor]
    ) -> Tensor:
        """The target's output for the exact ``posterior_mean(x_t, alpha, sigma)`` (float64)."""
        # the mixture lives on the CPU in float64: this is a test oracle, not a fast network.
        # The target's network input (e.g. EDM's c_in x_t, c_noise) is inverted first; x is
        # not detached, so that the likelihood can differentiate through the oracle.
        x_in = x_t.to("cpu", torch.float64)
        t_in = t.detach().to("cpu", torch.float64).expand(x_in.shape[0])
        x64, t64 = self.target.from_network_input(x_in, t_in, self.process)
        alpha, sigma = self.process.alpha_sigma(t64)
        x0 = posterior_mean(x64, alpha, sigma.clamp_min(1e-300))
        view = (-1,) + (1,) * (x64.dim() - 1)
        zero = torch.zeros_like(t64).view(view)
        p = Point(t64.view(view), alpha.view(view), sigma.view(view), zero, zero)
        if self.target.uses_derivatives:
            d_alpha, d_sigma = self.process.derivatives(t64)
            p = p._replace(d_alpha=d_alpha.view(view), d_sigma=d_sigma.view(view))
        eps = (x64 - p.alpha * x0) / p.sigma.clamp_min(1e-15)
        out = self.target.target(x0, eps, p)
        if self.channel_multiplier > 1:
            v = -torch.ones_like(out)
            out = torch.cat([out] + [v] * (self.channel_multiplier - 1), dim=1)
        return out.to(device=x_t.device, dtype=x_t.dtype)


class ClassConditionalMixture:
    r"""A class-conditional Gaussian mixture: :math:`p(y) = \pi_y`,
    :math:`p(x_0 \mid y)` = the mixture ``classes[y]``.

    The unconditional distribution is the mixture of all classes' components with weights
    :math:`\pi_y w_{y,k}` (`marginal`); the conditional posterior mean given y is the
    marginal's restricted to class y's components. Labels are ints in [0, num_classes);
    ``null_class`` (= num_classes) means "no condition" (the convention of `tinydiff.nn` and
    `tinydiff.conditioning`).

    Args:
        classes: one `GaussianMixture` per class, all of the same event shape.
        class_weights: (C,) positive class probabilities (normalised here); default uniform.
    """

    def __init__(
        self,
        classes: Sequence[GaussianMixture],
        class_weights: Tensor | Sequence[float] | None = None,
    ) -> None:
        classes = list(classes)
        if not classes or not all(isinstance(c, GaussianMixture) for c in classes):
            raise TypeError("classes must be a non-empty sequence of GaussianMixture")
        shapes = {c.event_shape for c in classes}
        if len(shapes) != 1:
            raise ValueError(f"all classes need the same event shape, got {sorted(shapes)}")
        self.classes = classes
        num = len(classes)
        pi = (
            torch.full((num,), 1.0 / num, dtype=torch.float64)
            if class_weights is None
            else torch.as_tensor(class_weights, dtype=torch.float64).flatten()
        )
        if pi.shape != (num,) or not bool((pi > 0).all()):
            raise ValueError(f"class_weights must be {num} positive numbers, got {pi.tolist()}")
        self.class_weights = pi / pi.sum()
        event = classes[0].event_shape
        self.marginal = GaussianMixture(
            torch.cat([c.means for c in classes]).reshape(-1, *event),
            torch.cat([c.stds for c in classes]).reshape(-1, *event),
            torch.cat([p * c.weights for p, c in zip(self.class_weights, classes, strict=True)]),
        )
        #: the class of each of the marginal's components, (K,)
        self.component_class = torch.cat(
            [torch.full((c.num_components,), y, dtype=torch.long) for y, c in enumerate(classes)]
        )

    @property
    def num_classes(self) -> int:
        """C, the number of classes."""
        return len(self.classes)

    @property
    def null_class(self) -> int:
        """The label meaning "no condition": C."""
        return self.num_classes

    @property
    def event_shape(self) -> tuple[int, ...]:
        """The shape of one sample."""
        return self.marginal.event_shape

    def _labels(self, labels: Tensor | Sequence[int], n: int) -> Tensor:
        lab = torch.as_tensor(labels).to("cpu", torch.long).reshape(-1)
        if lab.numel() == 1 and n != 1:
            lab = lab.expand(n)
        if lab.shape != (n,) or bool(((lab < 0) | (lab > self.null_class)).any()):
            raise ValueError(
                f"labels must be {n} ints in [0, {self.null_class}] ({self.null_class}: no "
                f"condition), got {lab.tolist()}"
            )
        return lab

    def _mask(self, labels: Tensor) -> Tensor:
        """(n, K) bool: the components each label's distribution uses (all for null)."""
        cls = self.component_class[None, :]
        return (cls == labels[:, None]) | (labels[:, None] == self.null_class)

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        *,
        labels: Tensor | Sequence[int] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Draw n samples and their labels: (n, *event_shape) float64 and (n,) long. With
        ``labels`` (n,) (or one label), from those classes (null: unconditional)."""
        if labels is None:
            lab = torch.multinomial(self.class_weights, n, replacement=True, generator=generator)
        else:
            lab = self._labels(labels, n)
        probs = self.marginal.weights[None, :] * self._mask(lab)
        comp = torch.multinomial(probs, 1, replacement=True, generator=generator)[:, 0]
        mix = self.marginal
        noise = torch.randn(n, mix.dim, generator=generator, dtype=torch.float64)
        x = (mix.means[comp] + mix.stds[comp] * noise).reshape(n, *self.event_shape)
        return x, lab

    def denoise(
        self,
        x_t: Tensor,
        alpha: Tensor | float,
        sigma: Tensor | float,
        labels: Tensor | Sequence[int],
    ) -> Tensor:
        """E[x0 | x_t, y] for x_t = alpha x0 + sigma eps; label ``null_class``: E[x0 | x_t].

        Args:
            x_t: (n, *event_shape).
            alpha: scalar or (n,), >= 0.
            sigma: scalar or (n,), > 0.
            labels: (n,) ints in [0, null_class] (or one label for all).

        Returns:
            (n, *event_shape) in x_t's dtype.
        """
        lab = self._labels(labels, x_t.shape[0])
        return self.marginal._denoise(x_t, alpha, sigma, self._mask(lab))

    def guided_denoiser(
        self, labels: Tensor | Sequence[int], scale: float
    ) -> GuidedMixtureDenoiser:
        """The classifier-free-guided posterior mean for fixed labels (see
        `GuidedMixtureDenoiser`), e.g. for `probability_flow_reference`."""
        return GuidedMixtureDenoiser(self, labels, scale)


class GuidedMixtureDenoiser:
    r"""The exact classifier-free-guided denoiser of a `ClassConditionalMixture` for fixed
    labels: :math:`D_w = D_u + w\,(D_c - D_u)` with :math:`D_c = \mathbb E[x_0 \mid x_t, y]`
    and :math:`D_u = \mathbb E[x_0 \mid x_t]` (Ho & Salimans 2022). The guided
    probability-flow ODE is the ODE of this denoiser.

    Args:
        mixture: the class-conditional mixture.
        labels: (n,) labels of the samples it will denoise (n fixed), or one label.
        scale: w.
    """

    def __init__(
        self, mixture: ClassConditionalMixture, labels: Tensor | Sequence[int], scale: float
    ) -> None:
        self.mixture = mixture
        self.labels = torch.as_tensor(labels).to("cpu", torch.long).reshape(-1)
        self.scale = float(scale)

    def denoise(self, x_t: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
        """The guided posterior mean at x_t (n, *event_shape), in x_t's dtype."""
        mix = self.mixture
        cond = mix.denoise(x_t, alpha, sigma, self.labels)
        if self.scale == 1.0:  # the conditional denoiser
            return cond
        uncond = mix.denoise(x_t, alpha, sigma, [mix.null_class])
        return uncond + self.scale * (cond - uncond)


class ClassConditionalDenoiser(ExactDenoiser):
    """The exact class-conditional "network" of a `ClassConditionalMixture`:
    ``net(x_t, t, class_labels=None)`` outputs the configured target of
    E[x0 | x_t, y] (label ``null_class`` or no labels: E[x0 | x_t]). It has ``null_class``,
    so `tinydiff.DiffusionModel` samples it with ``cond={"class_labels": y}`` and any guidance
    method.

    Args:
        mixture: the class-conditional data distribution.
        model_or_config: as for `ExactDenoiser`.
    """

    def __init__(self, mixture: ClassConditionalMixture, model_or_config: Any) -> None:
        super().__init__(mixture.marginal, model_or_config)
        self.conditional = mixture
        self.null_class = mixture.null_class

    def forward(self, x_t: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """Exact target at the network input (bsz, *input_shape), times (bsz,), labels (bsz,)."""
        labels = (
            torch.full((x_t.shape[0],), self.null_class, dtype=torch.long)
            if class_labels is None
            else class_labels
        )

        def posterior_mean(x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
            return self.conditional.denoise(x, alpha, sigma, labels)

        return self._exact_output(x_t, t, posterior_mean)


def _rk4(field: Any, y: Tensor, s0: Any, h: Any, h_y: Any, num_steps: int) -> Tensor:
    """Classical RK4 for dy/ds = field(y, s): `num_steps` uniform steps h from s0 (numbers,
    or per-sample tensors with `h_y`, h shaped to broadcast against y)."""
    for k in range(num_steps):
        s = s0 + k * h
        k1 = field(y, s)
        k2 = field(y + 0.5 * h_y * k1, s + 0.5 * h)
        k3 = field(y + 0.5 * h_y * k2, s + 0.5 * h)
        k4 = field(y + h_y * k3, s + h)
        y = y + h_y / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return y


def probability_flow_reference(
    mixture: MixtureDenoiser,
    x: Tensor,
    alpha_bar_start: float | None = None,
    alpha_bar_end: float | None = None,
    *,
    start: tuple[float, float] | None = None,
    end: tuple[float, float] | None = None,
    num_steps: int = 2000,
    denoise_end: bool = True,
) -> Tensor:
    r"""Solve the probability-flow ODE of a mixture accurately, independently of any sampler.

    For any Gaussian path, in Karras' variables :math:`y = x/\alpha`,
    :math:`\hat\sigma = \sigma/\alpha` the probability-flow ODE is
    :math:`dy/d\hat\sigma = (y - D(y,\hat\sigma))/\hat\sigma` (Karras et al. 2022, eq. 4),
    i.e. :math:`dy/du = y - D` in :math:`u = \log\hat\sigma`, with D the mixture's exact
    posterior mean. Classical RK4 with ``num_steps`` uniform steps in u, float64.

    The ends are given as alpha_bar values of a variance-preserving process
    (``alpha_bar_start``, ``alpha_bar_end``) or as (alpha, sigma) pairs of any process
    (``start``, ``end``).

    Args:
        mixture: the data distribution (gives D): a `GaussianMixture`, or any
            `MixtureDenoiser`, e.g. `ClassConditionalMixture.guided_denoiser` for the guided
            flow.
        x: (n, *event_shape) state at the start (e.g. the initial noise).
        alpha_bar_start: in (0, 1) (finite noise level; the start of a plan).
        alpha_bar_end: in (alpha_bar_start, 1).
        start: (alpha, sigma) at the start, both > 0, instead of alpha_bar_start.
        end: (alpha, sigma) at the end, less noise than the start, instead of alpha_bar_end.
        num_steps: RK4 steps.
        denoise_end: return :math:`D(x_{end})`, the x0 estimate at the end, instead of
            x_end: this is what every sampler returns from its last step to t = 0 when
            sigma(0) = 0, so a plan ending ..., t_end, 0 is compared with it.

    Returns:
        float64 (n, *event_shape).
    """

    def ends(ab: float | None, pair: tuple[float, float] | None, name: str) -> tuple[float, float]:
        if (ab is None) == (pair is None):
            raise ValueError(f"give either alpha_bar_{name} or {name}=(alpha, sigma)")
        if pair is not None:
            return float(pair[0]), float(pair[1])
        assert ab is not None
        if not 0 < ab < 1:
            raise ValueError(f"alpha_bar_{name} must lie in (0, 1) (finite noise), got {ab}")
        return math.sqrt(ab), math.sqrt(1 - ab)

    a0, sig0 = ends(alpha_bar_start, start, "start")
    a1, sig1 = ends(alpha_bar_end, end, "end")
    if not (a0 > 0 and sig0 > 0 and a1 > 0 and sig1 > 0 and sig1 / a1 < sig0 / a0):
        raise ValueError(
            "need finite, positive alpha and sigma at both ends and less noise (sigma / alpha) at "
            f"the end: start (alpha, sigma) = {(a0, sig0)}, end = {(a1, sig1)}"
        )
    u0, u1 = math.log(sig0 / a0), math.log(sig1 / a1)
    du = (u1 - u0) / num_steps

    def field(y: Tensor, u: float) -> Tensor:
        return y - mixture.denoise(y, 1.0, math.exp(u))

    x_end = _rk4(field, x.to(torch.float64) / a0, u0, du, du, num_steps) * a1
    return mixture.denoise(x_end, a1, sig1) if denoise_end else x_end


def flow_map_reference(
    mixture: MixtureDenoiser,
    x: Tensor,
    start: tuple[Tensor | float, Tensor | float],
    end: tuple[Tensor | float, Tensor | float],
    *,
    num_steps: int = 500,
) -> Tensor:
    r"""The exact flow map of a mixture's probability-flow ODE from `start` to `end`, by
    accurate integration: the oracle for flow-map and consistency models.

    Any Gaussian path $x = \alpha x_0 + \sigma\epsilon$ is a scaled variance-preserving
    one: with $\rho = \sqrt{\alpha^2 + \sigma^2}$ and the angle
    $\varphi = \operatorname{atan2}(\sigma, \alpha)$, $\tilde x = x/\rho = \cos\varphi\,x_0
    + \sin\varphi\,\epsilon$, and the probability-flow ODE (Song et al. 2021) is

    $$
    \frac{d\tilde x}{d\varphi} = -\sin\varphi\,\hat x_0 + \cos\varphi\,\hat\epsilon
    = \frac{\cos\varphi\,\tilde x - \hat x_0}{\sin\varphi},\qquad
    \hat x_0 = D(\tilde x; \cos\varphi, \sin\varphi),
    $$

    D the mixture's exact posterior mean. Finite at $\varphi = \pi/2$ (pure noise,
    alpha = 0, where `probability_flow_reference`'s variables are not), so a jump from
    t = T of rectified flow is covered. Classical RK4, `num_steps` uniform steps in
    $\varphi$, float64 (500 steps: about 1e-12 on a single Gaussian against its closed
    form); an end with sigma = 0 is approached to $\varphi = 10^{-6}$ (the
    solution moves by $O(\varphi^2)$ there, below 1e-11).

    Args:
        mixture: the data distribution (gives D), e.g. a `GaussianMixture`.
        x: (n, *event_shape) states at the start.
        start: (alpha, sigma) at the start: numbers or (n,) tensors (per-sample times),
            alpha >= 0, sigma > 0.
        end: (alpha, sigma) at the end, less noise (sigma / alpha) than the start; sigma
            may be 0 (the flow map to the data, which a consistency model learns).
        num_steps: RK4 steps.

    Returns:
        float64 (n, *event_shape): the ODE's solution at `end`.
    """
    n = x.shape[0]
    view = (n,) + (1,) * (x.dim() - 1)

    def pair(value: tuple[Tensor | float, Tensor | float]) -> tuple[Tensor, Tensor]:
        a, s = (torch.as_tensor(v, dtype=torch.float64).expand(n) for v in value)
        return torch.atan2(s, a), (a * a + s * s).sqrt()

    phi0, rho0 = pair(start)
    phi1, rho1 = pair(end)
    if not (bool((rho0 > 0).all()) and bool((rho1 > 0).all())):
        raise ValueError("flow_map_reference needs (alpha, sigma) not both 0 at either end")
    if not (bool((phi0 > 0).all()) and bool((phi1 < phi0).all())):
        raise ValueError(
            "flow_map_reference needs sigma > 0 at the start and less noise (sigma / alpha) at "
            "the end than at the start"
        )
    phi1 = phi1.clamp_min(1e-6)
    h = (phi1 - phi0) / num_steps

    def field(y: Tensor, phi: Tensor) -> Tensor:
        x0 = mixture.denoise(y, phi.cos(), phi.sin())
        return (phi.cos().view(view) * y - x0) / phi.sin().view(view)

    y = _rk4(field, x.to(torch.float64) / rho0.view(view), phi0, h, h.view(view), num_steps)
    return y * rho1.view(view)
