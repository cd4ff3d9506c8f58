"""Few-step models against the diffusion model, on data with exact samples.

The same network (``tinydiff.nn.MLP(2, 128, 3)``, plus the end-time embedding for the
flow-map model), the same data (a ring of 8 Gaussians, radius 1.5, std 0.1), the same path
(rectified flow, ``pred_velocity``) and batch size. Trained:

* the diffusion model, ``--steps`` Adam steps (``training_objective="diffusion"``);
* MeanFlow (``training_objective="meanflow"``), ``--steps`` and ``2 * --steps`` steps, its
  MLP with ``time_scale=0.1`` (``--time-scale``; see ``results/few_step.md``).

Scored by the energy distance (V-statistic, `tinydiff.metrics.energy_distance`, n = 4000
against 4000 held-out exact samples) and the sliced W2: MeanFlow at 1 and 2 network calls
(sampler ``flow_map``), the diffusion model at 2, 4 and 10 calls with the best of tinydiff's
deterministic samplers at each budget (``euler``, ``dpmpp_2m``, ``dpmpp_3m``, ``unipc``,
default spacings), beside the floor (two independent exact draws). Goals (issue 22): 1 step
at most 0.5x the diffusion model's 2-call distance, 2 steps at most its 4-call distance.

Run (single-threaded; about 10 minutes on one shared CPU core at the default 2000 steps)::

    python benchmarks/few_step.py --steps 2000 --seed 0
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch

from tinydiff import DiffusionModel
from tinydiff.metrics import energy_distance, sliced_wasserstein
from tinydiff.nn import MLP
from tinydiff.testing import GaussianMixture

RING8 = GaussianMixture(
    [[1.5 * math.cos(k * math.pi / 4), 1.5 * math.sin(k * math.pi / 4)] for k in range(8)], 0.1
)
PATH = {"noise_schedule_type": "rectified_flow", "target_type": "pred_velocity"}
DIFFUSION_SAMPLERS = ("euler", "dpmpp_2m", "dpmpp_3m", "unipc")
N = 4000


def train(model: DiffusionModel, steps: int, bsz: int, lr: float, seed: int) -> float:
    """Adam with a cosine decay; returns the wall time in seconds."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    start = time.perf_counter()
    for _ in range(steps):
        loss = model.loss(RING8.sample(bsz, generator=g).float(), generator=g).mean()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--bsz", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--flow-map-fraction", type=float, default=0.25, help="MeanFlow's share of r < t"
    )
    parser.add_argument(
        "--time-scale", type=float, default=0.1, help="the MeanFlow MLP's time_scale"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)

    g = torch.Generator().manual_seed(1000 + args.seed)
    ref = RING8.sample(N, generator=g).float()
    floor = score(RING8.sample(N, generator=g).float(), ref)
    rows: list[tuple[str, int, dict[str, float], str, float]] = []

    torch.manual_seed(args.seed)
    diffusion = DiffusionModel(MLP(2, 128, 3), input_shape=(2,), **PATH)
    wall = train(diffusion, args.steps, args.bsz, args.lr, args.seed)
    diffusion.eval()
    for nfe in (2, 4, 10):
        best: tuple[dict[str, float], str] | None = None
        for name in DIFFUSION_SAMPLERS:
            gen = torch.Generator().manual_seed(7)
            s = score(diffusion.sample(N, nfe, sampler=name, generator=gen), ref)
            if best is None or s["energy"] < best[0]["energy"]:
                best = (s, name)
        assert best is not None
        rows.append((f"diffusion, {args.steps} steps", nfe, best[0], best[1], wall))

    meanflow: dict[int, Any] = {}
    for mult in (1, 2):
        steps = mult * args.steps
        torch.manual_seed(args.seed)
        model = DiffusionModel(
            MLP(2, 128, 3, end_time=True, time_scale=args.time_scale),
            input_shape=(2,),
            **PATH,
            training_objective="meanflow",
            training_objective_kwargs={"flow_map_fraction": args.flow_map_fraction},
        )
        wall = train(model, steps, args.bsz, args.lr, args.seed)
        model.eval()
        meanflow[mult] = model
        for nfe in (1, 2):
            gen = torch.Generator().manual_seed(7)
            s = score(model.sample(N, nfe, generator=gen), ref)
            rows.append((f"meanflow, {steps} steps", nfe, s, "flow_map", wall))

    print(f"\nring of 8 Gaussians, n = {N} vs {N} held-out exact samples, seed {args.seed}")
    print(f"floor (two exact draws): energy {floor['energy']:.5f}, sw2 {floor['sw2']:.4f}\n")
    print("| model | network calls | energy distance | sliced W2 | sampler | train wall (s) |")
    print("|---|---|---|---|---|---|")
    for name, nfe, s, sampler, wall in rows:
        print(f"| {name} | {nfe} | {s['energy']:.5f} | {s['sw2']:.4f} | {sampler} | {wall:.1f} |")
    d = {nfe: s["energy"] for name, nfe, s, _, _ in rows if name.startswith("diffusion")}
    for name, nfe, s, _, _ in rows:
        if name.startswith("meanflow"):
            goal = 0.5 * d[2] if nfe == 1 else d[4]
            verdict = "met" if s["energy"] <= goal else "missed"
            print(f"goal {name}, {nfe} call(s): {s['energy']:.5f} <= {goal:.5f}: {verdict}")
    print(f"1-step against the diffusion model's 10 calls: {d[10]:.5f}")


if __name__ == "__main__":
    main()
