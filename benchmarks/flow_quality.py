"""Flow matching and EDM sampling quality: tinydiff's samplers vs diffusers' schedulers.

Two blocks, each a function returning its rows so that other benchmark scripts can import
them (``from flow_quality import flow_block, edm_block``); ``benchmarks/sampler_quality.py``
reuses the rectified-flow peers (:func:`flow_peer_makers`, :func:`run_flow_peer`) and
reference (:func:`flow_reference`):

* ``flow_block``: rectified flow with shift 1 and 3 on three mixtures (:func:`flow_datasets`:
  a sharp 2-d ring of 8 modes, two 2-d Gaussians, a 64-d mixture of 16), against every
  flow-capable diffusers configuration (:func:`flow_peer_makers`): FlowMatchEulerDiscrete,
  FlowMatchHeunDiscrete, DPMSolverMultistep (2M and 3M) and UniPCMultistep with B(h) =
  "bh1" and "bh2", each with ``use_flow_sigmas`` (shifted, final sigma 0) and with
  ``use_karras_sigmas`` as well (UniPC then ignores ``flow_shift``: Karras levels of its
  default VP table, mapped to s = k / (1 + k); diffusers 0.42.1's DPMSolverMultistep does not
  map them, its sigmas stay 157 .. 0.01 with alpha = 1 - sigma < 0, so its Karras runs are
  NaN, listed as failures, as is UniPC-bh1 whose last step to sigma = 0 is inf * 0). tinydiff runs every deterministic sampler
  (and unipc with ``variant="bh1"``) with every built-in spacing; its unipc, dpmpp_2m,
  dpmpp_3m and deis also run on diffusers' own flow grid (the same times, passed as explicit
  times: "same grid" rows, not counted as built-in);
* ``edm_block``: EDM's variance-exploding path (sigma 0.002..80) with EDMEuler and
  EDMDPMSolverMultistep (``final_sigmas_type="sigma_min"``, the same end as tinydiff's path),
  on :func:`datasets` (a 2-d ring, a 32-d mixture).

Every method starts from the same x_T and is driven by the same exact denoiser (the mixture's
posterior mean). The metric is the RMS error (root of the mean over samples of the squared
distance) against the exact probability-flow solution from that noise (RK4 in
log(sigma / alpha), :func:`tinydiff.testing.probability_flow_reference`): to sigma / alpha =
1e-5, then the exact x0 estimate there, for rectified flow (the data end); to sigma_min for
EDM. NFE is counted by wrapping the denoiser; each method runs with the largest number of
steps within the budget. ratio = tinydiff's best / the best peer's (< 1: tinydiff is more
accurate). diffusers' schedulers run in float64 (their float32 sigma tables widened after
``set_timesteps``; FlowMatchEuler / FlowMatchHeun's ``step`` computes in float32).
k-diffusion's rectified-flow results (from its first finite level) are in
``benchmarks/sampler_quality.py``.

Run: ``PYTHONPATH=src python benchmarks/flow_quality.py`` (about 5 minutes on 1 core);
writes ``benchmarks/results/flow_quality.md``.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tinydiff import DiffusionModel
from tinydiff.testing import ExactDenoiser, GaussianMixture, probability_flow_reference

sys.path.insert(0, str(Path(__file__).parent))  # sampler_quality's fast mixture

T = 1000
NFES = (5, 10, 20)
OUT = Path(__file__).parent / "results"
#: tinydiff's deterministic samplers (label -> (sampler, options))
TINY: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("ddim", {}),
    "euler": ("euler", {}),
    "heun": ("heun", {}),
    "dpmpp_2m": ("dpmpp_2m", {}),
    "dpmpp_3m": ("dpmpp_3m", {}),
    "unipc": ("unipc", {}),
    "unipc-bh1": ("unipc", {"variant": "bh1"}),
    "deis": ("deis", {}),
}
#: samplers also run on diffusers' own flow grid (explicit times)
SAME_GRID = ("unipc", "unipc-bh1", "dpmpp_2m", "dpmpp_3m", "deis")
Row = dict[str, Any]


def datasets() -> dict[str, tuple[GaussianMixture, int]]:
    """A sharp 2-D ring of 8 components and a 32-D mixture of 12."""
    g = torch.Generator().manual_seed(0)
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    radius = 2 + torch.rand(8, generator=g, dtype=torch.float64)
    means2 = torch.stack([radius * angles.cos(), radius * angles.sin()], 1)
    stds2 = 0.05 + 0.05 * torch.rand(8, generator=g, dtype=torch.float64)
    means32 = torch.randn(12, 32, generator=g, dtype=torch.float64) / math.sqrt(32) * 3
    stds32 = 0.1 + 0.2 * torch.rand(12, generator=g, dtype=torch.float64)
    return {
        "ring2d": (GaussianMixture(means2, stds2), 256),
        "mix32d": (GaussianMixture(means32, stds32), 128),
    }


def flow_datasets() -> dict[str, tuple[GaussianMixture, int]]:
    """The rectified-flow mixtures and sample counts: ``ring2d`` and ``mix64d`` are
    ``benchmarks/sampler_quality.py``'s sharp2d (8 modes of std 0.05..0.1 on radii 2..4) and
    mix64d (16 isotropic components in 64-d, std 0.1..0.3), ``two2d`` is two Gaussians at
    (-1.5, 0) and (1.5, 0.5) with std 0.3 and 0.5 (the mixture of tests/test_timestep_search.py).
    The 64-d mixture uses 256 samples (sampler_quality's count)."""
    from sampler_quality import IsotropicMixture, check_fast_denoiser

    g = torch.Generator().manual_seed(0)
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    radius = 2 + 2 * torch.rand(8, generator=g, dtype=torch.float64)
    means2 = torch.stack([radius * angles.cos(), radius * angles.sin()], 1)
    stds2 = 0.05 + 0.05 * torch.rand(8, generator=g, dtype=torch.float64)
    means64 = torch.randn(16, 64, generator=g, dtype=torch.float64) / math.sqrt(64) * 3
    stds64 = 0.1 + 0.2 * torch.rand(16, generator=g, dtype=torch.float64)
    two = torch.tensor([[-1.5, 0.0], [1.5, 0.5]], dtype=torch.float64)
    out = {
        "ring2d": (IsotropicMixture(means2, stds2), 512),
        "two2d": (IsotropicMixture(two, torch.tensor([0.3, 0.5], dtype=torch.float64)), 512),
        "mix64d": (IsotropicMixture(means64, stds64), 256),
    }
    for mix, _ in out.values():
        check_fast_denoiser(mix)
    return out


class Counted:
    """The mixture's D(x; alpha, sigma), counting calls."""

    def __init__(self, mix: GaussianMixture) -> None:
        self.mix, self.n = mix, 0

    def __call__(self, x: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
        self.n += 1
        return self.mix.denoise(x.double(), alpha, sigma)


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """RMS distance (per sample, then over samples); inf for non-finite samples."""
    value = float(((a.double() - b) ** 2).sum(-1).mean().sqrt())
    return value if math.isfinite(value) else math.inf


def tiny_grid(
    model: DiffusionModel,
    z: torch.Tensor,
    ref: torch.Tensor,
    nfe: int,
    samplers: dict[str, tuple[str, dict[str, Any]]] = TINY,
) -> dict[tuple[str, str], float]:
    """Error of every sampler in ``samplers`` (``{label: (name, options)}``) with every
    built-in spacing at ``nfe`` network calls, ``{(label, spacing): err}``."""
    from tinydiff import spacings

    out: dict[tuple[str, str], float] = {}
    for label, (name, kw) in samplers.items():
        sampler = model.make_sampler(name, kw)
        steps = max((s for s in range(1, nfe + 1) if sampler.nfe(s) <= nfe), default=None)
        if steps is None:
            continue
        for spacing in spacings.names():
            try:
                x = model.sample(
                    z.shape[0],
                    steps,
                    sampler=name,
                    sampler_kwargs=kw,
                    init_noise=z,
                    timestep_spacing=spacing,
                    check_finite=False,
                )
            except ValueError:
                continue
            out[label, spacing] = rms(x, ref)
    return out


def _tiny_runs(
    model: DiffusionModel, z: torch.Tensor, ref: torch.Tensor, nfe: int
) -> dict[str, float]:
    """`tiny_grid` of the tinydiff samplers, keyed ``"name/spacing"``."""
    return {f"{label}/{sp}": e for (label, sp), e in tiny_grid(model, z, ref, nfe).items()}


def _best(runs: dict[str, float], keep: Callable[[str], bool] = lambda k: True) -> Row:
    vals = [(e, k) for k, e in runs.items() if keep(k)]
    err, method = min(vals) if vals else (math.inf, "-")
    return {"err": err, "method": method}


def _tiny_best(model: DiffusionModel, z: torch.Tensor, ref: torch.Tensor, nfe: int) -> Row:
    return _best(_tiny_runs(model, z, ref, nfe))


def _drive(
    sched: Any,
    x: torch.Tensor,
    model_out: Callable[[torch.Tensor, Any, int], torch.Tensor],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    x = x.to(dtype)
    for i, ts in enumerate(sched.timesteps):
        if hasattr(sched, "scale_model_input"):
            sched.scale_model_input(x, ts)  # the network input (unused by the exact D)
        x = sched.step(model_out(x, ts, i).to(dtype), ts, x).prev_sample.to(dtype)
    return x


def flow_peer_makers(shift: float = 1.0) -> dict[str, Callable[[], Any]]:
    """diffusers' rectified-flow schedulers (``sigma = s``, timestep = sigma * T), by name:
    every flow-capable configuration of the module docstring."""
    import diffusers

    def multistep(cls: Any, **kw: Any) -> Callable[[], Any]:
        return lambda: cls(
            num_train_timesteps=T,
            use_flow_sigmas=True,
            flow_shift=shift,
            prediction_type="flow_prediction",
            **kw,
        )

    makers: dict[str, Callable[[], Any]] = {
        "FlowMatchEuler": lambda: diffusers.FlowMatchEulerDiscreteScheduler(T, shift=shift),
        "FlowMatchHeun": lambda: diffusers.FlowMatchHeunDiscreteScheduler(T, shift=shift),
    }
    for karras in (False, True):
        tag = ", karras" if karras else ""
        dpm, unipc = diffusers.DPMSolverMultistepScheduler, diffusers.UniPCMultistepScheduler
        makers[f"DPM++2M(flow{tag})"] = multistep(dpm, use_karras_sigmas=karras)
        makers[f"DPM++3M(flow{tag})"] = multistep(dpm, solver_order=3, use_karras_sigmas=karras)
        for bh in ("bh2", "bh1"):
            makers[f"UniPC-{bh}(flow{tag})"] = multistep(
                unipc, solver_type=bh, use_karras_sigmas=karras
            )
    return makers


def diffusers_flow_sigmas(make: Callable[[], Any], steps: int) -> torch.Tensor:
    """The flow sigmas (steps + 1,) a diffusers scheduler visits, float64."""
    sched = make()
    sched.set_timesteps(steps)
    return sched.sigmas.double()


def run_flow_peer(
    make: Callable[[], Any],
    mix: GaussianMixture,
    z: torch.Tensor,
    nfe: int,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, int, int]:
    """Run one diffusers flow scheduler from x_T = z with the exact velocity
    (x - D(x; 1 - s, s)) / s, with the most steps whose NFE fits ``nfe``.

    Returns (samples, NFE used, steps). Raises what the scheduler raises, or RuntimeError if
    not even one step fits. (FlowMatchEuler / FlowMatchHeun's ``step`` computes in float32
    whatever ``dtype`` is.)
    """

    def velocity(d: Counted) -> Callable[[torch.Tensor, Any, int], torch.Tensor]:
        def out(x: torch.Tensor, ts: Any, i: int) -> torch.Tensor:
            s = float(ts) / T  # flow sigmas: timestep = sigma * T
            return (x.double() - d(x, 1 - s, s)) / s

        return out

    for steps in range(nfe, 0, -1):
        d = Counted(mix)
        sched = make()
        sched.set_timesteps(steps)
        if dtype == torch.float64 and hasattr(sched, "lower_order_nums"):
            sched.sigmas = sched.sigmas.double()  # multistep: coefficients in float64
        out = _drive(sched, z, velocity(d), dtype)
        if d.n <= nfe:
            return out, d.n, steps
    raise RuntimeError(f"no step count fits {nfe} NFE")


def flow_reference(mix: GaussianMixture, z: torch.Tensor, num_steps: int = 1500) -> torch.Tensor:
    """The exact probability-flow solution of rectified flow from x_T = z (pure noise, alpha(T)
    = 0): RK4 in log(sigma / alpha) from sigma / alpha = 1e6 (x_T = z stands in for the state
    there, an error of 1e-6 |x0| that the flow contracts) to 1e-5, then the exact x0 estimate."""
    k = 1e6
    return probability_flow_reference(
        mix, z, start=(1 / (1 + k), k / (1 + k)), end=(1 - 1e-5, 1e-5), num_steps=num_steps
    )


def _diffusers_flow(
    mix: GaussianMixture, z: torch.Tensor, ref: torch.Tensor, nfe: int, shift: float
) -> list[Row]:
    rows = []
    for name, make in flow_peer_makers(shift).items():
        try:
            out = run_flow_peer(make, mix, z, nfe, torch.float64)[0]
            err = rms(out, ref)
            rows.append({"err": err, "method": name if math.isfinite(err) else f"{name} (NaN)"})
        except Exception as err:  # a scheduler failing is a result, not a crash
            rows.append({"err": math.inf, "method": f"{name} ({type(err).__name__})"})
    return rows


def _diffusers_edm(mix: GaussianMixture, z: torch.Tensor, ref: torch.Tensor, nfe: int) -> list[Row]:
    import diffusers

    sd = 0.5

    def precond(d: Counted, sched: Any) -> Callable[[torch.Tensor, Any, int], torch.Tensor]:
        def out(x: torch.Tensor, ts: Any, i: int) -> torch.Tensor:
            s = float(sched.sigmas[i])
            c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / math.sqrt(s**2 + sd**2)
            return (d(x, 1.0, s) - c_skip * x.double()) / c_out

        return out

    makers: dict[str, Callable[[], Any]] = {
        "EDMEuler": lambda: diffusers.EDMEulerScheduler(final_sigmas_type="sigma_min"),
        "EDMDPMSolverMultistep": lambda: diffusers.EDMDPMSolverMultistepScheduler(
            final_sigmas_type="sigma_min"
        ),
    }
    rows = []
    for name, make in makers.items():
        d = Counted(mix)
        try:
            sched = make()
            sched.set_timesteps(nfe)
            out = _drive(sched, z, precond(d, sched))
            rows.append({"err": rms(out, ref), "method": name, "steps": nfe, "nfe": d.n})
        except Exception as err:
            rows.append({"err": math.inf, "method": f"{name} ({type(err).__name__})"})
    return rows


def _exact_model(mix: GaussianMixture, **cfg: Any) -> DiffusionModel:
    config = {"input_shape": mix.event_shape, "num_timesteps": T, **cfg}
    return DiffusionModel(ExactDenoiser(mix, config), config).double()


BLEND_SPACINGS = ("trailing", "quadratic")


def _fitted_blend(
    model: DiffusionModel, z: torch.Tensor, ref: torch.Tensor, nfe: int, spacing: str
) -> tuple[float, float, float]:
    """unipc's ``last_step_blend`` c fitted to the reference (in-sample: what a per-model
    coefficient could give at most): the samples are affine in c, x(c) = x(0) + 2c (x(1/2) -
    x(0)), so c* is a least-squares fit, clipped to the option's range [0, 0.99]. Returns
    (c*, error at c = 0, error at c*)."""
    x0, xh = (
        model.sample(
            z.shape[0],
            nfe,
            sampler="unipc",
            sampler_kwargs={"last_step_blend": c},
            init_noise=z,
            timestep_spacing=spacing,
        )
        for c in (0.0, 0.5)
    )
    d = 2 * (xh - x0)
    c = float(((ref - x0) * d).sum() / (d * d).sum().clamp_min(1e-300))
    c = min(max(c, 0.0), 0.99)
    return c, rms(x0, ref), rms(x0 + c * d, ref)


def flow_block(shift: float = 1.0) -> list[Row]:
    """Rows (dataset, nfe, tinydiff best, diffusers best, ratio) on rectified flow."""
    rows = []
    for data, (mix, n) in flow_datasets().items():
        model = _exact_model(
            mix,
            noise_schedule_type="rectified_flow",
            schedule_kwargs={"shift": shift},
            target_type="pred_velocity",
        )
        z = torch.randn(n, mix.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        ref = flow_reference(mix, z)
        grid = flow_peer_makers(shift)["UniPC-bh2(flow)"]
        for nfe in NFES:
            runs = _tiny_runs(model, z, ref, nfe)
            # the same times as diffusers' flow grid (first sigma 1 - 1e-6, final 0)
            sig = diffusers_flow_sigmas(grid, nfe)
            times = T * sig / (shift - (shift - 1) * sig)
            same = {}
            for label in SAME_GRID:
                name, kw = TINY[label]
                x = model.sample(
                    n,
                    sampler=name,
                    sampler_kwargs=kw,
                    init_noise=z,
                    timestep_spacing=times,
                    check_finite=False,
                )
                same[label] = rms(x, ref)
            peers = _diffusers_flow(mix, z, ref, nfe, shift)
            best = min(peers, key=lambda r: r["err"])
            row = _row(f"rectified_flow shift {shift:g}", data, nfe, _best(runs), best, peers)
            row["blend"] = {sp: _fitted_blend(model, z, ref, nfe, sp) for sp in BLEND_SPACINGS}
            row["before"] = _best(runs, lambda k: not k.startswith("unipc-bh1"))
            row["same"] = same
            row["top"] = sorted(runs.items(), key=lambda kv: kv[1])[:5]
            rows.append(row)
    return rows


def edm_block() -> list[Row]:
    """Rows on EDM's path (sigma_min 0.002 at t = 0, sigma_max 80 at t = T)."""
    rows = []
    for data, (mix, n) in datasets().items():
        model = _exact_model(mix, noise_schedule_type="edm", target_type="edm")
        z = torch.randn(n, mix.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        z = z * model.process.prior_std()
        ref = probability_flow_reference(
            mix, z, start=(1.0, 80.0), end=(1.0, 0.002), num_steps=1500, denoise_end=False
        )
        for nfe in NFES:
            tiny = _tiny_best(model, z, ref, nfe)
            peers = _diffusers_edm(mix, z, ref, nfe)
            best = min(peers, key=lambda r: r["err"])
            rows.append(_row("edm", data, nfe, tiny, best, peers))
    return rows


def _row(block: str, data: str, nfe: int, tiny: Row, best: Row, peers: list[Row]) -> Row:
    ratio = tiny["err"] / best["err"] if best["err"] > 0 else math.inf
    row = {
        "block": block,
        "data": data,
        "nfe": nfe,
        "tiny": tiny,
        "peer": best,
        "ratio": ratio,
        "peers": {p["method"]: p["err"] for p in peers},
    }
    print(
        f"{block:24s} {data:7s} NFE {nfe:3d}  tinydiff {tiny['err']:.2e} ({tiny.get('method')})  "
        f"diffusers {best['err']:.2e} ({best['method']})  ratio {ratio:.2f}",
        flush=True,
    )
    return row


def write_markdown(rows: list[Row], path: Path, seconds: float) -> None:
    flow = [r for r in rows if r["block"].startswith("rectified_flow")]
    lines = [
        "# Flow matching and EDM: sampling error at equal NFE",
        "",
        f"Generated by `benchmarks/flow_quality.py` in {seconds:.0f} s ({torch.get_num_threads()} "
        "torch thread). RMS error against the exact probability-flow solution from the same "
        "x_T, exact mixture denoisers (module docstring). ratio = tinydiff's best / the best "
        "diffusers configuration's (< 1: tinydiff more accurate).",
        "",
        "## Rectified flow: tinydiff's best built-in / best diffusers",
        "",
        "Best over every deterministic sampler (unipc with bh2 and bh1) and built-in spacing, "
        "against the best of every flow-capable diffusers configuration. In brackets: the same "
        "without unipc's bh1 variant, whose samples were NaN before this version on every "
        "built-in spacing (they start at x_T, lambda = -inf).",
        "",
        "| data, shift | " + " | ".join(f"NFE {k}" for k in NFES) + " |",
        "|---|" + "---|" * len(NFES),
    ]
    cells: dict[tuple[str, str], dict[int, Row]] = {}
    for r in flow:
        cells.setdefault((r["data"], r["block"].split()[-1]), {})[r["nfe"]] = r
    for (data, shift), by_nfe in cells.items():
        vals = []
        for k in NFES:
            r = by_nfe[k]
            vals.append(f"{r['ratio']:.2f} [{r['before']['err'] / r['peer']['err']:.2f}]")
        lines.append(f"| {data}, {shift} | " + " | ".join(vals) + " |")
    lines += [
        "",
        "## Rectified flow: on diffusers' own flow grid",
        "",
        "tinydiff's multistep samplers on the times of diffusers' flow sigmas (shifted, first "
        "sigma 1 - 1e-6, final sigma 0) / diffusers' scheduler of the same method on them "
        "(1.00: the same method; UniPC-bh1 is NaN in diffusers, its last step to sigma = 0 "
        "multiplies B(h) = h = inf by 0). Where dpmpp_3m / DPM++3M is above 1: diffusers' "
        "third-order term has half the weight of the exact integral of the quadratic through "
        "the three outputs (alpha_t (1/2 - (e^-h - 1 + h) / h^2) D2 against alpha_t (1 - 2 "
        "(e^-h - 1 + h) / h^2) D2), which makes it formally second order but damps the "
        "extrapolation.",
        "",
        "| data, shift | NFE | unipc / UniPC-bh2 | unipc-bh1 / UniPC-bh1 | dpmpp_2m / DPM++2M "
        "| dpmpp_3m / DPM++3M | deis / UniPC-bh2 |",
        "|---|---|---|---|---|---|---|",
    ]
    pairs = [
        ("unipc", "UniPC-bh2(flow)"),
        ("unipc-bh1", "UniPC-bh1(flow)"),
        ("dpmpp_2m", "DPM++2M(flow)"),
        ("dpmpp_3m", "DPM++3M(flow)"),
        ("deis", "UniPC-bh2(flow)"),
    ]
    for r in flow:
        peer = {k.removesuffix(" (NaN)"): v for k, v in r["peers"].items()}
        vals = []
        for ours, theirs in pairs:
            e, p = r["same"][ours], peer.get(theirs, math.nan)
            vals.append(f"{e:.3g} / NaN" if not math.isfinite(p) else f"{e / p:.2f}")
        shift = r["block"].split()[-1]
        lines.append(f"| {r['data']}, {shift} | {r['nfe']} | " + " | ".join(vals) + " |")
    lines += [
        "",
        "## Rectified flow: unipc's last step, fitted",
        "",
        "unipc's error with ``last_step_blend`` c fitted to the reference in each cell "
        "(in-sample, so a bound on what a per-model coefficient can give; c* clipped to the "
        "option's [0, 0.99]) / its error with c = 0 (the default), and c*, on two spacings. At 10-20 steps most of the error of "
        "uniform-in-sigma times is the first-order last step to sigma = 0.",
        "",
        "| data, shift | NFE | "
        + " | ".join(f"{sp}: fitted / c = 0 (c*)" for sp in BLEND_SPACINGS)
        + " |",
        "|---|---|" + "---|" * len(BLEND_SPACINGS),
    ]
    for r in flow:
        vals = [
            f"{e1 / e0:.2f} ({c:.2f})" for c, e0, e1 in (r["blend"][sp] for sp in BLEND_SPACINGS)
        ]
        shift = r["block"].split()[-1]
        lines.append(f"| {r['data']}, {shift} | {r['nfe']} | " + " | ".join(vals) + " |")
    lines += [
        "",
        "## Every cell",
        "",
        "| block | data | NFE | tinydiff best | method | diffusers best | method | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['block']} | {r['data']} | {r['nfe']} | {r['tiny']['err']:.3e} | "
            f"{r['tiny'].get('method')} | {r['peer']['err']:.3e} | {r['peer']['method']} | "
            f"{r['ratio']:.2f} |"
        )
    lines += ["", "All diffusers configurations and tinydiff's five best (RMS error):", ""]
    for r in rows:
        peers = ", ".join(f"{k} {v:.2e}" for k, v in r["peers"].items())
        lines.append(f"- {r['block']}, {r['data']}, NFE {r['nfe']}: {peers}")
        if "top" in r:
            top = ", ".join(f"{k} {v:.2e}" for k, v in r["top"])
            lines.append(f"  - tinydiff: {top}")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    torch.set_num_threads(1)  # small float64 operations: a thread pool only adds overhead
    tic = time.time()
    rows = flow_block(1.0) + flow_block(3.0) + edm_block()
    OUT.mkdir(exist_ok=True)
    write_markdown(rows, OUT / "flow_quality.md", time.time() - tic)


if __name__ == "__main__":
    main()
