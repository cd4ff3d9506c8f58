"""The functional sampling loop (issue 19): `tinydiff.sampling.sample` runs any sampler with no
DiffusionModel, from any start time, with per-step callbacks that may replace the sample, and
guidance strategies whose per-run state the loop carries (eager and compiled alike).

Exact float64 models (the Gaussian-mixture denoiser) give the mathematics to check against:
the callback's x0 estimate is the posterior mean E[x0 | x_t], and the flow from the exact
marginal at any t0 ends at the mixture.
"""

from __future__ import annotations

import gc
import math
import weakref
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
import torch
from _models import exact_model
from _nets import CondNet
from torch import Tensor
from torch._dynamo.testing import CompileCounterWithBackend

from tinydiff import DiffusionModel, guidance, samplers, spacings
from tinydiff.denoiser import Denoiser
from tinydiff.guidance import CFG, Guidance, GuidanceState
from tinydiff.process import Point
from tinydiff.sampling import CompileOptions, sample
from tinydiff.targets import Prediction
from tinydiff.testing import GaussianMixture

SAMPLERS = samplers.names()
T = 1000
BSZ = 4
STEPS = 6
MIX = GaussianMixture(
    means=[[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], stds=[0.3, 0.5, 0.2], weights=[0.5, 0.3, 0.2]
)
PROCESSES: dict[str, dict[str, Any]] = {
    "vp": {},  # the config's default: a discrete cosine VP schedule, eps-prediction
    "rf": {"noise_schedule_type": "rectified_flow", "target_type": "pred_velocity"},
}


@pytest.fixture(scope="module")
def models() -> dict[str, DiffusionModel]:
    return {name: exact_model(MIX, **cfg) for name, cfg in PROCESSES.items()}


def gen(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def noise(n: int = BSZ, seed: int = 0) -> Tensor:
    return torch.randn(n, 2, generator=gen(seed), dtype=torch.float64)


def default_times(model: DiffusionModel, name: str, steps: int = STEPS) -> Tensor:
    """The times model.sample uses for ``name`` by default (its spacing for the process),
    built without the model."""
    spacing = samplers.get(name).spacing_for(model.process)
    return spacings.make_timesteps(spacing, T, steps, model.process)


def bare_denoiser(model: DiffusionModel) -> Denoiser:
    """The model's network, target and variance as a Denoiser, with no DiffusionModel call."""
    return Denoiser(model.nn_module, model.target, model.variance)


# -- every sampler without a DiffusionModel --------------------------------------------------------
@pytest.mark.parametrize("process", list(PROCESSES))
@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_runs_without_a_model_bitwise(
    name: str, process: str, models: dict[str, DiffusionModel]
) -> None:
    """sample(denoiser, process, ...) gives DiffusionModel.sample's samples bit for bit: the
    same generator draws the initial noise, then the per-step noise of stochastic samplers."""
    model = models[process]
    want = model.sample(BSZ, STEPS, sampler=name, generator=gen())
    g = gen()
    x = torch.randn(BSZ, 2, generator=g, dtype=torch.float64) * model.process.prior_std()
    got = sample(
        bare_denoiser(model), model.process, name, default_times(model, name), x, generator=g
    )
    assert torch.equal(got, want)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize(
    ("name", "options"),
    [("ddim", {"eta": 1.0}), ("heun", {"s_churn": 1.0}), ("unipc", {"variant": "bh1"})],
)
def test_sampler_options_and_trajectory_without_a_model(
    name: str, options: dict[str, Any], models: dict[str, DiffusionModel]
) -> None:
    model = models["vp"]
    x = noise()
    want = model.sample(
        BSZ,
        STEPS,
        sampler=name,
        sampler_kwargs=options,
        init_noise=x,
        generator=gen(),
        return_trajectory=True,
    )
    times = default_times(model, name)
    got = sample(
        model.denoiser(),
        model.process,
        name,
        times,
        x,
        sampler_kwargs=options,
        generator=gen(),
        return_trajectory=True,
    )
    assert got.shape == (STEPS + 1, BSZ, 2)
    assert torch.equal(got, want)
    assert torch.equal(got[0], x)
    # a Sampler instance instead of its name and options
    solver = samplers.get(name)(**options)
    got_instance = sample(model.denoiser(), model.process, solver, times, x, generator=gen())
    assert torch.equal(got_instance, want[-1])


def test_bad_arguments_are_refused(models: dict[str, DiffusionModel]) -> None:
    model = models["vp"]
    d, p, x = model.denoiser(), model.process, noise()
    times = default_times(model, "ddim")
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(d, p, "ddim", times.flip(0), x)
    with pytest.raises(ValueError, match="end at 0"):
        sample(d, p, "ddim", times[:-1], x)
    with pytest.raises(ValueError, match="at least 2"):
        sample(d, p, "ddim", times[-1:], x)
    with pytest.raises(ValueError, match=r"lie in \[0, 1000\]"):
        sample(d, p, "ddim", torch.tensor([2000.0, 500.0, 0.0], dtype=torch.float64), x)
    with pytest.raises(ValueError, match="ddim"):
        sample(d, p, "dddim", times, x)
    with pytest.raises(TypeError, match="Accepted options: eta"):
        sample(d, p, "ddim", times, x, sampler_kwargs={"etta": 1.0})
    with pytest.raises(ValueError, match="Sampler instance"):
        sample(d, p, samplers.get("ddim")(), times, x, sampler_kwargs={"eta": 1.0})
    with pytest.raises(TypeError, match="registered name"):
        sample(d, p, 3, times, x)  # type: ignore[arg-type]


# -- starting below T --------------------------------------------------------------------------------
def test_start_below_t_matches_the_model_with_explicit_times(
    models: dict[str, DiffusionModel],
) -> None:
    model = models["vp"]
    times = torch.linspace(400.0, 0.0, 9, dtype=torch.float64)
    x = noise()
    for name in ("dpmpp_2m", "ddpm"):
        want = model.sample(
            BSZ, init_noise=x, timestep_spacing=times, sampler=name, generator=gen()
        )
        got = sample(model.denoiser(), model.process, name, times, x, generator=gen())
        assert torch.equal(got, want)


@pytest.mark.parametrize("process", list(PROCESSES))
def test_flow_from_the_exact_marginal_below_t_ends_at_the_data(
    process: str, models: dict[str, DiffusionModel]
) -> None:
    """x_t0 = alpha(t0) x0 + sigma(t0) z with x0 ~ data is an exact draw of the marginal at t0;
    the probability-flow ODE from there (dpmpp_2m, 30 steps, exact denoiser) ends with the
    mixture's mean and covariance, up to the sampling error of n draws."""
    model = models[process]
    n, t0 = 2000, 0.45 * T
    x0 = MIX.sample(n, gen(1))
    a, s = model.process.alpha(t0), model.process.sigma(t0)
    x_t0 = a * x0 + s * torch.randn(n, 2, generator=gen(2), dtype=torch.float64)
    times = torch.linspace(t0, 0.0, 31, dtype=torch.float64)
    out = sample(model.denoiser(), model.process, "dpmpp_2m", times, x_t0)
    mean, cov = MIX.mean(), MIX.covariance()
    centred = out - mean
    # 5 standard errors of the mean and of each covariance entry, estimated from the draws
    mean_tol = 5 * (cov.diag() / n).sqrt()
    products = centred[:, :, None] * centred[:, None, :]
    cov_tol = 5 * products.std(0) / math.sqrt(n)
    assert ((out.mean(0) - mean).abs() < mean_tol).all(), (out.mean(0), mean)
    assert ((products.mean(0) - cov).abs() < cov_tol).all(), (products.mean(0), cov)


# -- callbacks -----------------------------------------------------------------------------------
class Recorder:
    """A callback that records its arguments and returns None."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, float, Tensor, Tensor | None]] = []

    def __call__(self, i: int, t_next: float, x_next: Tensor, x0_hat: Tensor | None) -> None:
        self.calls.append((i, t_next, x_next.clone(), None if x0_hat is None else x0_hat.clone()))


@pytest.mark.parametrize("process", list(PROCESSES))
@pytest.mark.parametrize("name", SAMPLERS)
def test_callback_sees_every_step_and_the_posterior_mean(
    name: str, process: str, models: dict[str, DiffusionModel]
) -> None:
    """callback(i, t_next, x_next, x0_hat): i = 0..S-1, t_next = times[1:], x0_hat the exact
    denoiser's E[x0 | x_i] at (x_i, t_i), where x_i is the sample the step started from; a
    callback returning None leaves the samples bitwise as they are."""
    model = models[process]
    times = default_times(model, name)
    x = noise() * model.process.prior_std()
    rec = Recorder()
    out = sample(model.denoiser(), model.process, name, times, x, generator=gen(), callback=rec)
    plain = sample(model.denoiser(), model.process, name, times, x, generator=gen())
    assert torch.equal(out, plain)
    assert [c[0] for c in rec.calls] == list(range(STEPS))
    assert [c[1] for c in rec.calls] == times[1:].tolist()
    assert all(isinstance(c[1], float) for c in rec.calls)
    assert torch.equal(rec.calls[-1][2], out)
    starts = [x] + [c[2] for c in rec.calls[:-1]]
    for (i, _, _, x0_hat), x_i, t_i in zip(rec.calls, starts, times[:-1].tolist(), strict=True):
        expected = MIX.denoise(x_i, model.process.alpha(t_i), model.process.sigma(t_i))
        assert x0_hat is not None
        torch.testing.assert_close(x0_hat, expected, rtol=1e-8, atol=1e-8, msg=f"step {i}")


@pytest.mark.parametrize("name", ["ddim", "euler", "heun"])
def test_replacement_restarts_a_single_step_solver(
    name: str, models: dict[str, DiffusionModel]
) -> None:
    """A solver without history, given y in place of x after step k, continues exactly as a
    fresh run from y over times[k + 1:]: the returned tensor is what the loop goes on with."""
    model = models["vp"]
    times, x, k = default_times(model, name), noise(), 2
    y = noise(seed=5) * 0.3

    def replace(i: int, t_next: float, x_next: Tensor, x0_hat: Tensor | None) -> Tensor | None:
        return y if i == k else None

    out = sample(model.denoiser(), model.process, name, times, x, callback=replace)
    restart = sample(model.denoiser(), model.process, name, times[k + 1 :], y)
    torch.testing.assert_close(out, restart, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out, sample(model.denoiser(), model.process, name, times, x))


def test_trajectory_holds_the_replaced_samples(models: dict[str, DiffusionModel]) -> None:
    """model.sample's trajectory (itself a callback) records the user callback's replacement."""
    model = models["vp"]
    x = noise()

    def halve(i: int, t_next: float, x_next: Tensor, x0_hat: Tensor | None) -> Tensor:
        return x_next * 0.5

    traj = model.sample(
        BSZ, STEPS, sampler="dpmpp_2m", init_noise=x, callback=halve, return_trajectory=True
    )
    out = model.sample(BSZ, STEPS, sampler="dpmpp_2m", init_noise=x, callback=halve)
    rec = Recorder()
    plain = model.sample(BSZ, STEPS, sampler="dpmpp_2m", init_noise=x, callback=rec)
    assert traj.shape == (STEPS + 1, BSZ, 2)
    assert torch.equal(traj[0], x) and torch.equal(traj[-1], out)
    assert torch.equal(traj[1], rec.calls[0][2] * 0.5)  # step 0 is shared, then halved
    assert not torch.allclose(out, plain)


def test_callback_returning_a_wrong_shape_or_type_is_refused(
    models: dict[str, DiffusionModel],
) -> None:
    model = models["vp"]
    d, times, x = model.denoiser(), default_times(model, "ddim"), noise()
    with pytest.raises(ValueError, match=r"after step 0.*shape \(4, 2\)"):
        sample(d, model.process, "ddim", times, x, callback=lambda i, t, xn, x0: xn[:2])
    with pytest.raises(ValueError, match="expected None"):
        sample(d, model.process, "ddim", times, x, callback=lambda i, t, xn, x0: xn.tolist())
    with pytest.raises(ValueError, match="after step 0"):
        model.sample(BSZ, 3, callback=lambda i, t, xn, x0: xn[None])


@pytest.fixture
def compiled_model() -> Iterator[tuple[DiffusionModel, CompileCounterWithBackend]]:
    """An exact float64 model whose compiled steps really compile (a counting aot_eager
    backend: small CPU samples would otherwise run the eager loop)."""
    counter = CompileCounterWithBackend("aot_eager")
    model = exact_model(MIX).compile_sampler(backend=counter)
    yield model, counter
    del model
    gc.collect()


def inpaint(model: DiffusionModel, known: Tensor) -> Any:
    """Replacement inpainting of coordinate 0: after each step it is set to its value on the
    noise-free path, alpha(t_next) * known."""

    def callback(i: int, t_next: float, x_next: Tensor, x0_hat: Tensor | None) -> Tensor:
        out = x_next.clone()
        out[:, 0] = float(model.process.alpha(t_next)) * known
        return out

    return callback


@pytest.mark.parametrize("name", ["dpmpp_2m", "ddpm", "heun"])
def test_inpainting_callback_same_eager_and_compiled_without_recompiles(
    name: str, compiled_model: tuple[DiffusionModel, CompileCounterWithBackend]
) -> None:
    model, counter = compiled_model
    known = torch.tensor([-2.0, 2.0, 0.0, -2.0], dtype=torch.float64)
    x = noise()
    kwargs: dict[str, Any] = {"sampler": name, "init_noise": x}
    runs = {
        flag: model.sample(
            BSZ, STEPS, callback=inpaint(model, known), generator=gen(), compile=flag, **kwargs
        )
        for flag in (False, True)
    }
    torch.testing.assert_close(runs[True], runs[False], rtol=1e-10, atol=1e-10)
    assert torch.equal(runs[False][:, 0], known)  # alpha(0) = 1: the known coordinate
    assert counter.frame_count == 1 and len(model.compiled_steps) == 1
    # the functional loop with the model's compiled steps; other callbacks and step counts
    # reuse the compiled step
    times = default_times(model, name, 4)
    eager = sample(
        model.denoiser(),
        model.process,
        name,
        times,
        x,
        generator=gen(),
        callback=inpaint(model, known),
    )
    compiled = sample(
        model.denoiser(),
        model.process,
        name,
        times,
        x,
        generator=gen(),
        callback=inpaint(model, 2 * known),
        compile=model.compiled_steps,
    )
    rerun = sample(
        model.denoiser(),
        model.process,
        name,
        times,
        x,
        generator=gen(),
        callback=inpaint(model, known),
        compile=model.compiled_steps,
    )
    torch.testing.assert_close(rerun, eager, rtol=1e-10, atol=1e-10)
    assert torch.equal(compiled[:, 0], 2 * known)
    assert counter.frame_count == 1 and len(model.compiled_steps) == 1
    # compiled x0_hat is the eager one
    recs = [Recorder(), Recorder()]
    for rec, flag in zip(recs, (False, model.compiled_steps), strict=True):
        sample(
            model.denoiser(),
            model.process,
            name,
            times,
            x,
            generator=gen(),
            callback=rec,
            compile=flag,
        )
    for a, b in zip(recs[0].calls, recs[1].calls, strict=True):
        assert a[0] == b[0] and a[1] == b[1]
        torch.testing.assert_close(b[2], a[2], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(b[3], a[3], rtol=1e-10, atol=1e-10)
    assert counter.frame_count == 1 and len(model.compiled_steps) == 1


def test_compiled_callback_wrong_shape_is_refused(
    compiled_model: tuple[DiffusionModel, CompileCounterWithBackend],
) -> None:
    model, _ = compiled_model
    with pytest.raises(ValueError, match="after step 0"):
        model.sample(BSZ, 3, sampler="ddim", compile=True, callback=lambda i, t, xn, x0: xn[:1])


# -- guidance strategies -------------------------------------------------------------------------
def test_cfg_is_the_guidance_formula() -> None:
    """CFG against the formula written out: x0 and eps mixed with weights (1 - w, w); with
    rescale phi, x0 <- phi x0 std(x0_c) / std(x0) + (1 - phi) x0 per sample (Lin et al. 2024,
    eq. 15-16, population std over the non-batch dims) and eps recomputed from x_t."""
    g = gen(3)
    shape = (5, 3, 4)
    x, x0_c, x0_u, eps_c, eps_u = (
        torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(5)
    )
    alpha = torch.rand(5, 1, 1, generator=g, dtype=torch.float64) + 0.1
    sigma = torch.rand(5, 1, 1, generator=g, dtype=torch.float64) + 0.1
    p = Point(torch.zeros(5, 1, 1, dtype=torch.float64), alpha, sigma, alpha * 0, alpha * 0)
    cond, uncond = Prediction(x0_c, eps_c, None), Prediction(x0_u, eps_u, None)
    step = torch.zeros((), dtype=torch.int64)
    w = 2.5
    x0, eps, state = CFG(w).combine(x, p, cond, uncond, (), step)
    torch.testing.assert_close(x0, (1 - w) * x0_u + w * x0_c, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eps, (1 - w) * eps_u + w * eps_c, rtol=1e-12, atol=1e-12)
    assert state == ()
    phi = 0.7
    x0_r, eps_r, _ = CFG(w, rescale=phi).combine(x, p, cond, uncond, (), step)
    guided = (1 - w) * x0_u + w * x0_c

    def std(v: Tensor) -> Tensor:
        flat = v.reshape(5, -1)
        return ((flat - flat.mean(1, keepdim=True)) ** 2).mean(1).sqrt().view(5, 1, 1)

    want = phi * guided * std(x0_c) / std(guided) + (1 - phi) * guided
    torch.testing.assert_close(x0_r, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(alpha * x0_r + sigma * eps_r, x, rtol=1e-12, atol=1e-12)
    # consistent pairs (x = alpha x0 + sigma eps) stay consistent under plain CFG
    cons_c = Prediction(x0_c, (x - alpha * x0_c) / sigma, None)
    cons_u = Prediction(x0_u, (x - alpha * x0_u) / sigma, None)
    x0_g, eps_g, _ = CFG(w).combine(x, p, cons_c, cons_u, (), step)
    torch.testing.assert_close(alpha * x0_g + sigma * eps_g, x, rtol=1e-12, atol=1e-12)
    # w = 1 is the conditional prediction, w = 0 the unconditional one
    torch.testing.assert_close(CFG(1.0).combine(x, p, cond, uncond, (), step)[0], x0_c)
    assert torch.equal(CFG(0.0).combine(x, p, cond, uncond, (), step)[0], x0_u)


def test_guidance_registry_and_option_errors() -> None:
    assert "cfg" in guidance.names()
    assert guidance.get("cfg") is CFG
    with pytest.raises(ValueError, match="cfg"):
        guidance.get("cgf")  # close match suggested
    with pytest.raises(TypeError, match="Accepted options: scale, rescale"):
        guidance.build("cfg", {"sacle": 2.0})
    with pytest.raises(TypeError, match="Guidance"):
        guidance.register("not_a_strategy")(object)
    cond = {"class_labels": torch.zeros(2, dtype=torch.int64)}
    resolve = guidance.resolve
    assert resolve() is None
    assert isinstance(resolve(guidance_scale=2, cond=cond), CFG)
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
            resolve(guidance_scale=bad, cond=cond)
    for bad in (True, "2.0", [2.0]):
        with pytest.raises(TypeError, match="guidance_scale must be a real number"):
            resolve(guidance_scale=bad, cond=cond)
    with pytest.raises(ValueError, match="guidance_rescale needs guidance_scale"):
        resolve(guidance_rescale=0.5, cond=cond)
    with pytest.raises(ValueError, match="guidance_rescale"):
        resolve(guidance_scale=2.0, guidance_rescale=1.5, cond=cond)
    with pytest.raises(ValueError, match="without cond"):
        resolve(guidance_scale=2.0)
    with pytest.raises(ValueError, match="without cond"):
        resolve("cfg")
    with pytest.raises(ValueError, match="without guidance"):
        resolve(guidance_kwargs={"scale": 2.0}, cond=cond)
    with pytest.raises(TypeError, match="guidance_kwargs must be a dict"):
        resolve("cfg", guidance_kwargs=[("scale", 2.0)], cond=cond)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not both"):
        resolve(CFG(2.0), guidance_scale=3.0, cond=cond)
    with pytest.raises(TypeError, match="method name"):
        resolve(3, cond=cond)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cfg"):
        resolve("cgf", cond=cond)


def make_cond_model() -> DiffusionModel:
    """A class-conditional float64 network with random weights (label 3 is the null class)."""
    torch.manual_seed(0)
    model = DiffusionModel(CondNet(2, num_classes=3), input_shape=(2,), num_timesteps=100)
    with torch.no_grad():
        for p in model.nn_module.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.double()


@pytest.fixture(scope="module")
def cond_model() -> DiffusionModel:
    return make_cond_model()


LABELS = torch.tensor([0, 1, 2, 1])


def test_guidance_by_name_object_or_scale_is_the_same(cond_model: DiffusionModel) -> None:
    model, x = cond_model, noise()

    def draw(**kwargs: Any) -> Tensor:
        return model.sample(
            BSZ, 5, sampler="dpmpp_2m", init_noise=x, cond={"class_labels": LABELS}, **kwargs
        )

    base = draw(guidance_scale=2.5)
    assert torch.equal(draw(guidance="cfg", guidance_scale=2.5), base)
    assert torch.equal(draw(guidance=CFG(2.5)), base)
    assert torch.equal(draw(guidance="cfg", guidance_kwargs={"scale": 2.5}), base)
    rescaled = draw(guidance_scale=2.5, guidance_rescale=0.5)
    assert torch.equal(
        draw(guidance="cfg", guidance_kwargs={"scale": 2.5, "rescale": 0.5}), rescaled
    )
    assert torch.equal(draw(guidance=CFG(2.5, rescale=0.5)), rescaled)
    assert not torch.equal(rescaled, base)
    assert not torch.equal(draw(), base)


class CountingGuidance(Guidance):
    """A stateful test strategy: its state counts the denoiser calls of a run, and the k-th
    call mixes with w_k = scale + k / 4. Eager calls are logged as (k, step)."""

    log: ClassVar[list[tuple[int, int]]] = []

    def __init__(self, scale: float = 1.5) -> None:
        self.scale = scale

    def init_state(self, x: Tensor) -> GuidanceState:
        return (torch.zeros((), dtype=torch.int64, device=x.device),)

    def combine(
        self,
        x: Tensor,
        p: Point,
        cond: Prediction,
        uncond: Prediction | None,
        state: GuidanceState,
        step: Tensor,
    ) -> tuple[Tensor, Tensor, GuidanceState]:
        assert uncond is not None
        (count,) = state
        if not torch.compiler.is_compiling():
            type(self).log.append((int(count), int(step)))
        w = self.scale + count.to(x.dtype) / 4
        x0 = uncond.x0 + w * (cond.x0 - uncond.x0)
        eps = uncond.eps + w * (cond.eps - uncond.eps)
        return x0, eps, (count + 1,)


@pytest.fixture(scope="module")
def counting() -> Iterator[str]:
    """CountingGuidance registered as user code would, removed afterwards."""
    guidance.register("test_counting")(CountingGuidance)
    yield "test_counting"
    guidance.REGISTRY.unregister("test_counting")


@pytest.mark.parametrize("name", ["ddim", "heun", "dpmpp_2m"])
def test_stateful_guidance_advances_once_per_denoiser_call(
    name: str, counting: str, cond_model: DiffusionModel
) -> None:
    model, x = cond_model, noise()
    solver = samplers.get(name)()
    CountingGuidance.log.clear()
    out = model.sample(
        BSZ, STEPS, sampler=name, init_noise=x, cond={"class_labels": LABELS}, guidance=counting
    )
    calls = solver.nfe(STEPS)
    per_step = calls // STEPS  # heun: two calls a step
    assert CountingGuidance.log == [(k, k // per_step) for k in range(calls)]
    # the state matters: a run at constant w (the state never advancing) differs
    const = model.sample(
        BSZ, STEPS, sampler=name, init_noise=x, cond={"class_labels": LABELS}, guidance_scale=1.5
    )
    assert not torch.allclose(out, const)
    # a second run starts from a fresh state
    CountingGuidance.log.clear()
    again = model.sample(
        BSZ, STEPS, sampler=name, init_noise=x, cond={"class_labels": LABELS}, guidance=counting
    )
    assert torch.equal(again, out) and CountingGuidance.log[0] == (0, 0)


@pytest.mark.parametrize("name", ["heun", "dpmpp_2m"])
def test_stateful_guidance_same_eager_and_compiled(name: str, counting: str) -> None:
    counter = CompileCounterWithBackend("aot_eager")
    model = make_cond_model().compile_sampler(backend=counter)
    x = noise()
    kwargs: dict[str, Any] = {
        "sampler": name,
        "init_noise": x,
        "cond": {"class_labels": LABELS},
        "guidance": counting,
        "guidance_kwargs": {"scale": 1.25},
    }
    eager = model.sample(BSZ, STEPS, **kwargs)
    compiled = model.sample(BSZ, STEPS, compile=True, **kwargs)
    torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-10)
    # another step count and another run: the same compiled step, its state restarted
    torch.testing.assert_close(
        model.sample(BSZ, 3, compile=True, **kwargs),
        model.sample(BSZ, 3, **kwargs),
        rtol=1e-10,
        atol=1e-10,
    )
    torch.testing.assert_close(
        model.sample(BSZ, STEPS, compile=True, **kwargs), eager, rtol=1e-10, atol=1e-10
    )
    assert counter.frame_count == 1 and len(model.compiled_steps) == 1


# -- the denoiser is immutable ----------------------------------------------------------------
def test_denoiser_is_immutable(cond_model: DiffusionModel) -> None:
    d = cond_model.denoiser(cond={"class_labels": LABELS}, guidance_scale=2.0)
    for name, value in [
        ("guidance", None),
        ("network", cond_model.nn_module),
        ("cond", None),
        ("new_attribute", 1),
    ]:
        with pytest.raises(AttributeError, match="immutable"):
            setattr(d, name, value)
    assert d.guidance_scale == 2.0 and d.guided
    bound = d.bind(d.init_state(noise()), torch.zeros((), dtype=torch.int64))
    bound(noise(), cond_model.process.points(torch.tensor([50.0], dtype=torch.float64))[0])
    assert d.guidance_scale == 2.0 and bound.first_x0 is not None


# -- the functional loop's shared compiled steps -------------------------------------------------
# sample(..., compile=True | CompileOptions) shares one step cache per CompileOptions among all
# denoisers: entries must tell targets and traced networks apart, each run must call its own
# network and cond (also when a callback runs another compiled sample), and a finished run must
# let go of its network.
AOT = CompileOptions(backend="aot_eager")


def test_functional_compiled_steps_tell_targets_apart() -> None:
    times, x = torch.linspace(500.0, 0.0, 4, dtype=torch.float64), noise()
    for target in ("pred_eps", "pred_v", "pred_x_0"):
        model = exact_model(MIX, target_type=target)
        eager = sample(model.denoiser(), model.process, "ddim", times, x)
        compiled = sample(model.denoiser(), model.process, "ddim", times, x, compile=AOT)
        torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-10, msg=target)


def test_functional_compile_network_runs_each_denoisers_network() -> None:
    options = CompileOptions(backend="aot_eager", compile_network=True)
    times, x = torch.linspace(50.0, 0.0, 4, dtype=torch.float64), noise()
    for scale in (1.0, 2.0):
        model = make_cond_model()
        with torch.no_grad():
            for p in model.nn_module.parameters():
                p.mul_(scale)
        eager = sample(model.denoiser(), model.process, "ddim", times, x)
        compiled = sample(model.denoiser(), model.process, "ddim", times, x, compile=options)
        torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-10, msg=str(scale))


def test_functional_compiled_sampling_releases_the_network() -> None:
    model = exact_model(MIX)
    times = torch.linspace(500.0, 0.0, 4, dtype=torch.float64)
    sample(model.denoiser(), model.process, "ddim", times, noise(), compile=AOT)
    network = weakref.ref(model.nn_module)
    del model
    gc.collect()
    assert network() is None


def test_compiled_sampling_inside_a_callback_keeps_the_outer_runs_cond() -> None:
    model = make_cond_model().compile_sampler(backend="aot_eager")
    x = noise()
    outer = {"class_labels": LABELS}
    inner = {"class_labels": torch.tensor([2, 2, 2, 2])}

    def preview(i: int, t_next: float, x_next: Tensor, x0_hat: Tensor | None) -> None:
        if i == 0:
            model.sample(BSZ, 5, sampler="ddim", init_noise=x, cond=inner, compile=True)

    for compile_flag in (False, True):
        alone = model.sample(BSZ, 5, sampler="ddim", init_noise=x, cond=outer, compile=compile_flag)
        nested = model.sample(
            BSZ, 5, sampler="ddim", init_noise=x, cond=outer, compile=compile_flag, callback=preview
        )
        torch.testing.assert_close(nested, alone, rtol=1e-10, atol=1e-10, msg=str(compile_flag))
