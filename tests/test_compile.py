"""Compiled sampling (issue 5): fullgraph steps, no recompiles, no host syncs, same results.

Compile time dominates this file on a small CPU machine, so compiled steps are shared: one
inductor model per module (its step cache keeps one compiled step per sampler), and the
fullgraph/recompile proofs over every registered sampler use the cheap ``aot_eager`` backend.
"""

from __future__ import annotations

import gc
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from copy import deepcopy
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounterWithBackend

from tinydiff import DiffusionModel, samplers
from tinydiff._compile import CompileOptions
from tinydiff.samplers.base import build_plan, run_sampler

SAMPLERS = samplers.names()
BSZ = 8


class SmallMLP(nn.Module):
    """net(x (bsz, D), t (bsz,)) -> (bsz, out_mult * D); records the dtype it computed in."""

    def __init__(self, dim: int = 2, out_mult: int = 1, hidden: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(dim + 1, hidden)
        self.out = nn.Linear(hidden, dim * out_mult)
        self.compute_dtypes: list[torch.dtype] = []

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        h = torch.nn.functional.silu(self.inp(torch.cat([x, t[:, None] / 100.0], dim=1)))
        if not torch.compiler.is_compiling():
            self.compute_dtypes.append(h.dtype)
        return self.out(h)


def make_model(sigma_type: str = "upper_bound", backend: Any = "inductor") -> DiffusionModel:
    torch.manual_seed(0)
    mult = 2 if sigma_type == "learned_range" else 1
    # pred_v keeps x0 and eps well conditioned at every noise level, so relative errors are
    # meaningful for an untrained network
    config = {
        "input_shape": (2,),
        "num_timesteps": 100,
        "target_type": "pred_v",
        "sigma_type": sigma_type,
    }
    model = DiffusionModel(SmallMLP(out_mult=mult), config)
    return model.compile_sampler(backend=backend)


@pytest.fixture(scope="module")
def inductor_model() -> Iterator[tuple[DiffusionModel, CompileCounterWithBackend]]:
    """One model compiled with inductor, shared by the tests of this module."""
    counter = CompileCounterWithBackend("inductor")
    yield make_model(backend=counter), counter


def sample(model: DiffusionModel, name: str, steps: int, **kwargs: Any) -> Tensor:
    gen = torch.Generator().manual_seed(1234)
    return model.sample(BSZ, steps, sampler=name, generator=gen, **kwargs)


# -- no graph breaks, no recompiles ---------------------------------------------------------------
@pytest.mark.parametrize("name", SAMPLERS)
def test_step_compiles_fullgraph_once_for_any_number_of_steps(name: str) -> None:
    counter = CompileCounterWithBackend("aot_eager")
    model = make_model(backend=counter)
    # fullgraph=True: a graph break anywhere in the step raises instead of splitting
    for steps in (6, 3, 1, 11):
        x = sample(model, name, steps, compile=True)
        assert torch.isfinite(x).all()
    assert counter.frame_count == 1, f"{name}: {counter.frame_count} compiles for 4 runs"
    assert len(model.compiled_steps) == 1


def test_inference_mode_with_noise_made_outside_compiles_once() -> None:
    """Under inference_mode the steps after the first get inference tensors; a normal x (here
    init_noise made outside inference_mode) must not compile the step again for step 0."""
    counter = CompileCounterWithBackend("aot_eager")
    model = make_model(backend=counter)
    x = torch.randn(BSZ, 2)
    with torch.inference_mode():
        for steps in (4, 3):
            compiled = model.sample(BSZ, steps, sampler="dpmpp_2m", init_noise=x, compile=True)
            eager = model.sample(BSZ, steps, sampler="dpmpp_2m", init_noise=x)
            torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1


def test_learned_range_network_through_the_opaque_operator() -> None:
    counter = CompileCounterWithBackend("aot_eager")
    model = make_model("learned_range", backend=counter)
    eager = sample(model, "ddpm", 5)
    compiled = sample(model, "ddpm", 5, compile=True)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1


def test_many_cache_entries_do_not_hit_the_recompile_limit() -> None:
    counter = CompileCounterWithBackend("aot_eager")
    model = make_model(backend=counter)
    limit = torch._dynamo.config.recompile_limit
    for bsz in range(2, limit + 4):
        for steps in (2, 3):
            model.sample(bsz, steps, sampler="ddim", compile=True)
    # each entry has its own code object: compiled once each, never falling back to eager
    assert counter.frame_count == limit + 2
    assert len(model.compiled_steps) == limit + 2


# -- same results --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SAMPLERS)
def test_compiled_matches_eager(
    name: str, inductor_model: tuple[DiffusionModel, CompileCounterWithBackend]
) -> None:
    model, counter = inductor_model
    before = counter.frame_count
    for steps in (8, 3):
        eager = sample(model, name, steps)
        compiled = sample(model, name, steps, compile=True)
        scale = eager.abs().max()
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5 * float(scale))
    assert counter.frame_count == before + 1  # one inductor compile for both step counts


def test_compiled_trajectory_matches_eager(
    inductor_model: tuple[DiffusionModel, CompileCounterWithBackend],
) -> None:
    model, _ = inductor_model
    eager = sample(model, "ddim", 4, return_trajectory=True)
    compiled = sample(model, "ddim", 4, return_trajectory=True, compile=True)
    assert compiled.shape == (5, BSZ, 2)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target_type", ["pred_eps", "pred_x_0", "pred_v"])
def test_compiled_conditioning_guidance_and_ema_match_eager(target_type: str) -> None:
    """cond, classifier-free guidance (with rescale) and EMA weights reach the opaque network
    call: compiled sampling runs the eager denoiser's code and gives eager sampling's samples."""
    from _nets import CondNet

    from tinydiff import DiffusionModelConfig

    torch.manual_seed(0)
    cfg = DiffusionModelConfig(input_shape=(2,), num_timesteps=100, target_type=target_type)
    model = DiffusionModel(CondNet(2, num_classes=3), cfg)
    counter = CompileCounterWithBackend("inductor")  # a custom backend always compiles
    model.compile_sampler(backend=counter)
    model.enable_ema(decay=0.5)
    with torch.no_grad():
        for p in model.nn_module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.update_ema()
    labels = torch.tensor([0, 1, 2, 1])
    for kwargs in (
        {"cond": {"class_labels": labels}},
        {"cond": {"class_labels": labels}, "guidance_scale": 2.5},
        {"cond": {"class_labels": labels}, "guidance_scale": 2.5, "use_ema": True},
    ):
        runs = [
            model.sample(
                4,
                6,
                sampler="dpmpp_2m",
                generator=torch.Generator().manual_seed(1),
                compile=flag,
                **kwargs,
            )
            for flag in (False, True)
        ]
        torch.testing.assert_close(runs[1], runs[0], rtol=1e-5, atol=1e-5)
    live = model.sample(
        4,
        6,
        sampler="dpmpp_2m",
        cond={"class_labels": labels},
        compile=True,
        generator=torch.Generator().manual_seed(1),
    )
    ema = model.sample(
        4,
        6,
        sampler="dpmpp_2m",
        cond={"class_labels": labels},
        compile=True,
        use_ema=True,
        generator=torch.Generator().manual_seed(1),
    )
    assert (live - ema).abs().max() > 1e-4  # the EMA weights really are used
    # guidance rescale runs through the same denoiser code when compiled (0.1 refused it)
    rescaled = [
        model.sample(
            4,
            6,
            sampler="dpmpp_2m",
            cond={"class_labels": labels},
            guidance_scale=2.0,
            guidance_rescale=0.7,
            generator=torch.Generator().manual_seed(1),
            compile=flag,
        )
        for flag in (False, True)
    ]
    torch.testing.assert_close(rescaled[1], rescaled[0], rtol=1e-5, atol=1e-5)
    plain = model.sample(
        4,
        6,
        sampler="dpmpp_2m",
        cond={"class_labels": labels},
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(1),
        compile=True,
    )
    assert (plain - rescaled[1]).abs().max() > 1e-4  # the rescale really is applied
    assert counter.frame_count >= 1  # and the compiled step did run


def test_small_cpu_samples_run_the_faster_eager_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU with inductor, compile=True keeps the eager loop below CPU_EAGER_BELOW_NUMEL
    (dispatch would cost more than it saves) and compiles above it; same samples either way."""
    from tinydiff import _compile

    model = make_model()  # backend "inductor", the default
    eager = sample(model, "ddim", 4)
    small = sample(model, "ddim", 4, compile=True)
    assert len(model.compiled_steps) == 0
    torch.testing.assert_close(small, eager)
    monkeypatch.setattr(_compile, "CPU_EAGER_BELOW_NUMEL", 2 * BSZ)  # BSZ x 2 elements: compile
    compiled = sample(model, "ddim", 4, compile=True)
    assert len(model.compiled_steps) == 1
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    options = CompileOptions()
    big = torch.empty(_compile.CPU_EAGER_BELOW_NUMEL)
    assert not options.eager_is_faster(big)
    assert not CompileOptions(compile_network=True).eager_is_faster(big[:4])
    assert not CompileOptions(backend="aot_eager").eager_is_faster(big[:4])


def test_compile_network_matches_eager() -> None:
    model = make_model()
    model.compile_sampler(compile_network=True)
    eager = sample(model, "ddim", 5)
    compiled = sample(model, "ddim", 5, compile=True)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_compile_network_traces_only_the_live_network() -> None:
    """A step compiled with the network traced into it serves the model's own network only: the
    EMA copy (another module) is refused, so a later live run can never replay it."""
    model = make_model(backend="aot_eager")
    model.enable_ema(0.9)
    model.compile_sampler(backend="aot_eager", compile_network=True)
    with pytest.raises(ValueError, match="use_ema need compile_network=False"):
        sample(model, "ddim", 5, compile=True, use_ema=True)
    torch.testing.assert_close(
        sample(model, "ddim", 5, compile=True), sample(model, "ddim", 5), rtol=1e-5, atol=1e-5
    )


# -- no host syncs -------------------------------------------------------------------------------
@contextmanager
def host_syncs_forbidden() -> Iterator[None]:
    """Make the CPU kernels of the ops that read a tensor's value on the host raise.

    ``.item()``, ``bool(t)``, ``int(t)``, ``float(t)`` and ``.tolist()`` all dispatch to
    ``aten::_local_scalar_dense``, and ``nonzero`` must read its input to size its output; on
    CUDA these are the device-to-host syncs. Overriding the kernels (not a dispatch mode, which
    ``torch.compile`` refuses to run under) also covers the compiled code.
    """
    lib = torch.library.Library("aten", "IMPL")

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("host sync (.item(), bool(), nonzero, ...) in the sampling loop")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        for op in ("_local_scalar_dense", "nonzero", "nonzero.out"):
            lib.impl(op, forbidden, "CPU")
    try:
        yield
    finally:
        lib._destroy()


def test_host_sync_check_catches_item() -> None:
    with host_syncs_forbidden(), pytest.raises(AssertionError, match="host sync"):
        torch.ones(()).item()
    assert torch.ones(()).item() == 1.0  # restored


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_sampling_loop_has_no_host_sync(
    name: str, compiled: bool, inductor_model: tuple[DiffusionModel, CompileCounterWithBackend]
) -> None:
    model, _ = inductor_model
    solver = model.make_sampler(name)
    timesteps = model.sampling_timesteps(6)
    plan = build_plan(solver, model.process.path_values(timesteps))
    x = torch.randn(BSZ, 2)
    denoise = model.denoiser()
    loop = _compiled_loop(model, solver, plan, x) if compiled else None
    with torch.no_grad():
        run_sampler(solver, x, plan, denoise, loop=loop)  # warm up (compile)
    gen = torch.Generator().manual_seed(0)
    loop = _compiled_loop(model, solver, plan, x) if compiled else None
    net_calls = len(model.nn_module.compute_dtypes)
    with torch.no_grad(), host_syncs_forbidden():
        out = run_sampler(solver, x, plan, denoise, generator=gen, loop=loop)
    assert torch.isfinite(out).all()
    assert len(model.nn_module.compute_dtypes) == net_calls + 6  # the loop did run


def _eager_denoiser(model: DiffusionModel) -> Any:
    return model.denoiser()


def _compiled_loop(model: DiffusionModel, solver: Any, plan: Any, x: Tensor) -> Any:
    """The compiled driver that ``sample(..., compile=True)`` would use for this plan."""
    return model.compiled_steps.loop(solver, plan, x, model.denoiser())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_cuda_sampling_has_no_sync(mode: str) -> None:
    model = make_model().cuda().compile_sampler(mode)
    gen = torch.Generator("cuda").manual_seed(0)
    for steps in (10, 10, 7):  # warm up (compile, CUDA graph record), then replay
        model.sample(64, steps, sampler="ddpm", generator=gen, compile=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = model.sample(64, 7, sampler="ddpm", generator=gen, compile=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_runs_honour_callbacks_and_keep_what_they_hand_out() -> None:
    """Under CUDA graphs a step's outputs live in a pool that the next replay overwrites: the
    callback gets copies, its replacement is used, and the result equals eager sampling."""
    model = make_model().cuda().compile_sampler("reduce-overhead")
    seen: list[Tensor] = []

    def pin(i: int, t_next: float, x_next: Tensor, x0_hat: Tensor | None) -> Tensor:
        seen.append(x_next)
        out = x_next.clone()
        out[:, 0] = 0.25
        return out

    z = torch.randn(64, 2, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    for _ in range(2):  # record, then replay
        compiled = model.sample(64, 8, sampler="ddim", init_noise=z, callback=pin, compile=True)
    eager = model.sample(64, 8, sampler="ddim", init_noise=z, callback=pin)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert torch.all(compiled[:, 0] == 0.25)
    assert len({t.data_ptr() for t in seen[-8:]}) == 8  # copies, not the reused pool


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_cuda_stateful_guidance_has_no_sync(mode: str) -> None:
    """APG's momentum is carried by the loop as device tensors: no host sync under graphs."""
    from tinydiff.nn import MLP

    torch.manual_seed(0)
    net = MLP(2, hidden_dim=32, num_layers=1, num_classes=3)
    model = DiffusionModel(net, input_shape=(2,), num_timesteps=100, target_type="pred_v")
    model = model.cuda().compile_sampler(mode)
    cond = {"class_labels": torch.arange(64, device="cuda") % 3}
    run = {"cond": cond, "guidance": "apg", "guidance_scale": 3.0, "compile": True}
    run["guidance_kwargs"] = {"momentum": -0.5}
    gen = torch.Generator("cuda").manual_seed(0)
    for steps in (10, 10):
        model.sample(64, steps, sampler="dpmpp_2m", generator=gen, **run)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = model.sample(64, 10, sampler="dpmpp_2m", generator=gen, **run)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()


# -- mixed precision -------------------------------------------------------------------------------
class RecordingDDIM(samplers.get("ddim")):  # type: ignore[misc,valid-type]
    """DDIM that records the dtypes of x and its state at each step (eager only)."""

    dtypes: ClassVar[list[torch.dtype]] = []

    def step(self, x, state, c, denoise, noise):  # type: ignore[no-untyped-def]
        pred = denoise(x, c["point"])
        type(self).dtypes += [pred.x0.dtype, pred.eps.dtype]
        x_next, state = super().step(x, state, c, denoise, noise)
        type(self).dtypes += [x_next.dtype, *(s.dtype for s in state)]
        return x_next, state


@pytest.mark.parametrize("name", SAMPLERS)
def test_autocast_keeps_solver_in_float32(name: str) -> None:
    counter = CompileCounterWithBackend("aot_eager")
    model = make_model(backend=counter)
    net = model.nn_module
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = sample(model, name, 5)
        assert torch.bfloat16 in net.compute_dtypes  # the network did run in bf16
        compiled = sample(model, name, 5, compile=True)
    assert eager.dtype == compiled.dtype == torch.float32
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)

    # the state a sampler carries stays float32 under autocast, step after step
    solver = model.make_sampler(name)
    x = torch.randn(BSZ, 2)
    state = solver.init_state(x)
    timesteps = model.sampling_timesteps(5)
    plan = build_plan(solver, model.process.path_values(timesteps))
    denoise = _eager_denoiser(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(5):
            c = {k: v[i].float() for k, v in plan.items()}
            noise = torch.randn_like(x) if solver.is_stochastic else None
            x, state = solver.step(x, state, c, denoise, noise)
            assert x.dtype == torch.float32
            assert all(s.dtype == torch.float32 for s in state), name


def test_autocast_predictions_are_float32() -> None:
    model = make_model()
    RecordingDDIM.dtypes = []
    solver = RecordingDDIM()
    timesteps = model.sampling_timesteps(3)
    plan = build_plan(solver, model.process.path_values(timesteps))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        run_sampler(solver, torch.randn(BSZ, 2), plan, _eager_denoiser(model))
    assert set(RecordingDDIM.dtypes) == {torch.float32}


# -- memory ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SAMPLERS)
def test_state_does_not_grow_with_steps(name: str) -> None:
    model = make_model()
    solver = model.make_sampler(name)
    x = torch.randn(BSZ, 2)
    timesteps = model.sampling_timesteps(12)
    plan = build_plan(solver, model.process.path_values(timesteps))
    state = solver.init_state(x)
    sizes = set()
    denoise = _eager_denoiser(model)
    with torch.no_grad():
        for i in range(12):
            c = {k: v[i].float() for k, v in plan.items()}
            noise = torch.randn_like(x) if solver.is_stochastic else None
            x, state = solver.step(x, state, c, denoise, noise)
            sizes.add((len(state), sum(s.numel() for s in state)))
    # the history is fixed by the solver's order: one size, a few x-sized buffers
    assert len(sizes) == 1, f"{name} state changed size over steps: {sizes}"
    ((_, numel),) = sizes
    assert numel <= 4 * x.numel()


# -- API -------------------------------------------------------------------------------------------
def test_compile_options_are_validated() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="reduce-overhead"):
        model.compile_sampler("fast")
    with pytest.raises(TypeError, match="compile_network"):
        model.compile_sampler(compile_network="yes")  # type: ignore[arg-type]
    assert CompileOptions("max-autotune").uses_cuda_graphs(torch.device("cuda"))
    assert not CompileOptions("reduce-overhead").uses_cuda_graphs(torch.device("cpu"))
    assert model.compile_sampler("reduce-overhead") is model


def test_deleting_the_model_releases_it() -> None:
    """Compiled steps do not keep their model (nor its network) alive, and sampling another
    model with the same options afterwards compiles and runs its own network."""
    model = make_model(backend="aot_eager")
    model.sample(2, 2, sampler="ddim", compile=True)
    assert len(model.compiled_steps) == 1
    dead_model, dead_net = weakref.ref(model), weakref.ref(model.nn_module)
    del model
    gc.collect()
    assert dead_model() is None and dead_net() is None
    other = make_model(backend="aot_eager")
    torch.testing.assert_close(
        sample(other, "ddim", 3, compile=True), sample(other, "ddim", 3), rtol=1e-5, atol=1e-5
    )
    assert len(other.compiled_steps) == 1


def test_copied_model_samples_with_its_own_weights() -> None:
    model = make_model(backend="aot_eager")
    model.sample(2, 2, sampler="ddim", compile=True)
    copy = deepcopy(model)
    assert len(copy.compiled_steps) == 0  # the copy starts without the original's steps
    assert copy.compiled_steps is not model.compiled_steps
    with torch.no_grad():
        for p in copy.nn_module.parameters():
            p.mul_(0.5)
    torch.testing.assert_close(
        sample(copy, "ddim", 3, compile=True), sample(copy, "ddim", 3), rtol=1e-5, atol=1e-5
    )
    assert not torch.allclose(sample(copy, "ddim", 3), sample(model, "ddim", 3))
