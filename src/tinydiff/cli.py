"""The ``tinydiff`` command line: ``tinydiff demo`` trains a model on a 2D toy set.

Examples::

    tinydiff demo                                  # swiss roll, writes demo_out/
    tinydiff demo --dataset eight_gaussians --steps 2000 --out runs/8g --seed 1
    python -m tinydiff demo --help
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tinydiff._version import __version__
from tinydiff.datasets import TOY_DATASETS, make_toy

__all__ = ["SCHEDULES", "main", "run_demo"]

#: ``--schedule`` choices: the process and the target that suits it (training times follow
#: the process's default: integers for cosine, logit-normal for rectified flow, log-normal
#: in sigma for EDM)
SCHEDULES: dict[str, dict[str, Any]] = {
    "cosine": {"noise_schedule_type": "cosine", "target_type": "pred_v"},
    "rectified_flow": {"noise_schedule_type": "rectified_flow", "target_type": "pred_velocity"},
    "edm": {"noise_schedule_type": "edm", "target_type": "edm"},
}


def run_demo(
    dataset: str = "swiss_roll",
    steps: int = 3000,
    out: str | Path = "demo_out",
    seed: int = 0,
    *,
    sampler: str = "dpmpp_2m",
    sampling_steps: int = 50,
    schedule: str = "cosine",
    snapshots: int = 12,
    num_samples: int = 2000,
    progress: bool = True,
) -> dict[str, Any]:
    """Train an MLP diffusion model on a 2D toy set and write pictures of its samples.

    Writes ``samples.png`` (held-out data beside samples of the trained and the untrained
    model) and ``training.gif`` (samples from fixed noise as training goes on) into ``out``.

    Args:
        dataset: one of :data:`tinydiff.datasets.TOY_DATASETS`.
        steps: optimizer steps.
        out: output directory (created).
        seed: seeds data, initialisation and sampling.
        sampler: sampler used for the pictures and the score.
        sampling_steps: sampling steps for the pictures and the score.
        schedule: a key of :data:`SCHEDULES` (the process and its target).
        snapshots: number of GIF frames.
        num_samples: samples drawn for the score and the pictures.
        progress: show tqdm progress bars.

    Returns:
        dict with ``sw_trained``, ``sw_untrained`` (sliced Wasserstein distances to held-out
        data), ``seconds`` and the output ``paths``.
    """
    from tinydiff import DiffusionModel, DiffusionModelConfig, Trainer, warmup_cosine
    from tinydiff.metrics import sliced_wasserstein
    from tinydiff.nn import MLP
    from tinydiff.plotting import save_gif, save_scatter_png, scatter_frame

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    torch.manual_seed(seed)
    train = make_toy(dataset, 20_000, torch.Generator().manual_seed(seed))
    held_out = make_toy(dataset, num_samples, torch.Generator().manual_seed(seed + 10_000))
    config = DiffusionModelConfig(
        input_shape=(2,),
        **SCHEDULES[schedule],
        sampler_type=sampler,
        timestep_spacing="trailing",
    )
    model = DiffusionModel(MLP(input_dim=2, hidden_dim=128, num_layers=3), config)
    model.enable_ema(decay=0.995)
    noise = torch.randn(num_samples, 2, generator=torch.Generator().manual_seed(seed + 1))
    noise = noise * model.process.prior_std()  # x_T's scale (1 except on EDM's VE path)

    def draw(use_ema: bool) -> torch.Tensor:
        model.eval()
        x = model.sample(num_samples, sampling_steps, init_noise=noise, use_ema=use_ema)
        model.train()
        return x

    def score(x: torch.Tensor) -> float:
        return sliced_wasserstein(x, held_out, generator=torch.Generator().manual_seed(seed))

    untrained = draw(use_ema=False)
    frames = [scatter_frame([("data", held_out), ("step 0", untrained)])]
    lim = None

    def snapshot(trainer: Any, step: int) -> None:
        frames.append(scatter_frame([("data", held_out), (f"step {step}", draw(True))], lim=lim))

    every = max(1, steps // max(1, snapshots))
    trainer = Trainer(
        model,
        train,
        batch_size=512,
        lr=2e-3,
        seed=seed,
        progress=progress,
        lr_scheduler=lambda opt: warmup_cosine(opt, min(200, steps // 10), steps),
        callbacks=[(every, snapshot)],
    )
    trainer.fit(steps)
    trained = draw(use_ema=True)
    if steps % every:
        snapshot(trainer, steps)
    paths = {
        "png": save_scatter_png(
            out_dir / "samples.png",
            [
                ("held-out data", held_out),
                ("untrained model", untrained),
                ("trained model", trained),
            ],
        ),
        "gif": save_gif(out_dir / "training.gif", frames),
    }
    return {
        "sw_trained": score(trained),
        "sw_untrained": score(untrained),
        "seconds": time.perf_counter() - start,
        "paths": paths,
    }


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinydiff", description="tinydiff command line")
    parser.add_argument("--version", action="version", version=f"tinydiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train on a 2D toy data set and write pictures of the samples",
        description="Train a small diffusion model on a 2D toy data set (about a minute on 2 "
        "CPU cores), write samples.png and training.gif, and print the sliced Wasserstein "
        "distance of its samples to held-out data beside that of an untrained model.",
    )
    demo.add_argument("--dataset", choices=sorted(TOY_DATASETS), default="swiss_roll")
    demo.add_argument("--steps", type=_positive_int, default=3000, help="training steps (3000)")
    demo.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--sampler", default="dpmpp_2m", help="sampler for the pictures")
    demo.add_argument("--sampling-steps", type=_positive_int, default=50)
    demo.add_argument(
        "--schedule",
        choices=sorted(SCHEDULES),
        default="cosine",
        help="the diffusion process: cosine VP (pred_v), rectified_flow (flow matching, "
        "velocity target) or edm (Karras et al. preconditioning)",
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tinydiff`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from tinydiff import samplers

        try:
            samplers.REGISTRY.canonical(args.sampler)
        except ValueError as err:
            raise SystemExit(f"tinydiff demo: {err}") from None
        # a 128-wide MLP gains nothing from intra-op threads, and on a busy machine OpenMP
        # threads that wait on each other make it many times slower
        torch.set_num_threads(1)
        result = run_demo(
            args.dataset,
            args.steps,
            args.out,
            args.seed,
            sampler=args.sampler,
            sampling_steps=args.sampling_steps,
            schedule=args.schedule,
            progress=not args.quiet,
        )
        print(f"dataset {args.dataset}: {args.steps} steps in {result['seconds']:.0f} s")
        print(
            f"sliced Wasserstein distance to held-out data: trained {result['sw_trained']:.4f}, "
            f"untrained {result['sw_untrained']:.4f} (lower is better)"
        )
        for kind, path in result["paths"].items():
            print(f"wrote {path} ({kind})")
    return 0
