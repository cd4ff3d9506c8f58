"""Few-step models against the diffusion model, on data with exact samples.

The same network (``tinydiff.nn.MLP(d, 128, 3)``, plus the end-time embedding for the
MeanFlow model), the same data, the same path (rectified flow, ``pred_velocity``) and batch
size. Data sets (``--data``): ``ring`` (8 Gaussians on a circle of radius 1.5, std 0.1),
``two`` (two 2-d Gaussians of unequal weight and spread), ``8d`` (a mixture of 6 Gaussians
in 8 dimensions), or ``all``. Trained:

* the diffusion model, ``--steps`` Adam steps (``training_objective="diffusion"``);
* MeanFlow (``training_objective="meanflow"``), ``--steps`` and ``2 * --steps`` steps, its
  MLP with ``time_scale=0.1`` (``--time-scale``; see ``results/few_step.md``);
* the consistency-tuned model: the diffusion model above, tuned ``--tune-steps`` more steps
  with ``tinydiff.objectives.consistency_tuning``, once per form (``--tune-form``: ECT's
  finite-difference form and the tangent form), ECT's schedule over ``--tune-stages``
  stages; total steps = ``--steps + --tune-steps``.

Scored by the energy distance (V-statistic, `tinydiff.metrics.energy_distance`, n = 4000
against 4000 held-out exact samples) and the sliced W2: the flow-map models at 1 and 2
network calls (samplers ``flow_map`` and ``consistency``), the diffusion model at 2, 4 and
10 calls with the best (sampler, spacing) pair of tinydiff's deterministic samplers
(``euler``, ``dpmpp_2m``, ``dpmpp_3m``, ``unipc``, ``deis``) and every built-in spacing at
each budget, chosen on the scored samples themselves (so the baseline is, if anything,
optimistic), beside the floor (two independent
exact draws). Goals (issue 22), for the better of the two flow-map objectives: 1 step at most
0.5x the diffusion model's 2-call distance, 2 steps at most its 4-call distance.

Run (single-threaded; each data set about 10 minutes on one shared CPU core at 1000 steps)::

    python benchmarks/few_step.py --data all --steps 1000 --seed 0 --out few_step_run.md
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from typing import Any

import torch

from tinydiff import DiffusionModel, objectives, spacings
from tinydiff.metrics import energy_distance, sliced_wasserstein
from tinydiff.nn import MLP
from tinydiff.plotting import save_scatter_png
from tinydiff.testing import GaussianMixture


def _eight_d() -> GaussianMixture:
    g = torch.Generator().manual_seed(8)
    means = 1.5 * torch.randn(6, 8, generator=g, dtype=torch.float64)
    stds = 0.15 + 0.35 * torch.rand(6, generator=g, dtype=torch.float64)
    return GaussianMixture(means, stds, weights=[1, 2, 1, 2, 1, 1])


DATA = {
    "ring": GaussianMixture(
        [[1.5 * math.cos(k * math.pi / 4), 1.5 * math.sin(k * math.pi / 4)] for k in range(8)],
        0.1,
    ),
    "two": GaussianMixture([[-1.2, -0.4], [1.0, 0.8]], [0.25, 0.5], weights=[0.35, 0.65]),
    "8d": _eight_d(),
}
PATH = {"noise_schedule_type": "rectified_flow", "target_type": "pred_velocity"}
DIFFUSION_SAMPLERS = ("euler", "dpmpp_2m", "dpmpp_3m", "unipc", "deis")
N = 4000

Row = tuple[str, int, dict[str, float], str, str]


def train(
    model: DiffusionModel, data: GaussianMixture, steps: int, bsz: int, lr: float, seed: int
) -> float:
    """Adam with a cosine decay; returns the wall time in seconds. Objectives with a schedule
    over training (consistency) get the step."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    uses_step = model.objective.uses_step
    start = time.perf_counter()
    for step in range(steps):
        x = data.sample(bsz, generator=g).float()
        extra = {"step": step} if uses_step else {}
        loss = model.loss(x, generator=g, **extra).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return time.perf_counter() - start


def score(samples: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    return {
        "energy": energy_distance(samples, ref),
        "sw2": sliced_wasserstein(samples, ref, generator=g),
    }


def run(name: str, args: argparse.Namespace) -> list[str]:
    """Train and score every model on one data set; returns the Markdown lines."""
    data = DATA[name]
    dim = data.dim
    g = torch.Generator().manual_seed(1000 + args.seed)
    ref = data.sample(N, generator=g).float()
    floor = score(data.sample(N, generator=g).float(), ref)
    rows: list[Row] = []
    panels: list[tuple[str, torch.Tensor]] = [("exact", ref[:2000, :2])]

    torch.manual_seed(args.seed)
    net = MLP(
        dim,
        128,
        3,
        **({} if args.diffusion_time_scale == 1 else {"time_scale": args.diffusion_time_scale}),
    )
    diffusion = DiffusionModel(net, input_shape=(dim,), **PATH)
    wall = train(diffusion, data, args.steps, args.bsz, args.lr, args.seed)
    diffusion.eval()
    d_wall = f"{wall:.1f}"
    for nfe in (2, 4, 10):
        best: tuple[dict[str, float], str, torch.Tensor] | None = None
        for sampler, spacing in itertools.product(DIFFUSION_SAMPLERS, spacings.names()):
            gen = torch.Generator().manual_seed(7)
            x = diffusion.sample(N, nfe, sampler=sampler, timestep_spacing=spacing, generator=gen)
            s = score(x, ref)
            if best is None or s["energy"] < best[0]["energy"]:
                best = (s, f"{sampler}/{spacing}", x)
        assert best is not None
        rows.append((f"diffusion, {args.steps} steps", nfe, best[0], best[1], d_wall))
        if nfe in (2, 10):
            panels.append((f"diffusion {nfe} calls", best[2][:2000, :2]))
    gen = torch.Generator().manual_seed(7)
    s = score(diffusion.sample(N, 1, sampler="consistency", generator=gen), ref)
    rows.append((f"diffusion, {args.steps} steps (untuned)", 1, s, "consistency", d_wall))

    for mult in () if args.no_meanflow else (1, 2):
        steps = mult * args.steps
        torch.manual_seed(args.seed)
        model = DiffusionModel(
            MLP(dim, 128, 3, end_time=True, time_scale=args.time_scale),
            input_shape=(dim,),
            **PATH,
            training_objective="meanflow",
            training_objective_kwargs={"flow_map_fraction": args.flow_map_fraction},
        )
        wall = train(model, data, steps, args.bsz, args.lr, args.seed)
        model.eval()
        for nfe in (1, 2):
            gen = torch.Generator().manual_seed(7)
            x = model.sample(N, nfe, generator=gen)
            s = score(x, ref)
            rows.append((f"meanflow, {steps} steps", nfe, s, "flow_map", f"{wall:.1f}"))
            if mult == 2:
                panels.append((f"meanflow {nfe} step", x[:2000, :2]))

    for form in args.tune_form:
        options: dict[str, Any] = {"form": form}
        if form == "tangent":
            options["tangent_normalization"] = args.tangent_normalization
            lr = args.tangent_lr
        else:
            options["stage_steps"] = max(1, args.tune_steps // args.tune_stages)
            lr = args.tune_lr
        tuned = objectives.consistency_tuning(diffusion, **options)
        wall = train(tuned, data, args.tune_steps, args.bsz, lr, args.seed + 1)
        tuned.eval()
        total = args.steps + args.tune_steps
        label = f"consistency-tuned ({form}), {args.steps} + {args.tune_steps} = {total} steps"
        for nfe in (1, 2):
            gen = torch.Generator().manual_seed(7)
            x = tuned.sample(N, nfe, generator=gen)
            s = score(x, ref)
            rows.append((label, nfe, s, "consistency", f"{d_wall} + {wall:.1f}"))
            if form == args.tune_form[0]:
                panels.append((f"consistency {nfe} step", x[:2000, :2]))
    if args.plots:
        save_scatter_png(f"{args.plots}/few_step_{name}.png", panels)

    lines = [
        f"### {name} ({dim}-d, {data.num_components} components), seed {args.seed}, "
        f"{args.steps} steps",
        "",
        f"Floor (two exact draws): energy {floor['energy']:.5f}, sliced W2 {floor['sw2']:.4f}.",
        "",
        "| model | network calls | energy distance | sliced W2 | sampler | train wall (s) |",
        "|---|---|---|---|---|---|",
    ]
    for label_, nfe, s, sampler, wall_s in rows:
        lines.append(
            f"| {label_} | {nfe} | {s['energy']:.5f} | {s['sw2']:.4f} | {sampler} | {wall_s} |"
        )
    d = {nfe: s["energy"] for lab, nfe, s, _, _ in rows if lab == f"diffusion, {args.steps} steps"}
    lines.append("")
    flow = [(lab, nfe, s["energy"]) for lab, nfe, s, _, _ in rows if "diffusion" not in lab]
    for lab, nfe, e in flow:
        goal = 0.5 * d[2] if nfe == 1 else d[4]
        verdict = "met" if e <= goal else "missed"
        lines.append(f"- goal {lab}, {nfe} call(s): {e:.5f} <= {goal:.5f}: {verdict}")
    for nfe, goal, what in ((1, 0.5 * d[2], "0.5x 2 calls"), (2, d[4], "4 calls")):
        best_lab, _, best_e = min((r for r in flow if r[1] == nfe), key=lambda r: r[2])
        verdict = "met" if best_e <= goal else "missed"
        lines.append(
            f"- **best {nfe}-step** ({best_lab}): {best_e:.5f} vs diffusion {what} "
            f"{goal:.5f}: {verdict}"
        )
    best_one = min(e for _, nfe, e in flow if nfe == 1)
    lines.append(f"- best 1-step {best_one:.5f} against the diffusion model's 10 calls {d[10]:.5f}")
    lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--data", choices=(*DATA, "all"), default="all")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--bsz", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--flow-map-fraction", type=float, default=0.25, help="MeanFlow's share of r < t"
    )
    parser.add_argument(
        "--time-scale", type=float, default=0.1, help="the MeanFlow MLP's time_scale"
    )
    parser.add_argument(
        "--diffusion-time-scale",
        type=float,
        default=1.0,
        help="the diffusion MLP's time_scale (the tuned model keeps it)",
    )
    parser.add_argument("--no-meanflow", action="store_true", help="skip the MeanFlow models")
    parser.add_argument("--tune-steps", type=int, default=500, help="consistency tuning steps")
    parser.add_argument("--tune-lr", type=float, default=1e-3, help="finite-difference form")
    parser.add_argument("--tune-stages", type=int, default=4, help="ECT stages over the tuning run")
    parser.add_argument("--tangent-lr", type=float, default=3e-4, help="tangent form")
    parser.add_argument(
        "--tangent-normalization", type=float, default=None, help="sCM's c (tangent form)"
    )
    parser.add_argument(
        "--tune-form",
        choices=objectives.CONSISTENCY_FORMS,
        nargs="+",
        default=["finite_difference", "tangent"],
        help="one tuned model per form",
    )
    parser.add_argument("--out", help="also write the Markdown tables to this file")
    parser.add_argument(
        "--plots", help="a folder for few_step_<data>.png (samples; the first 2 coordinates)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = list(DATA) if args.data == "all" else [args.data]
    lines = [
        f"Command: `python benchmarks/few_step.py --data {args.data} --steps {args.steps} "
        f"--tune-steps {args.tune_steps} --tune-stages {args.tune_stages} --tune-lr "
        f"{args.tune_lr} --tangent-lr {args.tangent_lr} --tangent-normalization "
        f"{args.tangent_normalization} --diffusion-time-scale {args.diffusion_time_scale}"
        f"{' --no-meanflow' if args.no_meanflow else ''} --seed {args.seed}`",
        "",
    ]
    for name in names:
        part = run(name, args)
        print("\n".join(part), flush=True)
        lines += part
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
