"""The process core: alpha(t), sigma(t), lambda(t) and its inverse on every process, and a
continuous path registered by decorator on which every registered sampler converges to the
exact probability-flow solution at its order."""

from __future__ import annotations

import math

import pytest
import torch
from _models import RING as MIX
from _models import exact_model
from torch import Tensor

import tinydiff
from tinydiff import DiffusionModel, samplers, spacings, targets
from tinydiff.process import ContinuousProcess, DiscreteVP
from tinydiff.schedules import build_alphas_cumprod, build_process
from tinydiff.testing import probability_flow_reference

T = 1000


# Two paths registered the way a user would: a variance-preserving cosine path (sigma(0) = 0,
# clean data at t = 0) and a path off the VP circle (alpha^2 + sigma^2 != 1, sigma(0) > 0).
@tinydiff.schedules.register_path("test_cosine_path", variance_preserving=True, override=True)
def cosine_path(s: Tensor, end: float = 0.98) -> tuple[Tensor, Tensor]:
    angle = 0.5 * math.pi * end * s
    return torch.cos(angle), torch.sin(angle)


@tinydiff.schedules.register_path("test_linear_path", override=True)
def linear_path(s: Tensor) -> tuple[Tensor, Tensor]:
    return 1 - 0.9 * s, 0.02 + 1.5 * s


PATHS = ("test_cosine_path", "test_linear_path")


def noise(n: int, seed: int = 0) -> Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- the process API ---------------------------------------------------------------------------
def test_registered_path_builds_a_continuous_process() -> None:
    process = build_process("test_cosine_path", T, {"end": 0.9})
    assert isinstance(process, ContinuousProcess) and process.variance_preserving
    t = torch.tensor([0.0, 250.0, 1000.0], dtype=torch.float64)
    angle = 0.5 * math.pi * 0.9 * t / T
    torch.testing.assert_close(process.alpha(t), torch.cos(angle), rtol=0, atol=1e-15)
    torch.testing.assert_close(process.sigma(t), torch.sin(angle), rtol=0, atol=1e-15)
    assert process.lam(0.0) == math.inf
    assert process.prior_std() == 1.0


@pytest.mark.parametrize("schedule", ["cosine", "linear", *PATHS])
def test_time_at_lam_inverts_lam(schedule: str) -> None:
    process = build_process(schedule, T)
    t = torch.tensor([1.0, 3.25, 100.0, 517.5, 999.0], dtype=torch.float64)
    torch.testing.assert_close(process.time_at_lam(process.lam(t)), t, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "schedule, options",
    [("linear", {}), ("cosine", {"zero_terminal_snr": True}), ("rectified_flow", {}), ("edm", {})],
)
def test_time_at_lam_is_the_inverse_of_lambda_on_every_kind(schedule: str, options: dict) -> None:
    """lambda = log(alpha / sigma) (half the log-SNR) and its one inverse: t -> lam -> t on a
    table (also under zero terminal SNR: lam(T) = -inf maps to T) and on paths with a closed
    form inverse; and lam -> t -> lam on a lambda grid."""
    process = build_process(schedule, T, **options)
    t = torch.tensor([0.5, 1.0, 3.25, 100.0, 517.5, 999.0, 999.75], dtype=torch.float64)
    alpha, sigma = process.alpha_sigma(t)
    torch.testing.assert_close(process.lam(t), torch.log(alpha / sigma), rtol=1e-14, atol=0)
    torch.testing.assert_close(process.time_at_lam(process.lam(t)), t, rtol=1e-9, atol=1e-9)
    lo, hi = process.lam(torch.tensor([999.0, 1.0], dtype=torch.float64)).tolist()
    lam = torch.linspace(lo, hi, 50, dtype=torch.float64)
    torch.testing.assert_close(process.lam(process.time_at_lam(lam)), lam, rtol=1e-9, atol=1e-9)
    if math.isinf(process.lam(float(T))):
        assert float(process.time_at_lam(torch.tensor(-math.inf))) == T


def test_time_at_lam_of_a_table_is_exact_per_segment() -> None:
    """Inside [k, k + 1], lambda is linear in t: t = k + (lam - lam_k) / (lam_{k+1} - lam_k)."""
    table = build_alphas_cumprod("linear", 100)
    lam_k = 0.5 * (torch.log(table) - torch.log1p(-table))  # lambda at the integers, closed form
    k = torch.tensor([3, 40, 98])
    frac = torch.tensor([0.25, 0.5, 0.875], dtype=torch.float64)
    lam = lam_k[k] + frac * (lam_k[k + 1] - lam_k[k])
    process = DiscreteVP(table)
    torch.testing.assert_close(process.time_at_lam(lam), k + frac, rtol=0, atol=1e-12)
    torch.testing.assert_close(process.lam(k + frac), lam, rtol=1e-12, atol=1e-12)


def test_t_min_is_the_smallest_trained_time() -> None:
    assert DiscreteVP(build_alphas_cumprod("cosine", 100)).t_min == 1.0
    for schedule in ("rectified_flow", "edm", *PATHS):
        assert build_process(schedule, T).t_min == 0.0


class _LateStartPath(ContinuousProcess):
    """A user's process trained only from t = 40 on."""

    @property
    def t_min(self) -> float:
        return 40.0


def test_spacings_and_heun_read_t_min() -> None:
    process = _LateStartPath(cosine_path, T, name="late")
    for name in ("karras", "logsnr", "logsnr_trailing"):
        ts = spacings.resolve(name, process, 8)
        assert ts[-2] == 40.0 and ts[-1] == 0.0, name
    # heun's last step to t = 0 puts its second call no lower than t_min
    plan = samplers.get("heun")().plan(process.path_values(spacings.resolve("karras", process, 8)))
    assert float(plan["point_2"][-1, 0]) == pytest.approx(40.0)
    ts = spacings.resolve("trailing", process, 4)
    plan = samplers.get("heun")().plan(process.path_values(ts))
    node = float(plan["point_2"][-1, 0])  # the Gauss-Laguerre node lambda(t_3) + 1, above 40
    expect = float(process.time_at_lam(process.lam(ts[-2]) + 1))
    assert node == pytest.approx(max(expect, 40.0))


def test_the_table_is_cached_once_per_device() -> None:
    process = DiscreteVP(build_alphas_cumprod("cosine", 100))
    assert process.table("cpu") is process.table(torch.device("cpu"))
    calls: list[torch.device] = []

    def build(device: torch.device) -> Tensor:
        calls.append(device)
        return torch.zeros(3, device=device)

    first = process.on_device("mine", "cpu", build)
    assert process.on_device("mine", "cpu", build) is first and len(calls) == 1


def test_process_imports_nothing_from_schedules() -> None:
    """The process is the bottom of the core: no import of schedules, even inside functions."""
    import ast
    import inspect

    import tinydiff.process

    tree = ast.parse(inspect.getsource(tinydiff.process))
    imported = {
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert not {m for m in imported if m and m.startswith("tinydiff")}, imported


@pytest.mark.parametrize("schedule", ["cosine", *PATHS])
def test_derivatives_match_finite_differences(schedule: str) -> None:
    """d alpha / ds and d sigma / ds (s = t / T) against central differences inside segments."""
    process = build_process(schedule, T)
    t = torch.tensor([10.5, 333.3, 800.7], dtype=torch.float64)
    h = 1e-4
    d_alpha, d_sigma = process.derivatives(t)
    fd_alpha = (process.alpha(t + h) - process.alpha(t - h)) / (2 * h) * T
    fd_sigma = (process.sigma(t + h) - process.sigma(t - h)) / (2 * h) * T
    torch.testing.assert_close(d_alpha, fd_alpha, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(d_sigma, fd_sigma, rtol=1e-6, atol=1e-8)


def test_discrete_vp_is_the_table() -> None:
    table = build_alphas_cumprod("cosine", 100)
    process = DiscreteVP(table)
    t = torch.arange(101, dtype=torch.float64)
    assert torch.equal(process.alpha_bar(t), table)
    torch.testing.assert_close(
        process.alpha(t) ** 2 + process.sigma(t) ** 2, torch.ones(101, dtype=torch.float64)
    )


def test_a_path_whose_noise_does_not_grow_is_refused() -> None:
    @tinydiff.schedules.register_path("test_bad_path", override=True)
    def bad(s: Tensor) -> tuple[Tensor, Tensor]:
        return 1 - 0.5 * s, 0.5 - 0.4 * s  # alpha / sigma increases: less noise later

    with pytest.raises(ValueError, match="strictly decreasing"):
        DiffusionModel(torch.nn.Identity(), input_shape=(2,), noise_schedule_type="test_bad_path")


def test_zero_terminal_snr_is_refused_on_a_continuous_path() -> None:
    with pytest.raises(ValueError, match="continuous path"):
        tinydiff.DiffusionModelConfig(
            input_shape=(2,), noise_schedule_type="test_cosine_path", zero_terminal_snr=True
        )


# -- every sampler on a registered continuous path, against the exact flow ---------------------
ORDERS: dict[str, tuple[dict[str, object], float, float | None]] = {
    "ddim": ({"eta": 0.0}, 0.8, 1.3),
    "euler": ({}, 0.8, 1.3),
    "heun": ({}, 1.8, None),
    "dpmpp_2m": ({}, 1.8, None),
    "dpmpp_2m_sde": ({"eta": 0.0}, 1.8, None),
    "dpmpp_3m": ({}, 2.5, None),
    "unipc": ({}, 1.8, None),
    "deis": ({}, 1.8, None),
}


@pytest.fixture(scope="module", params=PATHS)
def flow(request: pytest.FixtureRequest) -> tuple[DiffusionModel, Tensor, Tensor, str]:
    """A model on the path, initial noise, and the exact flow's solution.

    test_cosine_path has sigma(0) = 0: the last step to t = 0 returns D(x(1), 1), so with
    ``logsnr`` spacing (t_{S-1} = 1 for every S) the reference is D at t = 1 of the flow from
    t = T. test_linear_path has sigma(0) > 0: every step is an ordinary step and the reference
    is the flow's x(0) itself.
    """
    name = request.param
    model = exact_model(noise_schedule_type=name, target_type="pred_v")
    z = noise(64) * model.process.prior_std()
    p = model.process
    start = (float(p.alpha(float(T))), float(p.sigma(float(T))))
    if name == "test_cosine_path":
        end, denoise_end = (float(p.alpha(1.0)), float(p.sigma(1.0))), True
    else:
        end, denoise_end = (float(p.alpha(0.0)), float(p.sigma(0.0))), False
    ref = probability_flow_reference(
        MIX, z, start=start, end=end, num_steps=2000, denoise_end=denoise_end
    )
    return model, z, ref, name


@pytest.mark.parametrize("name", samplers.names())
def test_every_sampler_converges_on_a_registered_path(
    name: str, flow: tuple[DiffusionModel, Tensor, Tensor, str]
) -> None:
    model, z, ref, path = flow
    kwargs, low, high = ORDERS.get(name, ({}, 0.8, None))
    if model.make_sampler(name, kwargs).is_stochastic:
        pytest.skip(f"{name} is stochastic with its default options")
    if name == "deis" and path == "test_cosine_path":
        pytest.skip("deis keeps its order on the last step to sigma = 0: it targets x(0)")
    errs = []
    for steps in (20, 40):
        out = model.sample(
            64, steps, sampler=name, sampler_kwargs=kwargs, init_noise=z, timestep_spacing="logsnr"
        )
        errs.append(((out - ref) ** 2).mean().sqrt().item())
    order = math.log2(errs[0] / errs[1])
    assert errs[1] < 0.07, (path, errs)
    assert order >= low, (path, errs, order)
    if high is not None:
        assert order <= high, (path, errs, order)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("spacing", spacings.names())
@pytest.mark.parametrize("name", samplers.names())
def test_every_sampler_and_spacing_is_finite_on_a_registered_path(
    name: str, spacing: str, path: str
) -> None:
    model = exact_model(noise_schedule_type=path, target_type="pred_v")
    g = torch.Generator().manual_seed(0)
    for steps in (1, 2, 8):
        x = model.sample(4, steps, sampler=name, timestep_spacing=spacing, generator=g)
        assert torch.isfinite(x).all(), (name, spacing, steps)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("variance", ["upper_bound", "lower_bound", "learned_range"])
@pytest.mark.parametrize("target", targets.names())
@pytest.mark.parametrize("name", samplers.names())
def test_every_sampler_target_and_variance_is_finite_on_a_registered_path(
    name: str, target: str, variance: str, path: str
) -> None:
    # learned_range's VLB term needs integer training times (continuous paths default to
    # uniform real times)
    extra = {"time_sampling": "uniform_discrete"} if variance == "learned_range" else {}
    model = exact_model(
        noise_schedule_type=path, target_type=target, variance_type=variance, **extra
    )
    x = model.sample(4, 6, sampler=name, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()
    loss = model.loss(MIX.sample(8, torch.Generator().manual_seed(1)))
    assert torch.isfinite(loss).all()
