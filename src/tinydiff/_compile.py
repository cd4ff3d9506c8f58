r"""Compiled sampling: one ``torch.compile``-d step, built once and replayed for every step.

The eager loop (`tinydiff.samplers.base.run_sampler`) indexes the plan with a Python int
and calls `Sampler.step`. Compiling *that* would specialise on the int and recompile at
every step. The compiled path instead

1. stacks the plan's columns into one table of shape (S + 1, K) in x's dtype and device (the
   extra zero row keeps dim 0 >= 2, so it can be marked dynamic for every S >= 1);
2. compiles ``step(x, state, i, table, noise) -> (x_next, state_next, i + 1)`` with
   ``fullgraph=True``, where ``i`` is a 0-dim int64 tensor on x's device and the step's
   coefficients are ``table[i]``, read inside the graph. The same compiled code (one inductor
   C++/OpenMP kernel set on CPU, Triton on CUDA, one CUDA graph with ``mode="reduce-overhead"``)
   serves every step of a run, and runs with any number of steps: dim 0 of the table is marked
   dynamic;
3. reaches the network through an opaque custom operator unless ``compile_network=True``, so
   only the update math is traced, and any network (graph breaks included) can be used. The
   step calls the same `tinydiff.denoiser.Denoiser` code as eager sampling (target
   conversion, guidance and its rescale are traced); only the raw ``network(x, t, **cond)``
   call is opaque. Which network (live or EMA) and which ``cond`` a run uses is read from the
   cache's `NetworkSlot`, so one compiled step serves every run.

On CPU, a compiled step costs a fixed ~60 us of dispatch (guards, the AOT wrapper, the custom
operator), more than eager ATen spends on the update of a small sample; there ``compile=True``
runs the eager loop instead (`CPU_EAGER_BELOW_NUMEL`, `CompileOptions.eager_is_faster`),
so that compiled sampling is never slower than eager.

Nothing on the host depends on device values: no ``.item()``, no ``nonzero``, no CPU tensor
in the loop, so CUDA graphs can capture a step and ``torch.cuda.set_sync_debug_mode("error")``
passes. Compiled steps are cached per (sampler class, sampler options, plan columns, x's shape,
dtype and device, stochasticity): each entry gets its own copy of the step's code object, so
that Dynamo's per-code recompile limit never merges unrelated entries.
"""

from __future__ import annotations

import itertools
import math
import types
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor
from typing_extensions import Self

from tinydiff.denoiser import Denoiser
from tinydiff.samplers.base import Sampler, State

__all__ = [
    "CPU_EAGER_BELOW_NUMEL",
    "MODES",
    "CompileMixin",
    "CompileOptions",
    "CompiledStep",
    "NetworkSlot",
    "OpaqueNetwork",
    "PlanLayout",
    "StepCache",
]

#: accepted values of ``mode``, as in `torch.compile`
MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune")

#: on CPU, with the inductor backend and an opaque network, samples with fewer elements than
#: this run the eager loop under ``compile=True``: a compiled step costs a fixed ~60 us of
#: Dynamo/AOT/custom-operator dispatch, which eager ATen beats while the update math is tiny.
#: Measured with ``benchmarks/sampling_speed.py --case step-overhead`` (dpmpp_2m, 1 thread,
#: benchmarks/results/sampling_speed_step_overhead.md): eager 41 / 57 / 94 us against compiled
#: 65 / 85 / 82 us at 4096 / 16384 / 32768 elements, eager 1745 us against compiled 402 us at
#: 262144 (see docs/performance.md)
CPU_EAGER_BELOW_NUMEL = 32768


@dataclass(frozen=True)
class CompileOptions:
    """How sampling is compiled.

    Attributes:
        mode: ``"default"``, ``"reduce-overhead"`` (CUDA graphs on CUDA) or ``"max-autotune"``
            (autotuned kernels, and CUDA graphs on CUDA); passed to the inductor backend.
        compile_network: also trace the network into the step graph (it must then compile
            without graph breaks); otherwise the network runs eagerly as one opaque operator.
        backend: a `torch.compile` backend, ``"inductor"`` by default (``mode`` only
            applies to inductor). ``"aot_eager"`` or a counting backend are useful in tests.
    """

    mode: str = "default"
    compile_network: bool = False
    backend: str | Callable[..., Any] = "inductor"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(
                f"compile mode must be one of {', '.join(map(repr, MODES))}, got {self.mode!r}"
            )
        if not isinstance(self.compile_network, bool):
            raise TypeError(
                f"compile_network must be a bool, got {type(self.compile_network).__name__}"
            )
        if not (isinstance(self.backend, str) or callable(self.backend)):
            raise TypeError(f"backend must be a backend name or callable, got {self.backend!r}")

    def compile(self, fn: Callable[..., Any], **kwargs: Any) -> Any:
        """``torch.compile(fn, **kwargs)`` with this backend (and ``mode``, for inductor)."""
        if self.backend == "inductor":
            kwargs["mode"] = self.mode
        return torch.compile(fn, backend=self.backend, **kwargs)

    def eager_is_faster(self, x: Tensor) -> bool:
        """Whether ``compile=True`` runs the eager loop for ``x``: a CPU sample smaller than
        `CPU_EAGER_BELOW_NUMEL`, with the inductor backend named by its string and the
        network not compiled (a custom backend, e.g. a test's counter, always compiles)."""
        return (
            x.device.type == "cpu"
            and isinstance(self.backend, str)
            and self.backend == "inductor"
            and not self.compile_network
            and x.numel() < CPU_EAGER_BELOW_NUMEL
        )

    def uses_cuda_graphs(self, device: torch.device) -> bool:
        """Whether inductor captures the step as a CUDA graph on ``device``."""
        return device.type == "cuda" and self.backend == "inductor" and self.mode != "default"


# -- the network as an opaque operator -------------------------------------------------------------
_NETWORKS: dict[int, Callable[[], Callable[..., Tensor] | None]] = {}
_NEXT_KEY = itertools.count()


@torch.library.custom_op("tinydiff::opaque_network", mutates_args=())
def _opaque_network_op(
    x: Tensor,
    t: Tensor,
    key: int,
    channel_multiplier: int,
    autocast: bool,
    autocast_dtype: torch.dtype,
    r: Tensor | None = None,
) -> Tensor:
    network = _NETWORKS[key]()
    if network is None:
        raise RuntimeError("the model of this compiled sampling step has been deleted")
    # compiled graphs run with autocast off (it was applied while tracing): restore the
    # caller's autocast state for the network, which is not traced. Entering an autocast
    # context costs several microseconds a step, so it is skipped when the state already holds
    # (the common case: no autocast anywhere)
    device = x.device.type
    if torch.is_autocast_enabled(device) == autocast and (
        not autocast or torch.get_autocast_dtype(device) == autocast_dtype
    ):
        out = network(x, t) if r is None else network(x, t, r=r)
    else:
        with torch.autocast(device, dtype=autocast_dtype, enabled=autocast):
            out = network(x, t) if r is None else network(x, t, r=r)
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    # a custom operator's output may not alias its inputs (an identity network would)
    if out.untyped_storage().data_ptr() in (
        x.untyped_storage().data_ptr(),
        t.untyped_storage().data_ptr(),
        *(() if r is None else (r.untyped_storage().data_ptr(),)),
    ):
        out = out.clone()
    return out


@_opaque_network_op.register_fake
def _(
    x: Tensor,
    t: Tensor,
    key: int,
    channel_multiplier: int,
    autocast: bool,
    autocast_dtype: torch.dtype,
    r: Tensor | None = None,
) -> Tensor:
    return x.new_empty((x.shape[0], x.shape[1] * channel_multiplier, *x.shape[2:]))


class OpaqueNetwork:
    """Wrap ``network(x, t)`` as one opaque operator that compilers do not trace into.

    Inside a compiled graph the network then runs eagerly (its own kernels, graph breaks
    allowed) while the surrounding update math is fused. The network runs under the caller's
    autocast state, and its output is cast to x's dtype, so that under autocast the solver
    keeps working in x's precision.

    Args:
        network: ``(x (bsz, C, ...), t (bsz,)) -> (bsz, C * channel_multiplier, ...)``. A bound
            method is held weakly (the operator must not keep its model alive).
        channel_multiplier: output channels per input channel (2 for ``learned_range``).
    """

    def __init__(
        self, network: Callable[[Tensor, Tensor], Tensor], channel_multiplier: int = 1
    ) -> None:
        self.key = next(_NEXT_KEY)
        self.channel_multiplier = int(channel_multiplier)
        if isinstance(network, types.MethodType):
            _NETWORKS[self.key] = weakref.WeakMethod(network)
            weakref.finalize(network.__self__, _NETWORKS.pop, self.key, None)
        else:
            _NETWORKS[self.key] = lambda: network
            weakref.finalize(self, _NETWORKS.pop, self.key, None)

    def __call__(self, x: Tensor, t: Tensor, r: Tensor | None = None) -> Tensor:
        """Run the network on (x, t) (and the end time `r` of a two-time network, passed
        as `r=`) through the opaque operator, under the current autocast."""
        device = x.device.type
        autocast = torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device)
        if r is None:
            return torch.ops.tinydiff.opaque_network(
                x, t, self.key, self.channel_multiplier, autocast, dtype
            )
        return torch.ops.tinydiff.opaque_network(
            x, t, self.key, self.channel_multiplier, autocast, dtype, r
        )


# -- the plan as one table ---------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanLayout:
    """Where each plan column lives in the stacked table's rows.

    Attributes:
        columns: (name, start, stop, per-step shape) for each column, sorted by name.
    """

    columns: tuple[tuple[str, int, int, tuple[int, ...]], ...]

    @classmethod
    def of(cls, plan: Mapping[str, Tensor]) -> PlanLayout:
        """The layout of ``plan`` (columns of shape (S, *per_step_shape))."""
        cols, start = [], 0
        for name in sorted(plan):
            shape = tuple(plan[name].shape[1:])
            size = math.prod(shape)
            cols.append((name, start, start + size, shape))
            start += size
        return cls(tuple(cols))

    def stack(self, plan: Mapping[str, Tensor], like: Tensor) -> Tensor:
        """The table (S + 1, K) in ``like``'s dtype and device; the last row is zeros."""
        num_steps = plan["t"].shape[0]
        flat = [plan[name].reshape(num_steps, -1) for name, *_ in self.columns]
        table = torch.cat([*flat], dim=1)
        table = torch.cat([table, table.new_zeros(1, table.shape[1])])
        return table.to(device=like.device, dtype=like.dtype)

    def unpack(self, row: Tensor) -> dict[str, Tensor]:
        """One table row (K,) back into the plan row ``c`` that `Sampler.step` expects."""
        return {
            name: row[start] if shape == () else row[start:stop].view(shape)
            for name, start, stop, shape in self.columns
        }


def _step(
    sampler: Sampler,
    denoise: Denoiser,
    layout: PlanLayout,
    x: Tensor,
    state: State,
    guidance_state: State,
    i: Tensor,
    table: Tensor,
    noise: Tensor | None,
    with_x0: bool,
) -> tuple[Tensor, State, State, Tensor | None, Tensor]:
    """The function that is compiled: step i of any plan with this layout."""
    c = layout.unpack(table.index_select(0, i.reshape(1))[0])
    view = denoise.bind(guidance_state, i)
    x_next, state_next = sampler.step(x, state, c, view, noise)
    x0 = view.first_x0 if with_x0 else None
    return x_next, tuple(state_next), tuple(view.state), x0, i + 1


def _fresh_copy(fn: types.FunctionType, name: str) -> types.FunctionType:
    """``fn`` with its own code object: Dynamo caches (and limits recompiles) per code object."""
    code = fn.__code__.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


@dataclass
class CompiledStep:
    """A sampler step compiled once for one (sampler, options, layout, x's shape/dtype/device).

    Args:
        sampler: the sampler (its step must depend only on its options, which are in the key).
        denoise: the denoiser the step calls.
        layout: the plan layout.
        options: the compile options.
    """

    sampler: Sampler
    denoise: Denoiser
    layout: PlanLayout
    options: CompileOptions
    with_x0: bool = False
    _fn: Callable[..., tuple[Tensor, State, State, Tensor | None, Tensor]] = field(
        init=False, repr=False
    )

    def __post_init__(self) -> None:
        name = f"tinydiff_step_{type(self.sampler).__name__}_{next(_NEXT_KEY)}"
        self._fn = self.options.compile(
            _fresh_copy(cast(types.FunctionType, _step), name), fullgraph=True, dynamic=False
        )

    def __call__(
        self,
        x: Tensor,
        state: State,
        guidance_state: State,
        i: Tensor,
        table: Tensor,
        noise: Tensor | None,
    ) -> tuple[Tensor, State, State, Tensor | None, Tensor]:
        """Step ``i`` (0-dim int64 tensor on x's device) with coefficients ``table[i]``.

        Returns:
            (x_next, state_next, guidance_state_next, first x0 estimate or None, i + 1).
        """
        return self._fn(
            self.sampler,
            self.denoise,
            self.layout,
            x,
            state,
            guidance_state,
            i,
            table,
            noise,
            self.with_x0,
        )

    def stepper(
        self,
        plan: Mapping[str, Tensor],
        x: Tensor,
        fills: Sequence[tuple[NetworkSlot, Any, dict[str, Any] | None]] = (),
    ) -> CompiledLoop:
        """The per-run driver that `tinydiff.samplers.base.run_loop` calls once per
        step."""
        table = self.layout.stack(plan, x)
        torch._dynamo.mark_dynamic(table, 0)
        return CompiledLoop(self, table, x, fills)


class CompiledLoop:
    """Calls a `CompiledStep` with a device-side step counter (no host sync).

    Attributes:
        transient_outputs: outputs live in a CUDA-graph pool that the next replay overwrites;
            the caller must clone anything it keeps (trajectory, result).
    """

    def __init__(
        self,
        step: CompiledStep,
        table: Tensor,
        x: Tensor,
        fills: Sequence[tuple[NetworkSlot, Any, dict[str, Any] | None]] = (),
    ) -> None:
        self.step = step
        self.table = table
        self.index = torch.zeros((), dtype=torch.int64, device=x.device)
        self.transient_outputs = step.options.uses_cuda_graphs(x.device)
        self.guidance_state: State = step.denoise.init_state(x)
        self.first_x0: Tensor | None = None
        # this run's networks and cond, put into the shared slots before each of its steps: a
        # run started in between (from a callback) fills the slots with its own
        self.fills = list(fills)

    def close(self) -> None:
        """End the run: the slots let go of its networks and cond (they may be freed)."""
        for slot, _, _ in self.fills:
            slot.network = slot.cond = None
        self.fills = []

    def __call__(
        self, i: int, x: Tensor, state: State, noise: Tensor | None
    ) -> tuple[Tensor, State]:
        """Step ``i`` (the host-side int is only for the caller; the device counter is used)."""
        if i == 0 and torch.is_inference_mode_enabled() and not x.is_inference():
            # under inference_mode every later step gets an inference tensor (the step's own
            # output); Dynamo guards on that difference, so a normal x (e.g. init_noise made
            # outside inference_mode) would compile the step a second time for step 0 alone
            x = x.clone()
        for slot, network, cond in self.fills:
            slot.network, slot.cond = network, cond
        if self.transient_outputs:
            torch.compiler.cudagraph_mark_step_begin()
        x, state, self.guidance_state, self.first_x0, self.index = self.step(
            x, state, self.guidance_state, self.index, self.table, noise
        )
        return x, state


def _options_key(sampler: Any) -> Hashable:
    """A hashable key of an options object's attributes (a sampler's or a guidance's)."""
    items = []
    for name, value in sorted(vars(sampler).items()):
        try:
            hash(value)
        except TypeError:
            value = repr(value)
        items.append((name, value))
    return tuple(items)


def _no_cache() -> None:
    return None


class NetworkSlot:
    """The network and ``cond`` of the current compiled run, behind the opaque operator.

    ``slot(x, t)`` calls ``network(x, t, **cond)`` (``slot(x, t, r)``:
    ``network(x, t, r=r, **cond)``); `StepCache.loop` fills the slot before each run.
    """

    def __init__(self) -> None:
        self.network: Callable[..., Tensor] | None = None
        self.cond: dict[str, Any] | None = None

    def __call__(self, x: Tensor, t: Tensor, r: Tensor | None = None) -> Tensor:
        if self.network is None:
            raise RuntimeError("no network was set for this compiled sampling run")
        if r is not None:
            return self.network(x, t, r=r, **(self.cond or {}))
        return self.network(x, t) if self.cond is None else self.network(x, t, **self.cond)


class StepCache:
    """Compiled steps of one model, built on first use and reused across runs.

    Args:
        options: the compile options of every entry.
        live_network: the model's own network: with ``compile_network=True`` only it may be
            traced (a run with another one, e.g. the EMA copy, is refused). A cache without
            one (functional sampling) traces each run's network, keyed by its identity.
    """

    def __init__(self, options: CompileOptions, live_network: Any = None) -> None:
        self.options = options
        self.live_network = live_network
        self.slot = NetworkSlot()
        self.guide_slot = NetworkSlot()  # a guidance strategy's guide network (autoguidance)
        self._entries: dict[Hashable, CompiledStep] = {}

    def __len__(self) -> int:
        return len(self._entries)

    # compiled code is bound to this model object: copies (deepcopy for EMA, pickling) start
    # without a cache and compile their own, rather than run the original model's network
    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        return None

    def __reduce__(self) -> tuple[Callable[[], None], tuple[()]]:
        return _no_cache, ()

    def _traced_denoiser(self, denoiser: Denoiser) -> Denoiser:
        """The denoiser the compiled step calls: ``denoiser``'s target, variance and guidance,
        with the network behind the opaque operator (or the live network, traced)."""
        if self.options.compile_network:
            live_network = denoiser.network if self.live_network is None else self.live_network
            if denoiser.cond is not None or denoiser.network is not live_network:
                raise ValueError(
                    "compile_network=True traces the live network without conditioning: "
                    "cond, guidance and use_ema need compile_network=False (the default)"
                )
            if denoiser.guide_network is not None:
                raise ValueError(
                    "compile_network=True traces the live network only: a guidance strategy "
                    "with a guide network (autoguidance) needs compile_network=False (the default)"
                )
            network: Any = live_network
        else:
            network = OpaqueNetwork(self.slot, denoiser.channel_multiplier)
        guide = (
            None
            if denoiser.guide_network is None
            else OpaqueNetwork(self.guide_slot, denoiser.channel_multiplier)
        )
        return Denoiser(
            network,
            denoiser.target,
            denoiser.variance,
            guidance=denoiser.guidance,
            guide_network=guide,
            x0_limit=denoiser.x0_limit,
            end_time=denoiser.end_time,
        )

    def get(
        self,
        sampler: Sampler,
        plan: Mapping[str, Tensor],
        x: Tensor,
        denoiser: Denoiser,
        with_x0: bool = False,
    ) -> CompiledStep:
        """The compiled step for this sampler, plan layout, x and guidance (built if missing);
        ``with_x0``: the step also returns its first x0 estimate (for a callback)."""
        layout = PlanLayout.of(plan)
        key = (
            type(sampler),
            _options_key(sampler),
            sampler.is_stochastic,
            layout,
            tuple(x.shape),
            x.dtype,
            x.device,
            None if denoiser.guidance is None else type(denoiser.guidance),
            None if denoiser.guidance is None else _options_key(denoiser.guidance),
            type(denoiser.target),
            _options_key(denoiser.target),
            type(denoiser.variance),
            _options_key(denoiser.variance),
            denoiser.x0_limit,
            denoiser.end_time,
            with_x0,
            id(denoiser.network) if self.options.compile_network else None,
        )
        entry = self._entries.get(key)
        if entry is None:
            traced = self._traced_denoiser(denoiser)
            entry = CompiledStep(sampler, traced, layout, self.options, with_x0)
            self._entries[key] = entry
        return entry

    def loop(
        self,
        sampler: Sampler,
        plan: Mapping[str, Tensor],
        x: Tensor,
        denoiser: Denoiser,
        *,
        with_x0: bool = False,
    ) -> CompiledLoop | None:
        """The compiled driver of one run, which puts ``denoiser``'s network and the keyword
        arguments it is called with into the slot before each step (call its ``close`` after
        the run); None where the eager loop is faster (`CompileOptions.eager_is_faster`),
        which the caller then runs."""
        if self.options.eager_is_faster(x):
            return None
        entry = self.get(sampler, plan, x, denoiser, with_x0)
        fills = [(self.slot, denoiser.network, denoiser.network_cond)]
        if denoiser.guide_network is not None:
            fills.append((self.guide_slot, denoiser.guide_network, denoiser.network_cond))
        return entry.stepper(plan, x, fills)


class CompileMixin:
    """Compiled sampling's configuration on a model: `compile_sampler` and the model's cache
    of compiled steps (`compiled_steps`), which ``sample(..., compile=True)`` uses."""

    _compile_options: CompileOptions = CompileOptions()
    _step_cache: StepCache | None = None

    def compile_sampler(
        self,
        mode: str = "default",
        *,
        compile_network: bool = False,
        backend: str | Callable[..., Any] = "inductor",
    ) -> Self:
        """Configure compiled sampling (``sample(..., compile=True)``) and drop compiled steps;
        returns the model. A step compiles once per (sampler options, batch shape, dtype,
        device, guidance) and serves every step and step count (`tinydiff._compile`).

        Args:
            mode: ``"default"``, ``"reduce-overhead"`` (CUDA graphs) or ``"max-autotune"``.
            compile_network: also trace the network (no graph breaks allowed); by default it
                runs eagerly as one opaque operator inside the compiled step.
            backend: a `torch.compile` backend (``mode`` applies to inductor only).
        """
        self._compile_options = CompileOptions(mode, compile_network, backend)
        self._step_cache = None
        return self

    @property
    def compiled_steps(self) -> StepCache:
        """The cache of compiled sampling steps (``len()`` counts the compiled entries)."""
        if self._step_cache is None:
            self._step_cache = StepCache(self._compile_options, getattr(self, "nn_module", None))
        return self._step_cache
