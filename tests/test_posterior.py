"""Posterior sampling and inpainting (tinydiff.posterior) against exact posteriors of Gaussian
mixtures (tinydiff.testing.GaussianMixture.posterior), which are checked independently first."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from _models import exact_model

import tinydiff
from tinydiff import posterior
from tinydiff.metrics import energy_distance
from tinydiff.testing import GaussianMixture

F64 = torch.float64
RING4 = GaussianMixture(
    [[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0], [0.0, -2.0]], 0.5, weights=[0.1, 0.2, 0.3, 0.4]
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # the exact denoiser is many small ops: one intra-op thread is much faster on shared cores
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- the oracle, checked without its own formulas -----------------------------------------------
def test_oracle_matches_a_numerical_integral_in_1d() -> None:
    mix = GaussianMixture([[-2.0], [0.5], [3.0]], [0.4, 0.7, 0.5], weights=[0.5, 0.2, 0.3])
    y, s = 1.2, 0.6
    post = mix.posterior(torch.tensor([y], dtype=F64), torch.tensor([[1.0]]), s)
    grid = torch.linspace(-8, 10, 200001, dtype=F64)[:, None]
    dens = mix.log_prob(grid).exp() * torch.exp(-0.5 * ((y - grid[:, 0]) / s) ** 2)
    dens = dens / torch.trapezoid(dens, grid[:, 0])
    mean = torch.trapezoid(dens * grid[:, 0], grid[:, 0])
    var = torch.trapezoid(dens * (grid[:, 0] - mean) ** 2, grid[:, 0])
    assert float(post.mean()[0]) == pytest.approx(float(mean), abs=1e-8)
    assert float(post.covariance()[0, 0]) == pytest.approx(float(var), abs=1e-8)
    draws = post.sample(200_000, _gen(0))
    assert float(draws.mean()) == pytest.approx(float(mean), abs=4 * math.sqrt(var / 2e5))


def test_oracle_noiseless_is_the_conditional_distribution() -> None:
    # observing coordinate 0 exactly: coordinate 1 of a diagonal mixture keeps each
    # component's law, reweighted by w_k N(y; mu_k0, s_k0^2)
    y = 0.8
    post = RING4.posterior(torch.tensor([y], dtype=F64), torch.tensor([[1.0, 0.0]]), 0.0)
    logw = torch.log(RING4.weights) - 0.5 * ((y - RING4.means[:, 0]) / RING4.stds[:, 0]) ** 2
    logw = logw - torch.log(RING4.stds[:, 0])
    torch.testing.assert_close(post.weights, torch.softmax(logw, 0), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(post.means[:, 1], RING4.means[:, 1], rtol=0, atol=1e-12)
    torch.testing.assert_close(post.means[:, 0], torch.full((4,), y, dtype=F64))
    torch.testing.assert_close(post.covariances[:, 1, 1], RING4.stds[:, 1] ** 2)
    assert float(post.covariances[:, 0].abs().max()) < 1e-12
    assert bool((post.sample(100, _gen(1))[:, 0] == y).all())


def test_oracle_matches_importance_weighting() -> None:
    g = _gen(2)
    mix = GaussianMixture(torch.randn(3, 3, generator=g), [0.5, 0.8, 0.6], weights=[0.2, 0.3, 0.5])
    A = torch.tensor([[1.0, -0.5, 0.2], [0.3, 0.4, 1.0]], dtype=F64)
    y, s = torch.tensor([0.4, -0.3], dtype=F64), 0.5
    post = mix.posterior(y, A, s)
    x = mix.sample(400_000, g)
    logw = -0.5 * (((y - x @ A.T) / s) ** 2).sum(1)
    w = torch.softmax(logw, 0)
    mean = w @ x
    cov = (w[:, None] * (x - mean)).T @ (x - mean)
    torch.testing.assert_close(post.mean(), mean, rtol=0, atol=0.02)
    torch.testing.assert_close(post.covariance(), cov, rtol=0, atol=0.02)


# -- the methods -----------------------------------------------------------------------------
def _errors(x: torch.Tensor, post: tinydiff.testing.MixturePosterior) -> tuple[float, float]:
    """Largest mean error in posterior stds, largest covariance error over the largest
    variance."""
    mu, cov = post.mean(), post.covariance()
    std = cov.diagonal().sqrt()
    mean_err = float(((x.mean(0) - mu) / std).abs().max())
    cov_err = float((x.T.cov() - cov).abs().max() / cov.diagonal().max())
    return mean_err, cov_err


def _problem8() -> tuple[GaussianMixture, torch.Tensor, torch.Tensor, float]:
    g = _gen(0)
    mix = GaussianMixture(torch.randn(4, 8, generator=g), 0.6, weights=[0.1, 0.2, 0.3, 0.4])
    A = torch.randn(3, 8, generator=g, dtype=F64) / 8**0.5
    return mix, A, A @ mix.sample(1, g)[0], 0.2


@pytest.mark.parametrize("dim", [2, 8])
def test_smc_moments_converge_to_the_exact_posterior(dim: int) -> None:
    if dim == 2:
        mix, A, y, s = (
            RING4,
            torch.tensor([[1.0, 1.0]], dtype=F64),
            torch.tensor([1.5], dtype=F64),
            0.3,
        )
    else:
        mix, A, y, s = _problem8()
    n, steps = 1000, 100
    model = exact_model(mix, noise_schedule_type="linear")
    post = mix.posterior(y, A, s)
    errs = []
    for k in (1, 4, 24):
        x = model.posterior_sample(
            y.expand(n, -1), A, s, steps, method="mcgdiff",
            method_kwargs={"num_particles": k}, generator=_gen(5),
        )  # fmt: skip
        errs.append(_errors(x, post))
    mean_errs = [e[0] for e in errs]
    # the bias falls as particles grow ...
    assert mean_errs[2] < 0.5 * mean_errs[0]
    assert max(errs[1]) < max(errs[0])
    # ... and at 24 particles what is left is Monte Carlo error (the largest of `dim`
    # coordinates' errors of the mean is ~ 3 / sqrt(n) posterior stds) plus an allowance of
    # 0.1 std for the 100-step chain (MMPS, exact per step on a Gaussian prior, keeps a
    # variance deficit of 7% at 200 steps that falls as 1/steps: the discretisation)
    assert mean_errs[2] < 5 / math.sqrt(n) + 0.1, errs
    assert errs[2][1] < 0.2, errs


def test_inpaint_keeps_the_known_values() -> None:
    model = exact_model(RING4, noise_schedule_type="cosine")
    x_known = RING4.sample(6, _gen(3))
    mask = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 1], [1, 1], [0, 0]], dtype=torch.bool)
    for method, kw in [
        ("repaint", {"jump_length": 2, "num_resample": 2}),
        ("mcgdiff", {"num_particles": 3}),
        ("mmps", {}),
    ]:
        x = model.inpaint(x_known, mask, 10, method=method, method_kwargs=kw, generator=_gen(4))
        assert x.shape == x_known.shape and x.dtype == F64
        if method == "repaint":  # replaced by the known values at the last step: exact
            assert bool((x[mask] == x_known[mask]).all())
        else:  # conditioned on them: to rounding (mcgdiff), to one CG iteration (mmps)
            tol = 1e-9 if method == "mcgdiff" else 1e-6
            torch.testing.assert_close(x[mask], x_known[mask], rtol=0, atol=tol)
        assert bool((x[~mask] != x_known[~mask]).all())


def test_selection_matrix_runs_as_a_mask_and_callables_as_matrices() -> None:
    model = exact_model(RING4, noise_schedule_type="linear")
    x_known = RING4.sample(5, _gen(6))
    A = torch.tensor([[0.0, 1.0]], dtype=F64)
    a = model.posterior_sample(x_known[:, 1:], A, 0.0, 8, method="repaint", generator=_gen(1))
    b = model.inpaint(x_known, torch.tensor([False, True]), 8, method="repaint", generator=_gen(1))
    assert torch.equal(a, b)
    B = torch.tensor([[1.0, 2.0], [0.5, -1.0]], dtype=F64)
    y = x_known @ B.T
    for method in ("mmps", "mcgdiff"):
        kw = {"num_particles": 4} if method == "mcgdiff" else {}
        c = model.posterior_sample(y, B, 0.1, 6, method=method, method_kwargs=kw, generator=_gen(2))
        d = model.posterior_sample(
            y, lambda x: x @ B.T, 0.1, 6, method=method, method_kwargs=kw, generator=_gen(2)
        )
        torch.testing.assert_close(c, d, rtol=0, atol=1e-9)


@pytest.mark.parametrize("method", ["dps", "mmps"])
def test_gradient_methods_improve_on_unconditional_samples(method: str) -> None:
    # DPS and MMPS are biased on mixtures: only a loose bound against the exact posterior
    model = exact_model(RING4, noise_schedule_type="linear")
    A, y, s = torch.tensor([[1.0, 0.0]], dtype=F64), torch.tensor([1.0], dtype=F64), 0.1
    post = RING4.posterior(y, A, s)
    n = 600
    ref = post.sample(n, _gen(0))
    scales = post.std()
    uncond = energy_distance(model.sample(n, 30, generator=_gen(1)), ref, scales)
    x = model.posterior_sample(y.expand(n, 1), A, s, 30, method=method, generator=_gen(2))
    assert energy_distance(x, ref, scales) < 0.25 * uncond


def test_repaint_calls_match_its_cost_formula() -> None:
    model = exact_model(RING4, noise_schedule_type="linear")
    calls = []
    net = model.nn_module
    hook = net.register_forward_hook(lambda *a: calls.append(1))
    method = posterior.RePaint(jump_length=3, num_resample=3)
    try:
        model.inpaint(RING4.sample(2, _gen(0)), torch.tensor([True, False]), 10, method=method)
    finally:
        hook.remove()
    assert len(calls) == method.calls(10) == 10 + 2 * 3 * ((10 - 1) // 3)


def test_bad_input_is_refused_before_any_network_call() -> None:
    model = exact_model(RING4, noise_schedule_type="linear")
    hook = model.nn_module.register_forward_hook(lambda *a: pytest.fail("network called"))
    y, A = torch.zeros(3, 1, dtype=F64), torch.tensor([[1.0, 0.0]], dtype=F64)
    cases = [
        (ValueError, "shape \\(m, d\\) = \\(1, 2\\)", lambda: model.posterior_sample(y, A.T, 0.0)),
        (ValueError, "shape \\(bsz, m\\)", lambda: model.posterior_sample(y[None], A, 0.0)),
        (TypeError, "floating-point", lambda: model.posterior_sample(y.long(), A, 0.0)),
        (ValueError, ">= 0", lambda: model.posterior_sample(y, A, -1.0)),
        (TypeError, "matrix \\(m, d\\) or a linear callable", lambda: model.posterior_sample(y, 3, 0)),
        (ValueError, "returned \\(1, 2\\)", lambda: model.posterior_sample(y, lambda x: x, 0.0)),
        (ValueError, "needs a mask", lambda: model.posterior_sample(y, A + 1, 0.0, method="repaint")),
        (ValueError, "Did you mean 'dps'", lambda: model.posterior_sample(y, A, 0.0, method="dpss")),
        (TypeError, "num_particles", lambda: model.posterior_sample(y, A, 0.0, method="mcgdiff", method_kwargs={"particles": 2})),
            (TypeError, "Accepted options: cg_iters", lambda: model.posterior_sample(y, A, 0.0, method_kwargs={"particles": 2})),
        (ValueError, "NaN or inf", lambda: model.posterior_sample(y * math.nan, A, 0.0)),
        (ValueError, "broadcast against x_known", lambda: model.inpaint(torch.zeros(3, 2, dtype=F64), torch.ones(3))),
        (ValueError, "only 0 and 1", lambda: model.inpaint(torch.zeros(3, 2, dtype=F64), torch.full((2,), 0.5))),
        (ValueError, "x_known", lambda: model.inpaint(torch.zeros(3, 3, dtype=F64), torch.ones(2))),
    ]  # fmt: skip
    try:
        for error, match, call in cases:
            with pytest.raises(error, match=match):
                call()
    finally:
        hook.remove()


def test_a_method_registered_from_user_code_runs() -> None:
    @posterior.register("test_replace_x0")
    class ReplaceX0(posterior.PosteriorMethod):
        """One denoiser call at T, then the known entries put in: a toy method."""

        def run(self, denoiser, process, times, obs, *, generator=None, callback=None,
                progress=False):  # fmt: skip
            x = torch.randn(obs.bsz, *obs.input_shape, generator=generator, dtype=obs.y.dtype)
            point = process.points(torch.as_tensor(times[:1], dtype=F64))[0]
            x0 = denoiser(x, point).x0
            return x0 * (1 - obs.mask) + obs.y if obs.mask is not None else x0

    try:
        assert "test_replace_x0" in posterior.names()
        model = exact_model(RING4, noise_schedule_type="linear")
        x_known = RING4.sample(4, _gen(0))
        x = model.inpaint(x_known, torch.tensor([True, False]), 5, method="test_replace_x0")
        assert torch.equal(x[:, 0], x_known[:, 0])
    finally:
        posterior.REGISTRY.unregister("test_replace_x0")


def test_condition_reaches_every_particle() -> None:
    from tinydiff.testing import ClassConditionalDenoiser, ClassConditionalMixture

    classes = [
        GaussianMixture([[2.0, 0.0], [0.0, 2.0]], 0.4),
        GaussianMixture([[-2.0, 0.0], [0.0, -2.0]], 0.4),
    ]
    mixture = ClassConditionalMixture(classes)
    config = {"input_shape": (2,), "noise_schedule_type": "linear", "num_timesteps": 100}
    model = tinydiff.DiffusionModel(ClassConditionalDenoiser(mixture, config), config).double()
    n, mask = 300, torch.tensor([False, True])
    x_known = torch.zeros(n, 2, dtype=F64)  # x1 = 0 known: class 0 puts x0 near +2
    labels = torch.zeros(n, dtype=torch.long)
    x = model.inpaint(
        x_known, mask, 20, method="mcgdiff", method_kwargs={"num_particles": 4},
        cond={"class_labels": labels}, generator=_gen(0),
    )  # fmt: skip
    exact = classes[0].posterior(torch.zeros(1, dtype=F64), torch.tensor([[0.0, 1.0]]), 0.0)
    assert abs(float(x[:, 0].mean() - exact.mean()[0])) < 0.15


@pytest.mark.parametrize("method", ["repaint", "dps", "mmps", "mcgdiff"])
def test_a_seed_repeats_bitwise(method: str) -> None:
    model = exact_model(RING4, noise_schedule_type="cosine")
    x_known = RING4.sample(3, _gen(0))
    mask = torch.tensor([True, False])
    a, b = (model.inpaint(x_known, mask, 6, method=method, generator=_gen(7)) for _ in range(2))
    assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["repaint", "dps", "mmps", "mcgdiff"])
def test_compiled_network_gives_the_eager_samples(method: str) -> None:
    """compile=True runs the methods' loops around a compiled network (here the "eager"
    backend: dynamo traces the exact denoiser, gradients of dps and mmps included)."""
    from torch._dynamo.testing import CompileCounter

    model = exact_model(RING4, noise_schedule_type="cosine")
    counter = CompileCounter()
    model.compile_sampler(backend=counter)
    x_known = RING4.sample(3, _gen(0))
    mask = torch.tensor([True, False])
    eager = model.inpaint(x_known, mask, 6, method=method, generator=_gen(7))
    compiled = model.inpaint(x_known, mask, 6, method=method, generator=_gen(7), compile=True)
    assert counter.frame_count >= 1  # the network went through torch.compile
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)
