"""Inpainting / posterior sampling quality: tinydiff.posterior's methods against the exact
posterior, and against diffusers' RePaintScheduler.

For a Gaussian mixture prior and a noiseless observation of some coordinates (inpainting),
the posterior is a Gaussian mixture in closed form (`GaussianMixture.posterior`). Each method
draws n = 2000 samples for one observation (y from a prior draw, fixed seed), driven by the
exact denoiser of the mixture, and is scored by the energy distance (V-statistic,
`tinydiff.metrics.energy_distance`) to 2000 exact posterior draws, on coordinates divided by
the exact posterior's standard deviations (observed coordinates, whose posterior std is 0,
by the prior's). The floor is the distance between two independent exact draws of 2000.

Budgets are network calls per sample: a backward pass through the network counts as one
call, and every particle's call counts. Each method gets the most steps within the budget,
by a rule fixed in advance (not tuned per cell):

* ``repaint`` (tinydiff) and diffusers' ``RePaintScheduler`` (VP only): jump_length 5,
  2 passes (one resampling jump per stretch), ancestral steps (eta = 1, the paper's);
  diffusers is driven like its RePaintPipeline, its betas taken from tinydiff's table;
* ``dps``: step_size 1, 2 calls per step;
* ``mmps``: cg_iters 1, 3 calls per step;
* ``mcgdiff``: (particles, steps) = (2, 10) at 20 calls, (5, 10) at 50, (5, 20) at 100 and
  (20, 50) at 1000 (the 1000-call row on the 64-D mixture for VP linear only, to keep the
  script within minutes on one core: it evaluates the exact 10-component denoiser on 40000
  rows per step).

Run: ``PYTHONPATH=src python benchmarks/posterior_quality.py`` (one thread); writes
``benchmarks/results/posterior_quality.md``.
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tinydiff import DiffusionModel, posterior
from tinydiff.metrics import energy_distance
from tinydiff.testing import ExactDenoiser, GaussianMixture, MixturePosterior

T = 1000
N = 2000
BUDGETS = (20, 50, 100)
SMC_PLAN = {20: (2, 10), 50: (5, 10), 100: (5, 20), 1000: (20, 50)}
JUMP, PASSES = 5, 2
OUT = Path(__file__).parent / "results"
F64 = torch.float64
PROCESSES: dict[str, dict[str, Any]] = {
    "vp_linear": {"noise_schedule_type": "linear", "target_type": "pred_eps"},
    "vp_cosine": {"noise_schedule_type": "cosine", "target_type": "pred_eps"},
    "rectified_flow": {"noise_schedule_type": "rectified_flow", "target_type": "pred_velocity"},
}


def datasets() -> dict[str, tuple[GaussianMixture, torch.Tensor]]:
    """(mixture, bool mask of observed coordinates): a 2-D ring of 8 (observe x), an 8-D
    mixture of 6 (observe 4 coordinates) and a 64-D mixture of 10 (observe 32)."""
    g = torch.Generator().manual_seed(0)
    angles = torch.arange(8, dtype=F64) * (2 * math.pi / 8)
    ring = GaussianMixture(torch.stack([2 * angles.cos(), 2 * angles.sin()], 1), 0.3)
    mix8 = GaussianMixture(
        1.5 * torch.randn(6, 8, generator=g, dtype=F64),
        0.3 + 0.4 * torch.rand(6, generator=g, dtype=F64),
    )
    mix64 = GaussianMixture(
        3 / 8 * torch.randn(10, 64, generator=g, dtype=F64) * 2,
        0.2 + 0.3 * torch.rand(10, generator=g, dtype=F64),
    )
    return {
        "ring2d": (ring, torch.tensor([True, False])),
        "mix8d": (mix8, torch.arange(8) < 4),
        "mix64d": (mix64, torch.arange(64) < 32),
    }


def exact(mix: GaussianMixture, process: str) -> DiffusionModel:
    config = {"input_shape": mix.event_shape, "num_timesteps": T, **PROCESSES[process]}
    return DiffusionModel(ExactDenoiser(mix, config), config).double()


def repaint_calls_diffusers(steps: int) -> int:
    from diffusers import RePaintScheduler

    sched = RePaintScheduler(num_train_timesteps=T)
    sched.set_timesteps(steps, jump_length=JUMP, jump_n_sample=PASSES)
    ts = sched.timesteps.tolist()
    return 1 + sum(1 for a, b in itertools.pairwise(ts) if b < a)


def most_steps(calls: Callable[[int], int], budget: int) -> int:
    steps = 1
    while steps < T and calls(steps + 1) <= budget:
        steps += 1
    return steps


def diffusers_repaint(
    model: DiffusionModel, x_known: torch.Tensor, mask: torch.Tensor, steps: int, seed: int
) -> torch.Tensor:
    """diffusers' RePaintScheduler driven as its RePaintPipeline does (mask 1 = known)."""
    from diffusers import RePaintScheduler

    ab = model.alphas_cumprod
    betas = (1 - ab[1:] / ab[:-1]).numpy()
    sched = RePaintScheduler(num_train_timesteps=T, trained_betas=betas, eta=1.0, clip_sample=False)
    sched.set_timesteps(steps, jump_length=JUMP, jump_n_sample=PASSES)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(x_known.shape, generator=gen, dtype=F64)
    m = mask.to(F64).expand_as(x_known)
    t_last = sched.timesteps[0] + 1
    for t in sched.timesteps:
        if t < t_last:
            eps = model.nn_module(x, (t + 1).to(F64).expand(x.shape[0]))  # diffusers' t = ours - 1
            x = sched.step(eps, t, x, x_known, m, generator=gen).prev_sample
        else:
            x = sched.undo_step(x, t_last, generator=gen)
        t_last = t
    return x


def scales(post: MixturePosterior, mix: GaussianMixture) -> torch.Tensor:
    std = post.std()
    prior = mix.covariance().diagonal().sqrt().reshape(std.shape)
    return torch.where(std > 1e-6 * prior, std, prior)


def run() -> tuple[list[dict[str, Any]], float]:
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for dname, (mix, mask) in datasets().items():
        x_star = mix.sample(1, torch.Generator().manual_seed(1))[0]
        A = torch.eye(mix.dim, dtype=F64)[mask]
        y = A @ x_star
        post = mix.posterior(y, A, 0.0)
        ref = post.sample(N, torch.Generator().manual_seed(2))
        sc = scales(post, mix)
        floor = energy_distance(post.sample(N, torch.Generator().manual_seed(3)), ref, sc)
        x_known = x_star.expand(N, -1).clone()
        for pname in PROCESSES:
            model = exact(mix, pname)

            def score(x: torch.Tensor, sc: torch.Tensor = sc, ref: torch.Tensor = ref) -> float:
                return energy_distance(x, ref, sc)

            big = dname != "mix64d" or pname == "vp_linear"  # 1000 calls on 64-D: VP linear
            for budget in (*BUDGETS, 1000) if big else BUDGETS:
                cells: dict[str, tuple[float, int]] = {}
                plans: dict[str, tuple[posterior.PosteriorMethod, int]] = {}
                if budget in BUDGETS:
                    rp = posterior.RePaint(jump_length=JUMP, num_resample=PASSES)
                    plans["repaint"] = (rp, most_steps(rp.calls, budget))
                    plans["dps"] = (posterior.DPS(), budget // 2)
                    plans["mmps"] = (posterior.MMPS(), budget // 3)
                k, steps = SMC_PLAN[budget]
                plans["mcgdiff"] = (posterior.MCGDiff(num_particles=k), steps)
                for name, (method, steps) in plans.items():
                    x = model.inpaint(
                        x_known, mask, steps, method=method,
                        generator=torch.Generator().manual_seed(4),
                    )  # fmt: skip
                    cells[name] = (score(x), method.calls(steps))
                if budget in BUDGETS and pname.startswith("vp"):
                    steps = most_steps(repaint_calls_diffusers, budget)
                    x = diffusers_repaint(model, x_known, mask, steps, 5)
                    cells["diffusers_repaint"] = (score(x), repaint_calls_diffusers(steps))
                rows.append(
                    {"dataset": dname, "process": pname, "budget": budget, "floor": floor, **cells}
                )
                print(
                    dname, pname, budget, {k: round(v[0], 4) for k, v in cells.items()}, flush=True
                )
    return rows, time.perf_counter() - start


METHODS = ["repaint", "dps", "mmps", "mcgdiff", "diffusers_repaint"]


def table(rows: list[dict[str, Any]]) -> str:
    head = "| dataset | process | calls | floor | " + " | ".join(METHODS) + " | best / diffusers |"
    lines = [head, "|" + "---|" * (len(METHODS) + 5)]
    for r in rows:
        if r["budget"] == 1000:
            continue
        cells = []
        for m in METHODS:
            if m in r:
                d, c = r[m]
                cells.append(f"{d:.4f}" + (f" ({c})" if c != r["budget"] else ""))
            else:
                cells.append("-")
        best = min(r[m][0] for m in METHODS[:4] if m in r)
        ratio = f"{best / r['diffusers_repaint'][0]:.2f}" if "diffusers_repaint" in r else "-"
        lines.append(
            f"| {r['dataset']} | {r['process']} | {r['budget']} | {r['floor']:.4f} | "
            + " | ".join(cells)
            + f" | {ratio} |"
        )
    return "\n".join(lines)


def smc_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| dataset | process | mcgdiff (20 x 50) | floor | ratio to floor |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if r["budget"] != 1000:
            continue
        d = r["mcgdiff"][0]
        lines.append(
            f"| {r['dataset']} | {r['process']} | {d:.4f} | {r['floor']:.4f} | "
            f"{d / r['floor']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="target_type='pred_eps'")  # exact denoisers
    rows, seconds = run()
    text = (
        "# Posterior sampling quality (inpainting, exact mixture posteriors)\n\n"
        "Generated by `benchmarks/posterior_quality.py` (see its docstring for the protocol).\n"
        "Energy distance (V-statistic, n = 2000, coordinates standardised by the exact "
        "posterior's stds) to exact posterior draws; lower is better, the floor is two exact "
        "draws. A cell's network calls per sample are shown in brackets where they fall short "
        "of the budget. `best / diffusers`: tinydiff's best method over diffusers' "
        "RePaintScheduler at the same budget (goal <= 0.5).\n\n"
        + table(rows)
        + "\n\n## Sequential Monte Carlo at 1000 calls per sample (goal: within 2x the floor)\n\n"
        + smc_table(rows)
        + f"\n\nTotal time: {seconds:.0f} s on one CPU thread.\n"
    )
    print(text)
    OUT.mkdir(exist_ok=True)
    (OUT / "posterior_quality.md").write_text(text)


if __name__ == "__main__":
    main()
