"""Flow matching and EDM sampling quality: tinydiff's samplers vs diffusers' schedulers.

Two blocks, each a function returning its rows so that other benchmark scripts can import
them (``from flow_quality import flow_block, edm_block``); ``benchmarks/sampler_quality.py``
reuses the rectified-flow peers (:func:`flow_peer_makers`, :func:`run_flow_peer`) and
reference (:func:`flow_reference`):

* ``flow_block``: rectified flow (shift 1 and 3) with diffusers' FlowMatchEulerDiscrete,
  FlowMatchHeunDiscrete, and DPMSolverMultistep / UniPCMultistep with ``use_flow_sigmas``
  (``prediction_type="flow_prediction"``);
* ``edm_block``: EDM's variance-exploding path (sigma 0.002..80) with EDMEuler and
  EDMDPMSolverMultistep (``final_sigmas_type="sigma_min"``, the same end as tinydiff's path).

Every method starts from the same x_T and is driven by the same exact denoiser (the mixture's
posterior mean). The metric is the RMS error against the exact probability-flow solution
from that noise (RK4 in log(sigma / alpha), :func:`tinydiff.testing.probability_flow_reference`):
to sigma / alpha = 1e-5, then the exact x0 estimate there, for rectified flow (the data end);
to sigma_min for EDM. NFE is counted by wrapping the denoiser; each method runs with the
largest number of steps within the budget. tinydiff's best is over its samplers and
spacings, diffusers' best over its schedulers; ratio = diffusers' best / tinydiff's best
(> 1: tinydiff is more accurate).

Run: ``PYTHONPATH=src python benchmarks/flow_quality.py`` (a few minutes on 2 cores); writes
``benchmarks/results/flow_quality.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tinydiff import DiffusionModel
from tinydiff.testing import ExactDenoiser, GaussianMixture, probability_flow_reference

T = 1000
NFES = (5, 10, 20)
OUT = Path(__file__).parent / "results"
TINY = ["euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "deis"]
SPACINGS = ["trailing", "logsnr", "logsnr_trailing", "karras", "quadratic"]
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


class Counted:
    """The mixture's D(x; alpha, sigma), counting calls."""

    def __init__(self, mix: GaussianMixture) -> None:
        self.mix, self.n = mix, 0

    def __call__(self, x: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
        self.n += 1
        return self.mix.denoise(x.double(), alpha, sigma)


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b) ** 2).mean().sqrt())


def _tiny_best(model: DiffusionModel, z: torch.Tensor, ref: torch.Tensor, nfe: int) -> Row:
    best: Row = {"err": math.inf}
    for name in TINY:
        sampler = model.make_sampler(name)
        steps = max((s for s in range(1, nfe + 1) if sampler.nfe(s) <= nfe), default=None)
        if steps is None:
            continue
        for spacing in SPACINGS:
            try:
                out = model.sample(
                    z.shape[0], steps, sampler=name, init_noise=z, timestep_spacing=spacing
                )
            except ValueError:
                continue
            err = _rms(out, ref)
            if err < best["err"]:
                best = {"err": err, "method": f"{name}/{spacing}", "steps": steps}
    return best


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
    """diffusers' rectified-flow schedulers (``sigma = s``, timestep = sigma * T), by name."""
    import diffusers

    return {
        "FlowMatchEuler": lambda: diffusers.FlowMatchEulerDiscreteScheduler(T, shift=shift),
        "FlowMatchHeun": lambda: diffusers.FlowMatchHeunDiscreteScheduler(T, shift=shift),
        "DPMSolverMultistep(flow)": lambda: diffusers.DPMSolverMultistepScheduler(
            num_train_timesteps=T,
            use_flow_sigmas=True,
            flow_shift=shift,
            prediction_type="flow_prediction",
        ),
        "UniPC(flow)": lambda: diffusers.UniPCMultistepScheduler(
            num_train_timesteps=T,
            use_flow_sigmas=True,
            flow_shift=shift,
            prediction_type="flow_prediction",
        ),
    }


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
            out, _, steps = run_flow_peer(make, mix, z, nfe)
            rows.append({"err": _rms(out, ref), "method": name, "steps": steps})
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
            rows.append({"err": _rms(out, ref), "method": name, "steps": nfe, "nfe": d.n})
        except Exception as err:
            rows.append({"err": math.inf, "method": f"{name} ({type(err).__name__})"})
    return rows


def _exact_model(mix: GaussianMixture, **cfg: Any) -> DiffusionModel:
    config = {"input_shape": mix.event_shape, "num_timesteps": T, **cfg}
    return DiffusionModel(ExactDenoiser(mix, config), config).double()


def flow_block(shift: float = 1.0) -> list[Row]:
    """Rows (dataset, nfe, tinydiff best, diffusers best, ratio) on rectified flow."""
    rows = []
    for data, (mix, n) in datasets().items():
        model = _exact_model(
            mix,
            noise_schedule_type="rectified_flow",
            schedule_kwargs={"shift": shift},
            target_type="pred_velocity",
        )
        z = torch.randn(n, mix.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        ref = flow_reference(mix, z)
        for nfe in NFES:
            tiny = _tiny_best(model, z, ref, nfe)
            peers = _diffusers_flow(mix, z, ref, nfe, shift)
            best = min(peers, key=lambda r: r["err"])
            rows.append(_row(f"rectified_flow shift {shift:g}", data, nfe, tiny, best, peers))
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
    ratio = best["err"] / tiny["err"] if tiny["err"] > 0 else math.inf
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


def write_markdown(rows: list[Row], path: Path) -> None:
    lines = [
        "# Flow matching and EDM: sampling error at equal NFE",
        "",
        "RMS error against the exact probability-flow solution from the same x_T, exact",
        "mixture denoisers (`benchmarks/flow_quality.py`). ratio = diffusers' best / tinydiff's",
        "best (> 1: tinydiff more accurate).",
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
    lines += ["", "All diffusers schedulers (RMS error):", ""]
    for r in rows:
        peers = ", ".join(f"{k} {v:.2e}" for k, v in r["peers"].items())
        lines.append(f"- {r['block']}, {r['data']}, NFE {r['nfe']}: {peers}")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    torch.set_num_threads(2)
    rows = flow_block(1.0) + flow_block(3.0) + edm_block()
    OUT.mkdir(exist_ok=True)
    write_markdown(rows, OUT / "flow_quality.md")


if __name__ == "__main__":
    main()
