"""Sampling speed: tinydiff eager and compiled against the network floor and diffusers.

For each workload (network, batch, number of steps S, sampler) this measures, in one process:

1. ``floor``: the network alone, called NFE times on a fixed batch (what any sampler pays);
2. ``tinydiff eager``: ``model.sample(...)``;
3. ``tinydiff compiled``: ``model.sample(..., compile=True)`` (compiled step, eager network);
4. ``diffusers``: ``DDIMScheduler`` / ``DPMSolverMultistepScheduler`` driving the same network in
   the usual loop, on the same schedule (``trained_betas`` from tinydiff's ``alphas_cumprod``).

Every method is warmed up first (compilation happens there, with S = 2 steps: the compiled step
is reused for any S), then timed ``--repeats`` times; the median is reported, with
``torch.cuda.synchronize`` around each run on CUDA. Everything runs under
``torch.inference_mode()``. Results are printed and written as a markdown table::

    python benchmarks/sampling_speed.py --device cpu --quick
    python benchmarks/sampling_speed.py --device cuda --out benchmarks/RESULTS.md

``--case NAME`` (repeatable) runs one named configuration instead of the grid, in
``rounds`` interleaved rounds, and prints each method's per-round ratio to that round's
floor (median [min, max]) in wall time and in this process's CPU time (``process_time``,
which leaves out time other processes hold the cores on a shared machine).
``--case step-overhead`` times one eager and one compiled dpmpp_2m step with a free network::

    python benchmarks/sampling_speed.py --device cpu --case mlp64-dpmpp2m-cpu \
        --out benchmarks/results/sampling_speed_cpu.md
    python benchmarks/sampling_speed.py --device cpu --case step-overhead
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tinydiff import DiffusionModel, samplers
from tinydiff._compile import CompileOptions, StepCache
from tinydiff.samplers.base import build_plan

NOTES: list[str] = []

# -- networks ---------------------------------------------------------------------------------------


def _time_features(t: Tensor, dim: int) -> Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class LocalMLP(nn.Module):
    """Fallback with tinydiff.nn.MLP's signature: residual SiLU MLP plus a time embedding."""

    def __init__(self, input_dim: int, hidden_dim: int = 128, num_layers: int = 3) -> None:
        super().__init__()
        self.time = nn.Sequential(nn.Linear(32, hidden_dim), nn.SiLU())
        self.inp = nn.Linear(input_dim, hidden_dim)
        self.blocks = nn.ModuleList(nn.Linear(hidden_dim, hidden_dim) for _ in range(num_layers))
        self.out = nn.Linear(hidden_dim, input_dim)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        h = self.inp(x) + self.time(_time_features(t, 32))
        for block in self.blocks:
            h = h + block(nn.functional.silu(h))
        return self.out(nn.functional.silu(h))


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(8, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.norm2 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None]
        h = self.conv2(nn.functional.silu(self.norm2(h)))
        return self.skip(x) + h


class LocalUNet(nn.Module):
    """Fallback with tinydiff.nn.UNet's signature: two resolutions, one res block each."""

    def __init__(self, in_channels: int, base_channels: int = 32) -> None:
        super().__init__()
        c, e = base_channels, 4 * base_channels
        self.time = nn.Sequential(nn.Linear(c, e), nn.SiLU(), nn.Linear(e, e))
        self.inp = nn.Conv2d(in_channels, c, 3, padding=1)
        self.down = _ResBlock(c, c, e)
        self.pool = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.mid = _ResBlock(2 * c, 2 * c, e)
        self.upsample = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.up = _ResBlock(2 * c, c, e)
        self.out = nn.Sequential(
            nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, in_channels, 3, padding=1)
        )

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        emb = self.time(_time_features(t, self.inp.out_channels))
        h0 = self.down(self.inp(x), emb)
        h = self.mid(self.pool(h0), emb)
        h = self.up(torch.cat([self.upsample(h), h0], dim=1), emb)
        return self.out(h)


def make_mlp(dim: int) -> nn.Module:
    try:
        from tinydiff.nn import MLP  # type: ignore[attr-defined]

        return MLP(dim, hidden_dim=128, num_layers=3)
    except ImportError:
        note = "tinydiff.nn.MLP is not importable on this branch: a local MLP with its signature was used"
        if note not in NOTES:
            NOTES.append(note)
        return LocalMLP(dim, hidden_dim=128, num_layers=3)


def make_unet(channels: int) -> nn.Module:
    try:
        from tinydiff.nn import UNet  # type: ignore[attr-defined]

        return UNet(channels, base_channels=32)
    except ImportError:
        note = "tinydiff.nn.UNet is not importable on this branch: a local small UNet with its signature was used"
        if note not in NOTES:
            NOTES.append(note)
        return LocalUNet(channels, base_channels=32)


@dataclass
class Workload:
    name: str
    make_net: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    bsz: int


def workloads(device: str) -> list[Workload]:
    big = 65536
    img = (64, 16) if device == "cpu" else (512, 128)
    return [
        Workload("MLP 2-d", lambda: make_mlp(2), (2,), 4096),
        Workload("MLP 2-d", lambda: make_mlp(2), (2,), big),
        Workload("MLP 64-d", lambda: make_mlp(64), (64,), 4096),
        Workload("MLP 64-d", lambda: make_mlp(64), (64,), big),
        Workload("UNet 3x8x8", lambda: make_unet(3), (3, 8, 8), img[0]),
        Workload("UNet 3x32x32", lambda: make_unet(3), (3, 32, 32), img[1]),
    ]


# -- timing ---------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak extra device memory of one run in MiB (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def diffusers_scheduler(sampler: str, model: DiffusionModel) -> Any:
    import diffusers

    ab = model.alphas_cumprod
    betas = (1 - ab[1:] / ab[:-1]).clamp(max=0.999).tolist()
    common = {
        "num_train_timesteps": model.num_timesteps,
        "trained_betas": betas,
        "timestep_spacing": "trailing",
        "prediction_type": "v_prediction",
    }
    if sampler == "ddim":
        return diffusers.DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True)
    if sampler == "dpmpp_2m":
        return diffusers.DPMSolverMultistepScheduler(
            **common, solver_order=2, algorithm_type="dpmsolver++", final_sigmas_type="zero"
        )
    raise ValueError(sampler)


def bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    steps_list = (10,) if args.quick else (10, 50)
    repeats = args.repeats or (2 if args.quick else 3)
    rows = []
    available = set(samplers.names())
    wanted = [s for s in ("ddim", "dpmpp_2m") if s in available]
    for s in ("ddim", "dpmpp_2m"):
        if s not in available:
            NOTES.append(f"sampler {s!r} is not registered on this branch: its rows are skipped")
    for wl in workloads(args.device):
        torch.manual_seed(0)
        net = wl.make_net().to(device).eval()
        # v-prediction keeps the iterates of an untrained network at the data's scale; with
        # eps-prediction they blow up, and the network slows down on denormals, which would
        # make the floor (measured on N(0, I) inputs) meaningless
        config = {"input_shape": wl.input_shape, "num_timesteps": 1000, "target_type": "pred_v"}
        model = DiffusionModel(net, config)
        if args.compile_network:
            model.compile_sampler(compile_network=True)
        x = torch.randn(wl.bsz, *wl.input_shape, device=device)
        for sampler in wanted:
            rows += bench_sampler(wl, net, model, x, sampler, device, steps_list, repeats)
    return rows


def bench_sampler(
    wl: Workload,
    net: nn.Module,
    model: DiffusionModel,
    x: Tensor,
    sampler: str,
    device: torch.device,
    steps_list: tuple[int, ...],
    repeats: int,
) -> list[dict[str, Any]]:
    """Time the four methods for one (workload, sampler), each S in ``steps_list``."""
    nfe_of = model.make_sampler(sampler).nfe
    sched = diffusers_scheduler(sampler, model)
    ts = [torch.full((wl.bsz,), 999.0 - 10 * k, device=device) for k in range(64)]

    def run_floor(steps: int) -> None:
        for t in ts[: nfe_of(steps)]:
            net(x, t)

    def run_tinydiff(steps: int, compile: bool) -> Tensor:
        return model.sample(wl.bsz, steps, sampler=sampler, init_noise=x, compile=compile)

    def run_diffusers(steps: int) -> Tensor:
        sched.set_timesteps(steps, device=device)
        xt = x
        for t in sched.timesteps:
            out = net(xt, t.float().expand(wl.bsz))
            xt = sched.step(out, t, xt).prev_sample
        return xt

    methods: dict[str, Callable[[int], Any]] = {
        "floor": run_floor,
        "eager": lambda s: run_tinydiff(s, False),
        "compiled": lambda s: run_tinydiff(s, True),
        "diffusers": run_diffusers,
    }
    rows = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        methods["compiled"](2)  # compiles; the same compiled step serves every S below
        compile_s = time.perf_counter() - t0
        for fn in methods.values():
            fn(2)
        for steps in steps_list:
            row: dict[str, Any] = {
                "workload": wl.name,
                "bsz": wl.bsz,
                "sampler": sampler,
                "steps": steps,
                "nfe": nfe_of(steps),
                "compile_s": compile_s,
            }
            # interleaved repeats: slow drifts (other load) hit every method alike
            times: dict[str, list[float]] = {k: [] for k in methods}
            for _ in range(repeats):
                for key, fn in methods.items():
                    times[key].append(timed(lambda fn=fn, s=steps: fn(s), device, 1))
            row.update({k: statistics.median(v) for k, v in times.items()})
            row["mem"] = {
                k: peak_memory(lambda fn=fn, s=steps: fn(s), device) for k, fn in methods.items()
            }
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


# -- named cases: one configuration, many interleaved rounds, medians and ranges ----------------


@dataclass
class Case:
    """One workload timed in ``rounds`` interleaved rounds (floor, eager, compiled, diffusers)."""

    name: str
    description: str
    make_net: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    bsz: int
    sampler: str
    steps: int
    threads: int
    rounds: int


def _mlp(dim: int, hidden: int) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        from tinydiff.nn import MLP

        return MLP(dim, hidden_dim=hidden, num_layers=3)

    return make


CASES: dict[str, Case] = {
    # the configuration of the "process core" issue: compiled sampling must not be slower
    # than eager there
    "mlp64-dpmpp2m-cpu": Case(
        "mlp64-dpmpp2m-cpu",
        "dpmpp_2m, tinydiff.nn.MLP 64-d (hidden 256, 3 blocks), batch 4096, 20 steps",
        _mlp(64, 256),
        (64,),
        4096,
        "dpmpp_2m",
        20,
        threads=1,
        rounds=9,
    ),
    # the same solver where the step's update math is not negligible next to the network
    "mlp64-small-dpmpp2m-cpu": Case(
        "mlp64-small-dpmpp2m-cpu",
        "dpmpp_2m, tinydiff.nn.MLP 64-d (hidden 32, 3 blocks), batch 4096, 20 steps",
        _mlp(64, 32),
        (64,),
        4096,
        "dpmpp_2m",
        20,
        threads=1,
        rounds=9,
    ),
}

METHODS = ("floor", "eager", "compiled", "diffusers")


def run_case(case: Case, device: torch.device, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Times of every method in each round: {"wall"|"cpu": {method: [seconds per round]}}.

    ``cpu`` is this process's CPU time (``time.process_time``): on a shared machine it leaves
    out the time other processes hold the cores, which wall time cannot (with one thread it is
    the sampling thread's time). Only wall time is meaningful on CUDA.
    """
    torch.manual_seed(0)
    net = case.make_net().to(device).eval()
    config = {"input_shape": case.input_shape, "num_timesteps": 1000, "target_type": "pred_v"}
    model = DiffusionModel(net, config)
    x = torch.randn(case.bsz, *case.input_shape, device=device)
    nfe = model.make_sampler(case.sampler).nfe(case.steps)
    ts = [torch.full((case.bsz,), 999.0 - 10 * k, device=device) for k in range(nfe)]
    sched = diffusers_scheduler(case.sampler, model)

    def floor() -> None:
        for t in ts:
            net(x, t)

    def tinydiff(compile: bool) -> Tensor:
        return model.sample(
            case.bsz, case.steps, sampler=case.sampler, init_noise=x, compile=compile
        )

    def diffusers_loop() -> Tensor:
        sched.set_timesteps(case.steps, device=device)
        xt = x
        for t in sched.timesteps:
            xt = sched.step(net(xt, t.float().expand(case.bsz)), t, xt).prev_sample
        return xt

    methods: dict[str, Callable[[], Any]] = {
        "floor": floor,
        "eager": lambda: tinydiff(False),
        "compiled": lambda: tinydiff(True),
        "diffusers": diffusers_loop,
    }
    times: dict[str, dict[str, list[float]]] = {"wall": {}, "cpu": {}}
    for clock in times.values():
        clock.update({k: [] for k in methods})
    with torch.inference_mode():
        for fn in methods.values():  # warm-up: compiles, fills allocator caches
            fn()
            fn()
        for _ in range(rounds):
            for key, fn in methods.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                cpu0, wall0 = time.process_time(), time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times["wall"][key].append(time.perf_counter() - wall0)
                times["cpu"][key].append(time.process_time() - cpu0)
    return times


def case_table(case: Case, times: dict[str, dict[str, list[float]]]) -> str:
    """Each method's per-round ratio to that round's floor: median [min, max]."""
    lines = [
        "| clock | floor (ms, median) | eager / floor | compiled / floor | diffusers / floor "
        "| compiled / eager |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def cell(ratios: list[float]) -> str:
        return f"{statistics.median(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}]"

    for clock, per in times.items():
        floor = per["floor"]
        ratio = {k: [a / b for a, b in zip(per[k], floor, strict=True)] for k in METHODS}
        vs_eager = [a / b for a, b in zip(per["compiled"], per["eager"], strict=True)]
        lines.append(
            f"| {clock} | {1e3 * statistics.median(floor):.1f} | {cell(ratio['eager'])} "
            f"| {cell(ratio['compiled'])} | {cell(ratio['diffusers'])} | {cell(vs_eager)} |"
        )
    return "\n".join(lines)


def format_row(r: dict[str, Any]) -> str:
    f = r["floor"]
    cells = [
        r["workload"],
        str(r["bsz"]),
        r["sampler"],
        str(r["steps"]),
        f"{1e3 * f:.1f}",
        f"{r['eager'] / f:.3f}",
        f"{r['compiled'] / f:.3f}",
        f"{r['diffusers'] / f:.3f}",
        f"{r['compiled'] / r['diffusers']:.3f}",
        f"{r['compile_s']:.1f}",
    ]
    if r["mem"]["floor"] is not None:
        cells.append(" / ".join(f"{r['mem'][k]:.0f}" for k in ("eager", "compiled", "diffusers")))
    return "| " + " | ".join(cells) + " |"


def table(rows: list[dict[str, Any]], device: str) -> str:
    head = [
        "workload",
        "batch",
        "sampler",
        "steps",
        "floor (ms)",
        "eager / floor",
        "compiled / floor",
        "diffusers / floor",
        "compiled / diffusers",
        "compile (s)",
    ]
    if device == "cuda":
        head.append("peak MiB eager / compiled / diffusers")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + [format_row(r) for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="10 steps only, 2 repeats")
    parser.add_argument("--repeats", type=int, default=0, help="timed runs per method")
    parser.add_argument(
        "--compile-network",
        action="store_true",
        help="also compile the network (compile_network=True)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    parser.add_argument(
        "--case",
        choices=[*sorted(CASES), "step-overhead"],
        action="append",
        default=None,
        help="run a named case (interleaved rounds, medians and ranges) instead of the grid",
    )
    parser.add_argument("--rounds", type=int, default=0, help="rounds of a --case run")
    args = parser.parse_args()
    if args.case:
        run_cases(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = bench(args)
    md = table(rows, args.device)
    env = (
        f"torch {torch.__version__}, device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else "")
        + f", {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    print("\n" + md)
    for note in NOTES:
        print(f"note: {note}")
    if args.out is not None:
        notes = "".join(f"- {n}\n" for n in NOTES)
        args.out.write_text(f"{env}\n\n{md}\n\n{notes}")


class _FreeNet(nn.Module):
    """A network that costs (almost) nothing: a fresh zero tensor like x."""

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return torch.zeros_like(x)


def _per_call_us(fn: Callable[[], Any], n: int = 300) -> float:
    fn()
    best = math.inf
    for _ in range(7):
        start = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - start) / n)
    return 1e6 * best


def _step_costs(bsz: int, device: torch.device) -> list[float]:
    """CPU microseconds of (the free network, one eager step, one compiled step)."""
    net = _FreeNet()
    config = {"input_shape": (64,), "num_timesteps": 1000, "target_type": "pred_v"}
    model = DiffusionModel(net, config)
    with torch.inference_mode():
        x = torch.randn(bsz, 64, device=device)
        t = torch.zeros(bsz, device=device)
        solver = model.make_sampler("dpmpp_2m")
        plan = build_plan(solver, model.process.path_values(model.sampling_timesteps(20)))
        denoise = model.denoiser()
        # the compiled step itself, also where compile=True would run the eager loop
        cache = StepCache(CompileOptions())
        cache.slot.network = denoise.network
        loop = cache.get(solver, plan, x, denoise).stepper(plan, x)
        state = solver.init_state(x)
        row = {k: v[1].to(device=device, dtype=x.dtype) for k, v in plan.items()}

        def compiled() -> None:
            loop.index.fill_(1)
            loop(1, x, state, None)

        return [
            _per_call_us(lambda: net(x, t)),
            _per_call_us(lambda: solver.step(x, state, row, denoise, None)),
            _per_call_us(compiled),
        ]


def step_overhead(
    device: torch.device, batches: tuple[int, ...] = (4, 64, 256, 512, 1024, 4096)
) -> str:
    """CPU time of one dpmpp_2m step, eager and compiled, with a network that costs nothing:
    what the sampling machinery adds per step (best of 7 x 300 calls)."""
    lines = [
        "| batch (x 64) | free network (us) | eager step (us) | compiled step (us) "
        "| compile=True runs |",
        "|---:|---:|---:|---:|---|",
    ]
    for bsz in batches:
        cells = _step_costs(bsz, device)
        runs = "eager" if CompileOptions().eager_is_faster(torch.empty(bsz, 64)) else "compiled"
        lines.append(f"| {bsz} | " + " | ".join(f"{c:.0f}" for c in cells) + f" | {runs} |")
    return "\n".join(lines)


def run_cases(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    out = []
    for name in args.case:
        if name == "step-overhead":
            torch.set_num_threads(args.threads or 1)
            text = (
                "### step-overhead: one dpmpp_2m step with a free network, best of 7 x 300 "
                f"calls, CPU time, {torch.get_num_threads()} threads\n\n"
                f"{step_overhead(device)}\n"
            )
            print(text, flush=True)
            out.append(text)
            continue
        case = CASES[name]
        torch.set_num_threads(args.threads or case.threads)
        rounds = args.rounds or case.rounds
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        times = run_case(case, device, rounds)
        env = (
            f"torch {torch.__version__}, device {args.device}"
            + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")
            + f", {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
            + f", {rounds} interleaved rounds (floor, eager, compiled, diffusers in each), {started}"
        )
        text = f"### {case.name}: {case.description}\n\n{env}\n\n{case_table(case, times)}\n"
        print(text, flush=True)
        out.append(text)
    if args.out is not None:
        cmd = "python benchmarks/sampling_speed.py " + " ".join(
            f"--case {name}" for name in args.case
        )
        args.out.write_text(f"Command: `{cmd} --device {args.device}`\n\n" + "\n".join(out))


if __name__ == "__main__":
    main()
