"""Do the bare defaults train a good model? The bare config against the documented recipes.

A new user's first model is ``DiffusionModel(net, DiffusionModelConfig(input_shape=...))``
trained with the :class:`~tinydiff.Trainer`'s defaults. This script trains that and the
recipes the documentation and examples use, for the same number of steps, and scores the
samples:

* toy sets (eight Gaussians, two moons, swiss roll; ``tinydiff.nn.MLP(2)``, 1000 steps of
  batch 256, ``sample(2000, 20)``): the sliced Wasserstein distance to held-out data and the
  largest |sample| (against the data's own largest |x|);
* scikit-learn's 8x8 digits (an unconditional ``tinydiff.nn.UNet``, 1000 steps of batch 128,
  ``sample(898, 20)``): the Frechet distance between the penultimate-layer features of a
  small classifier trained on the real digits, for the samples against one half of the
  digits, beside the floor: the other half of the real digits against the same half.

Each row is a config (target, clipping), a training recipe (learning rate and its schedule,
EMA) and the samplers it is scored with. ``bare`` is the config with every default (whatever
this tinydiff's defaults are); ``bare_eps`` pins tinydiff 0.2's default target (pred_eps).

Run (single-threaded; a few minutes per part on one CPU core)::

    python benchmarks/defaults.py --part toy --seeds 0 1
    python benchmarks/defaults.py --part digits --rows bare,recipe,v_ema --base-channels 16
    python benchmarks/defaults.py --part toy --data eight_gaussians --steps 300 --seeds 0 1 2

``results/defaults.md`` holds the numbers behind the default target (the digits rows with
``--base-channels 16``, for time on shared cores).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_classifier import digits_data, feature_net

from tinydiff import DiffusionModel, DiffusionModelConfig, Trainer, warmup_cosine
from tinydiff.datasets import make_toy
from tinydiff.metrics import frechet_distance, sliced_wasserstein
from tinydiff.nn import MLP, UNet
from tinydiff.thresholding import X0Limit, x0_limit

TOY_SETS = ("eight_gaussians", "two_moons", "swiss_roll")
SAMPLERS = ("default", "ddim", "dpmpp_2m")


@dataclass(frozen=True)
class Row:
    """One configuration to train and score.

    Attributes:
        fields: config fields besides input_shape.
        lr: peak learning rate (None: the Trainer's default).
        warmup: warm-up steps of :func:`tinydiff.warmup_cosine` over the run, 0 for a
            constant LR (None: the Trainer's default schedule).
        ema: EMA decay, sampled with the EMA weights (None: no EMA).
        clip_x0, dynamic_threshold: the x0 limit used when sampling.
        doc: where the recipe comes from.
    """

    fields: dict[str, Any] = field(default_factory=dict)
    lr: float | None = None
    warmup: int | None = None
    ema: float | None = None
    clip_x0: Any = None
    dynamic_threshold: Any = None
    doc: str = ""


ROWS: dict[str, Row] = {
    "bare": Row(doc="every default"),
    "bare_eps": Row(
        {"target_type": "pred_eps"}, warmup=0, doc="tinydiff 0.2's defaults (pred_eps)"
    ),
    "eps_clip1": Row(
        {"target_type": "pred_eps"}, clip_x0=1.0, warmup=0, doc="pred_eps, clip_x0=(-1, 1)"
    ),
    "eps_clip3": Row(
        {"target_type": "pred_eps"}, clip_x0=3.0, warmup=0, doc="pred_eps, clip_x0=(-3, 3)"
    ),
    "eps_dynthr": Row(
        {"target_type": "pred_eps"},
        dynamic_threshold=(0.995, 2.0),
        warmup=0,
        doc="pred_eps, dynamic_threshold=(0.995, 2)",
    ),
    "x0": Row({"target_type": "pred_x_0"}, warmup=0, doc="pred_x_0"),
    # pred_eps on other VP tables: where does the 1/alpha(T) amplification start to hurt?
    "eps_linear": Row(
        {"target_type": "pred_eps", "noise_schedule_type": "linear"},
        warmup=0,
        doc="pred_eps, linear",
    ),
    "eps_sigmoid": Row(
        {"target_type": "pred_eps", "noise_schedule_type": "sigmoid"},
        warmup=0,
        doc="pred_eps, sigmoid",
    ),
    "eps_scaled": Row(
        {"target_type": "pred_eps", "noise_schedule_type": "scaled_linear"},
        warmup=0,
        doc="pred_eps, scaled_linear",
    ),
    "v": Row({"target_type": "pred_v"}, warmup=0, doc="pred_v (README, issue table)"),
    "v_ema": Row({"target_type": "pred_v"}, ema=0.999, warmup=0, doc="pred_v, EMA 0.999"),
    "v_wc": Row({"target_type": "pred_v"}, lr=2e-3, warmup=100, doc="pred_v, warmup-cosine 2e-3"),
    "v_const": Row({"target_type": "pred_v"}, warmup=0, doc="pred_v, constant LR 1e-3 (0.2's)"),
    "v_lr3e-4": Row({"target_type": "pred_v"}, lr=3e-4, warmup=0, doc="pred_v, constant 3e-4"),
    "v_lr5e-4": Row({"target_type": "pred_v"}, lr=5e-4, warmup=0, doc="pred_v, constant 5e-4"),
    "v_lr2e-3": Row({"target_type": "pred_v"}, lr=2e-3, warmup=0, doc="pred_v, constant 2e-3"),
    "bare_lr2e-3": Row(lr=2e-3, doc="every default but the peak LR, 2e-3"),
    "recipe": Row(
        {"target_type": "pred_v"},
        lr=2e-3,
        warmup=200,
        ema=0.999,
        doc="digits example: pred_v, warmup-cosine 2e-3 (200), EMA 0.999, dpmpp_2m",
    ),
    "recipe_swiss": Row(
        {"target_type": "pred_v"},
        lr=2e-3,
        warmup=100,
        ema=0.995,
        doc="swiss-roll example: pred_v, warmup-cosine 2e-3 (100), EMA 0.995",
    ),
}
TOY_ROWS = ("bare", "bare_eps", "eps_clip1", "eps_clip3", "eps_dynthr", "x0", "v", "v_ema")
TOY_ROWS += ("v_wc", "recipe", "recipe_swiss", "v_const")
DIGITS_ROWS = ("bare", "bare_eps", "eps_clip1", "recipe", "v_const")


class _Limited:
    """A denoiser whose x0 goes through ``limit`` (for a tinydiff whose ``sample()`` does not
    take ``clip_x0`` / ``dynamic_threshold`` yet); eps is left as computed."""

    def __init__(self, inner: Any, limit: X0Limit) -> None:
        self.inner, self.limit = inner, limit

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __call__(self, x: Tensor, point: Tensor, alpha_bar: Tensor | None = None) -> Any:
        pred = self.inner(x, point, alpha_bar)
        return pred._replace(x0=self.limit(pred.x0))


def sample(
    model: DiffusionModel, row: Row, bsz: int, steps: int, sampler: str, seed: int
) -> Tensor:
    """``model.sample(bsz, steps)`` with the row's x0 limit and EMA choice."""
    kwargs: dict[str, Any] = {"generator": torch.Generator().manual_seed(seed)}
    if sampler != "default":
        kwargs["sampler"] = sampler
    if row.ema is not None:
        kwargs["use_ema"] = True
    limit = x0_limit(row.clip_x0, row.dynamic_threshold)
    takes_limit = "clip_x0" in inspect.signature(model.sample).parameters
    if limit is not None and takes_limit:
        kwargs.update(clip_x0=row.clip_x0, dynamic_threshold=row.dynamic_threshold)
    elif limit is not None:
        original = model.denoiser

        def limited(**kw: Any) -> Any:
            return _Limited(original(**kw), limit)

        model.denoiser = limited  # type: ignore[method-assign]
    model.eval()
    try:
        with torch.no_grad():
            return model.sample(bsz, steps, **kwargs)
    finally:
        model.__dict__.pop("denoiser", None)
        model.train()


def train(
    net: nn.Module, shape: tuple[int, ...], row: Row, data: Tensor, steps: int, bsz: int, seed: int
) -> DiffusionModel:
    torch.manual_seed(seed)
    model = DiffusionModel(net, DiffusionModelConfig(input_shape=shape, **row.fields))
    if row.ema is not None:
        model.enable_ema(decay=row.ema)
    options: dict[str, Any] = {"batch_size": bsz, "seed": seed, "progress": False}
    if row.lr is not None:
        options["lr"] = row.lr
    if row.warmup == 0:
        options["lr_scheduler"] = None
    elif row.warmup is not None:
        warm = row.warmup
        options["lr_scheduler"] = lambda opt: warmup_cosine(opt, warm, steps)
    else:
        options["lr_scheduler"] = "default"
    Trainer(model, data, **options).fit(steps)
    return model


# -- toy sets ------------------------------------------------------------------------------------
def run_toy(
    rows: list[str], seeds: list[int], steps: int, sampling_steps: int, sets: list[str]
) -> list[dict]:
    results = []
    for name in sets:
        data = make_toy(name, 20_000, torch.Generator().manual_seed(0))
        held_out = make_toy(name, 2000, torch.Generator().manual_seed(10_000))
        other = make_toy(name, 2000, torch.Generator().manual_seed(20_000))
        sw_gen = torch.Generator()
        floor = sliced_wasserstein(other, held_out, generator=sw_gen.manual_seed(0))
        data_max = float(data.abs().max())
        print(f"\n{name}: data max |x| {data_max:.2f}, data-vs-data SW {floor:.4f}")
        for row_name in rows:
            row = ROWS[row_name]
            for seed in seeds:
                start = time.perf_counter()
                model = train(MLP(2), (2,), row, data, steps, 256, seed)
                cells = {}
                for sampler in SAMPLERS:
                    x = sample(model, row, 2000, sampling_steps, sampler, seed + 1)
                    ok = bool(torch.isfinite(x).all())
                    sw = (
                        sliced_wasserstein(x, held_out, generator=sw_gen.manual_seed(0))
                        if ok
                        else math.inf
                    )
                    cells[sampler] = {"sw": sw, "max_abs": float(x.abs().max()) if ok else math.inf}
                results.append(
                    {
                        "data": name,
                        "row": row_name,
                        "seed": seed,
                        "floor": floor,
                        "data_max": data_max,
                        "default_sampler": model.config.sampler_type,
                        "target": model.config.target_type,
                        "cells": cells,
                        "seconds": time.perf_counter() - start,
                    }
                )
                text = "  ".join(
                    f"{s} {c['sw']:.4g} (max {c['max_abs']:.3g})" for s, c in cells.items()
                )
                print(f"  {row_name:12s} seed {seed}: {text}", flush=True)
    return results


# -- digits ----------------------------------------------------------------------------------------
def frechet(a: Tensor, b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (n, d): the library's
    `tinydiff.metrics.frechet_distance` (float64)."""
    return frechet_distance(a, b)


def run_digits(
    rows: list[str],
    seeds: list[int],
    steps: int,
    sampling_steps: int,
    base_channels: int = 32,
) -> list[dict]:
    x, y = digits_data()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    half_a, half_b = x[perm[: len(x) // 2]], x[perm[len(x) // 2 :]]
    features = feature_net(x, y)
    ref = features(half_b)
    floor = frechet(features(half_a), ref)
    print(f"digits: real-vs-real feature distance (floor) {floor:.3f}")
    results = []
    for row_name in rows:
        row = ROWS[row_name]
        for seed in seeds:
            start = time.perf_counter()
            net = UNet(in_channels=1, base_channels=base_channels, channel_mults=(1, 2))
            model = train(net, (1, 8, 8), row, x, steps, 128, seed)
            cells = {}
            for sampler in SAMPLERS:
                s = sample(model, row, len(half_a), sampling_steps, sampler, seed + 1)
                ok = bool(torch.isfinite(s).all())
                fd = frechet(features(s), ref) if ok else math.inf
                cells[sampler] = {"fd": fd, "max_abs": float(s.abs().max()) if ok else math.inf}
            results.append(
                {
                    "data": "digits",
                    "row": row_name,
                    "seed": seed,
                    "floor": floor,
                    "data_max": 1.0,
                    "default_sampler": model.config.sampler_type,
                    "target": model.config.target_type,
                    "cells": cells,
                    "seconds": time.perf_counter() - start,
                }
            )
            text = "  ".join(
                f"{k} {c['fd']:.4g} (max {c['max_abs']:.3g})" for k, c in cells.items()
            )
            print(f"  {row_name:12s} seed {seed}: {text}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["toy", "digits"], default="toy")
    parser.add_argument("--rows", default=None, help="comma-separated row names (see ROWS)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--sampling-steps", type=int, default=20)
    parser.add_argument("--data", default=",".join(TOY_SETS), help="toy sets (comma-separated)")
    parser.add_argument(
        "--base-channels", type=int, default=32, help="digits UNet width (the example's: 32)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    default_rows = TOY_ROWS if args.part == "toy" else DIGITS_ROWS
    rows = args.rows.split(",") if args.rows else list(default_rows)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {sorted(ROWS)}")
    if args.part == "toy":
        results = run_toy(rows, args.seeds, args.steps, args.sampling_steps, args.data.split(","))
    else:
        results = run_digits(rows, args.seeds, args.steps, args.sampling_steps, args.base_channels)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
