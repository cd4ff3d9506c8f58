"""The generic Registry: registration forms, normalisation, duplicates, lookups, errors."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import tinydiff
from tinydiff import DiffusionModel, DiffusionModelConfig
from tinydiff._registry import Registry, normalize_name

REGISTRY_MODULES = [
    tinydiff.schedules,
    tinydiff.targets,
    tinydiff.variances,
    tinydiff.losses,
    tinydiff.samplers,
    tinydiff.spacings,
]


def test_normalisation() -> None:
    assert normalize_name(" Pred-X.0 ") == "pred_x_0"
    with pytest.raises(ValueError):
        normalize_name("  ")
    with pytest.raises(TypeError):
        normalize_name(3)  # type: ignore[arg-type]


def test_register_forms_and_lookup() -> None:
    reg: Registry[object] = Registry("widget")

    @reg.register
    def plain() -> None: ...

    @reg.register("Named-One", aliases=("alias one",))
    def named() -> None: ...

    def called() -> None: ...

    assert reg.register("called", called) is called
    assert reg.get("plain") is plain
    assert reg.get("named_one") is named and reg.get("NAMED.ONE") is named
    assert reg.get("Alias-One") is named
    assert reg.get("called") is called
    assert reg.names() == ["called", "named_one", "plain"]
    assert reg.names("*ed*") == ["called", "named_one"]
    assert "alias_one" in reg and "nope" not in reg and 3 not in reg


def test_duplicates_refused_unless_override() -> None:
    reg: Registry[object] = Registry("widget")
    reg.register("a", object())
    with pytest.raises(ValueError, match="already registered.*override=True"):
        reg.register("A", object())
    with pytest.raises(ValueError, match="already registered"):
        reg.register("b", object(), aliases=("a",))
    new = object()
    reg.register("a", new, override=True)
    assert reg.get("a") is new


def test_unknown_name_lists_close_matches_and_all_names() -> None:
    reg: Registry[object] = Registry("widget")
    for n in ("cosine", "linear", "sigmoid"):
        reg.register(n, object())
    with pytest.raises(ValueError) as err:
        reg.get("cosin")
    msg = str(err.value)
    assert "unknown widget 'cosin'" in msg
    assert "Did you mean 'cosine'" in msg
    assert "Available: cosine, linear, sigmoid" in msg


@pytest.mark.parametrize("module", REGISTRY_MODULES, ids=lambda m: m.__name__)
def test_each_registry_module_exposes_the_api(module) -> None:
    assert callable(module.register) and callable(module.get) and callable(module.names)
    assert module.names(), f"{module.__name__} has no entries"
    for name in module.names():
        assert module.get(name) is module.get(name.upper())


@pytest.mark.parametrize(
    "field, bad, kind",
    [
        ("noise_schedule_type", "cosin", "noise schedule"),
        ("target_type", "pred_x1", "prediction target"),
        ("sigma_type", "upper", "variance type"),
        ("loss_type", "l3", "loss"),
        ("sampler_type", "ddpn", "sampler"),
        ("timestep_spacing", "trail", "timestep spacing"),
    ],
)
def test_unknown_name_in_config_is_a_validation_error(field: str, bad: str, kind: str) -> None:
    with pytest.raises(ValidationError) as err:
        DiffusionModelConfig(input_shape=(2,), **{field: bad})
    msg = str(err.value)
    assert f"unknown {kind} {bad!r}" in msg and "Available:" in msg


def test_registered_objects_are_checked() -> None:
    with pytest.raises(TypeError, match="must be callable"):
        tinydiff.schedules.register("not_callable", 3)
    with pytest.raises(TypeError, match="subclass of tinydiff.samplers.Sampler"):
        tinydiff.samplers.register("bad_sampler", object)
    with pytest.raises(TypeError, match="prediction target must be a class"):
        tinydiff.targets.register("bad_target", lambda: None)


class _Net(torch.nn.Module):
    def __init__(self, out_mult: int = 1) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2 * out_mult)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.cat([x, t[:, None] / 1000], 1))


def test_custom_schedule_end_to_end() -> None:
    @tinydiff.schedules.register("my_schedule")
    def my_schedule(num_timesteps: int) -> torch.Tensor:
        return torch.linspace(1.0, 0.01, num_timesteps + 1)

    try:
        cfg = DiffusionModelConfig(
            input_shape=(2,), noise_schedule_type="my_schedule", num_timesteps=50
        )
        model = DiffusionModel(_Net(), cfg)
        assert torch.allclose(model.alphas_cumprod, torch.linspace(1.0, 0.01, 51).double())
        assert model.alphas_cumprod.dtype == torch.float64
        model.loss(torch.randn(8, 2)).mean().backward()
        assert model.sample(4, 10).shape == (4, 2)
    finally:
        tinydiff.schedules.REGISTRY.unregister("my_schedule")


@pytest.mark.parametrize(
    "table, match",
    [
        (torch.linspace(1.0, 0.1, 50), "returned 50 values; expected num_timesteps \\+ 1 = 51"),
        (torch.cat([torch.linspace(1.0, 0.1, 50), torch.tensor([0.5])]), "not strictly decreasing"),
        (torch.cat([torch.linspace(1.0, 0.1, 50), torch.tensor([float("nan")])]), "NaN"),
        (torch.linspace(1.5, 0.1, 51), "must lie in \\(0, 1\\]"),
        (torch.linspace(1.0, 0.0, 51), "must lie in \\(0, 1\\]"),
        ([1.0, 0.5], "returned 2 values"),
    ],
)
def test_custom_schedule_output_is_validated(table, match: str) -> None:
    tinydiff.schedules.register("bad_schedule", lambda num_timesteps: table, override=True)
    try:  # the table is checked when the config is built (it was at DiffusionModel())
        with pytest.raises(ValueError, match=match):
            cfg = DiffusionModelConfig(
                input_shape=(2,), noise_schedule_type="bad_schedule", num_timesteps=50
            )
            DiffusionModel(_Net(), cfg)
    finally:
        tinydiff.schedules.REGISTRY.unregister("bad_schedule")


def test_custom_target_variance_loss_sampler_end_to_end() -> None:
    @tinydiff.targets.register("pred_neg_eps")
    class PredNegEps(tinydiff.targets.Target):
        """Predicts -eps (a deliberately odd but valid target)."""

        supports_zero_snr = False

        def target(self, x0, eps, alpha_bar):
            return -eps

        def to_x0_eps(self, out, x_t, alpha_bar):
            return (x_t + (1 - alpha_bar).sqrt() * out) / alpha_bar.sqrt(), -out

    @tinydiff.variances.register("half_way")
    class HalfWay(tinydiff.variances.Variance):
        def log_variance(self, log_beta, log_beta_tilde, var_out):
            return 0.5 * (log_beta + log_beta_tilde)

    @tinydiff.losses.register("l4")
    def l4(pred, target, scale: float = 1.0):
        return scale * (pred - target) ** 4

    @tinydiff.samplers.register("x0_jump")
    class X0Jump(tinydiff.samplers.Sampler):
        """Jumps straight to the next noise level along the predicted x0 and eps."""

        def plan(self, timesteps, alpha_bar):
            return {"a": alpha_bar[1:].sqrt(), "s": (1 - alpha_bar[1:]).sqrt()}

        def step(self, x, state, c, denoise, noise):
            pred = denoise(x, c["t"], c["alpha_bar"])
            return c["a"] * pred.x0 + c["s"] * pred.eps, state

    try:
        cfg = DiffusionModelConfig(
            input_shape=(2,),
            target_type="pred_neg_eps",
            sigma_type="half_way",
            loss_type="l4",
            loss_kwargs={"scale": 2.0},
            sampler_type="x0_jump",
        )
        model = DiffusionModel(_Net(), cfg)
        x, t, noise = torch.randn(8, 2), torch.randint(1, 1001, (8,)), torch.randn(8, 2)
        out = model.nn_module(
            model.alphas_cumprod[t].float().sqrt()[:, None] * x
            + (1 - model.alphas_cumprod[t].float())[:, None].sqrt() * noise,
            t.float(),
        )
        expected = 2.0 * (out + noise) ** 4
        assert torch.allclose(model.loss(x, t=t, noise=noise), expected, atol=1e-6)
        assert model.sample(4, 5).shape == (4, 2)
        assert model.sample(4, 5, sampler="ddpm").shape == (4, 2)
        with pytest.raises(ValidationError, match="invalid options"):
            DiffusionModelConfig(input_shape=(2,), loss_type="l4", loss_kwargs={"scal": 2.0})
    finally:
        tinydiff.targets.REGISTRY.unregister("pred_neg_eps")
        tinydiff.variances.REGISTRY.unregister("half_way")
        tinydiff.losses.REGISTRY.unregister("l4")
        tinydiff.samplers.REGISTRY.unregister("x0_jump")
