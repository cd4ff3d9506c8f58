"""Defaults per process: ``sample(bsz, S)`` with no options against the best built-in choice.

For each process (VP ``linear`` and ``cosine`` with ``pred_eps``; ``rectified_flow`` with
shift 1 and 3 and ``pred_velocity``; ``edm``), each mixture of
:func:`flow_quality.flow_datasets` (a sharp 2-d ring, two 2-d Gaussians, a 64-d mixture) and
each budget of 5, 10 and 20 network calls, every deterministic sampler runs with every
registered spacing and with no spacing named (its default for the process,
:meth:`tinydiff.samplers.Sampler.spacing_for`), from the same x_T with the exact denoiser.
The error is the RMS distance to the exact probability-flow solution from that x_T
(:func:`tinydiff.testing.probability_flow_reference`: on VP from t = T to t = 1 then the
exact x0 estimate, as ``benchmarks/sampler_quality.py``; on rectified flow
:func:`flow_quality.flow_reference`; on EDM from sigma_max to sigma_min, as
``benchmarks/flow_quality.py``). Each sampler gets the largest number of steps within the
budget (S = the budget for all but heun, which needs 2S - 1 calls).

Printed and written to ``benchmarks/results/defaults_grid.md``:

* per cell and sampler: its default spacing's error / its best built-in spacing's error (the
  goal: at most 1.25);
* per cell: the process's default sampler (`tinydiff.samplers.default_sampler`) with its
  default spacing / the best (sampler, spacing) pair at the same number of network calls.
  On VP the default sampler is the stochastic ``ddpm``, which does not follow the flow: its
  row gives ddim (ddpm's deterministic counterpart) instead, marked so.

Run: ``PYTHONPATH=src python benchmarks/defaults_grid.py`` (about 5 minutes on 1 core).
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from tinydiff import DiffusionModel, samplers, spacings
from tinydiff.testing import ExactDenoiser, probability_flow_reference

sys.path.insert(0, str(Path(__file__).parent))
from flow_quality import flow_datasets, flow_reference, rms

T = 1000
BUDGETS = (5, 10, 20)
GOAL = 1.25
OUT = Path(__file__).parent / "results"
#: the default sampler of each process label (filled by `main` from the library)
DEFAULT_OF: dict[str, str] = {}
#: label -> config fields of the process
PROCESSES: dict[str, dict[str, Any]] = {
    "vp linear": {"noise_schedule_type": "linear", "target_type": "pred_eps"},
    "vp cosine": {"noise_schedule_type": "cosine", "target_type": "pred_eps"},
    "rf shift 1": {"noise_schedule_type": "rectified_flow", "target_type": "pred_velocity"},
    "rf shift 3": {
        "noise_schedule_type": "rectified_flow",
        "schedule_kwargs": {"shift": 3.0},
        "target_type": "pred_velocity",
    },
    "edm": {"noise_schedule_type": "edm", "target_type": "edm"},
}


def deterministic() -> list[str]:
    return [n for n in samplers.names() if not samplers.get(n)().is_stochastic]


def reference(model: DiffusionModel, mix: Any, z: torch.Tensor) -> torch.Tensor:
    """The exact flow from x_T = z to the end every sampler's last step reaches."""
    name = model.config.noise_schedule_type
    if name == "rectified_flow":
        return flow_reference(mix, z)
    if name == "edm":
        return probability_flow_reference(
            mix, z, start=(1.0, 80.0), end=(1.0, 0.002), num_steps=1500, denoise_end=False
        )
    ab = model.alphas_cumprod
    return probability_flow_reference(mix, z, float(ab[T]), float(ab[1]), num_steps=1500)


def measure_cell(
    model: DiffusionModel, z: torch.Tensor, ref: torch.Tensor, budget: int
) -> dict[str, dict[str, float]]:
    """``{sampler: {spacing or "default": error}}`` at ``budget`` network calls."""
    out: dict[str, dict[str, float]] = {}
    for name in deterministic():
        solver = model.make_sampler(name)
        steps = max(k for k in range(1, budget + 1) if solver.nfe(k) <= budget)
        errs: dict[str, float] = {}
        for sp in [*spacings.names(), None]:
            try:
                x = model.sample(
                    z.shape[0],
                    steps,
                    sampler=name,
                    init_noise=z,
                    timestep_spacing=sp,
                    check_finite=False,
                )
            except ValueError:  # e.g. a spacing whose times collide at this S
                continue
            errs[sp or "default"] = rms(x, ref)
        out[name] = errs
    return out


def main() -> None:
    warnings.simplefilter("ignore", FutureWarning)  # the changed defaults are what we measure
    warnings.simplefilter("ignore", UserWarning)  # pred_eps on exact denoisers is not fragile
    torch.set_num_threads(1)
    tic = time.time()
    rows: list[dict[str, Any]] = []
    for proc, fields in PROCESSES.items():
        for data, (mix, n) in flow_datasets().items():
            config = {"input_shape": mix.event_shape, "num_timesteps": T, **fields}
            model = DiffusionModel(ExactDenoiser(mix, config), config).double()
            DEFAULT_OF[proc] = default_name(model)
            g = torch.Generator().manual_seed(1)
            z = torch.randn(n, mix.dim, generator=g, dtype=torch.float64)
            z = z * model.process.prior_std()
            ref = reference(model, mix, z)
            for budget in BUDGETS:
                cell = measure_cell(model, z, ref, budget)
                rows.append({"process": proc, "data": data, "budget": budget, "cell": cell})
                print(summary_line(model, rows[-1]), flush=True)
    OUT.mkdir(exist_ok=True)
    write_markdown(rows, OUT / "defaults_grid.md", time.time() - tic)


def default_name(model: DiffusionModel) -> str:
    return samplers.default_sampler(model.process)


def _best(errs: dict[str, float]) -> tuple[float, str]:
    return min((e, sp) for sp, e in errs.items() if sp != "default")


def summary_line(model: DiffusionModel, row: dict[str, Any]) -> str:
    worst = max((errs["default"] / _best(errs)[0], name) for name, errs in row["cell"].items())
    return (
        f"{row['process']:10s} {row['data']:7s} {row['budget']:3d}: worst default-spacing "
        f"ratio {worst[0]:.2f} ({worst[1]})  default sampler {default_name(model)}"
    )


def _pair_ratio(row: dict[str, Any], names: list[str]) -> float:
    """The default sampler's error (ddim's on VP) / the best (sampler, spacing) pair's."""
    default = DEFAULT_OF[row["process"]]
    shown = "ddim" if default == "ddpm" else default
    best = min(e for n in names for e in row["cell"][n].values())
    return row["cell"][shown]["default"] / best


def write_markdown(rows: list[dict[str, Any]], path: Path, seconds: float) -> None:
    names = deterministic()
    lines = [
        "# Defaults per process against the best built-in choice",
        "",
        f"Generated by `benchmarks/defaults_grid.py` in {seconds:.0f} s. RMS error against the "
        "exact probability-flow solution from the same x_T, exact mixture denoisers (module "
        f"docstring). Goal: every ratio at most {GOAL}.",
        "",
        "## Each sampler's default spacing / its best built-in spacing",
        "",
        "Budget = network calls (S steps for every sampler but heun: S = 3, 5, 10). In "
        "brackets where above the goal: the best spacing.",
        "",
        "| process | data | calls | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for r in rows:
        vals = []
        for name in names:
            errs = r["cell"][name]
            best, sp = _best(errs)
            ratio = errs["default"] / best
            vals.append(f"{ratio:.2f}" + (f" ({sp})" if ratio > GOAL else ""))
        lines.append(f"| {r['process']} | {r['data']} | {r['budget']} | " + " | ".join(vals) + " |")
    lines += ["", "Cells within the goal, per process:", ""]
    for proc in PROCESSES:
        ratios = [
            errs["default"] / _best(errs)[0]
            for r in rows
            if r["process"] == proc
            for errs in r["cell"].values()
        ]
        ok = sum(x <= GOAL for x in ratios)
        geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
        lines.append(f"- {proc}: {ok} of {len(ratios)} (geometric mean ratio {geo:.2f})")
    lines += [
        "",
        "## The default sampler (default spacing) / the best (sampler, spacing) pair",
        "",
        "At the same number of network calls. VP's default ``ddpm`` is stochastic (it does "
        "not follow the flow; see `benchmarks/results/defaults.md` for trained models): its "
        "rows show ddim*, ddpm's deterministic counterpart, instead.",
        "",
        "| process | data | calls | default | its error | best pair | error | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        default = DEFAULT_OF[r["process"]]
        shown = "ddim" if default == "ddpm" else default
        err = r["cell"][shown]["default"]
        best = min((e, f"{n}/{sp}") for n in names for sp, e in r["cell"][n].items())
        lines.append(
            f"| {r['process']} | {r['data']} | {r['budget']} | {shown}"
            f"{'*' if default == 'ddpm' else ''} | {err:.3e} | {best[1]} | {best[0]:.3e} | "
            f"{err / best[0]:.2f} |"
        )
    lines += ["", "Cells within the goal, per process:", ""]
    for proc in PROCESSES:
        ratios = [_pair_ratio(r, names) for r in rows if r["process"] == proc]
        ok = sum(x <= GOAL for x in ratios)
        lines.append(f"- {proc}: {ok} of {len(ratios)}")
    lines += [
        "",
        "## Every error",
        "",
        "Per cell and sampler: the default's error, then each spacing's.",
        "",
    ]
    for r in rows:
        lines.append(f"- {r['process']}, {r['data']}, {r['budget']} calls:")
        for name in names:
            errs = r["cell"][name]
            txt = ", ".join(f"{sp} {e:.2e}" for sp, e in errs.items())
            lines.append(f"  - {name}: {txt}")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
