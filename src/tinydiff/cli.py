"""The ``tinydiff`` command line: ``tinydiff demo`` trains a model on a 2D toy set.

Examples::

    tinydiff demo                                  # swiss roll, writes demo_out/
    tinydiff demo --dataset eight_gaussians --steps 2000 --out runs/8g --seed 1
    python -m tinydiff demo --help
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch

from tinydiff._version import __version__
from tinydiff.datasets import TOY_DATASETS, make_toy

if TYPE_CHECKING:
    from tinydiff.model import DiffusionModel
    from tinydiff.trainer import Callback, Trainer

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
    schedule: str | None = None,
    snapshots: int = 12,
    num_samples: int = 2000,
    progress: bool = True,
    training_objective: str = "diffusion",
) -> dict[str, Any]:
    """Train an MLP diffusion model on a 2D toy set and write pictures of its samples.

    Writes ``samples.png`` (held-out data beside samples of the trained and the untrained
    model) and ``training.gif`` (samples from fixed noise as training goes on) into ``out``.

    With ``training_objective="meanflow"`` the model is a two-time MeanFlow network
    (`tinydiff.objectives`, the velocity target on the schedule's path) sampled in one jump,
    and a diffusion model is trained beside it for the same steps: ``samples.png`` shows the
    data, the diffusion model's samples (``sampler``, ``sampling_steps``) and MeanFlow's
    one-step samples; the GIF shows MeanFlow's one-step samples as training goes on.

    Args:
        dataset: one of :data:`tinydiff.datasets.TOY_DATASETS`.
        steps: optimizer steps.
        out: output directory (created).
        seed: seeds data, initialisation and sampling.
        sampler: sampler used for the pictures and the score.
        sampling_steps: sampling steps for the pictures and the score.
        schedule: a key of :data:`SCHEDULES` (the process and its target); default
            ``"cosine"``, and ``"rectified_flow"`` (MeanFlow's path) for ``"meanflow"``.
        snapshots: number of GIF frames.
        num_samples: samples drawn for the score and the pictures.
        progress: show tqdm progress bars.
        training_objective: ``"diffusion"`` or ``"meanflow"`` (a one-step model beside a
            diffusion model; about twice the time).

    Returns:
        dict with ``sw_trained``, ``sw_untrained`` (sliced Wasserstein distances to held-out
        data; MeanFlow's one-step samples with ``"meanflow"``), ``seconds`` and the output
        ``paths``; with ``"meanflow"`` also ``sw_diffusion`` (the diffusion model's samples).
    """
    from tinydiff.metrics import sliced_wasserstein
    from tinydiff.plotting import axis_limit, scatter_frame

    if training_objective not in ("diffusion", "meanflow"):
        raise ValueError(
            f"training_objective must be 'diffusion' or 'meanflow', got {training_objective!r}"
        )
    meanflow = training_objective == "meanflow"
    if schedule is None:
        schedule = "rectified_flow" if meanflow else "cosine"
    _check_demo_arguments(steps, sampling_steps, snapshots, num_samples, schedule)
    out_dir = prepare_out_dir(out)
    start = time.perf_counter()
    torch.manual_seed(seed)
    train = make_toy(dataset, 20_000, torch.Generator().manual_seed(seed))
    held_out = make_toy(dataset, num_samples, torch.Generator().manual_seed(seed + 10_000))
    model = _meanflow_model(schedule) if meanflow else _demo_model(schedule, sampler)
    noise = torch.randn(num_samples, 2, generator=torch.Generator().manual_seed(seed + 1))
    noise = noise * model.process.prior_std()  # x_T's scale (1 except on EDM's VE path)
    jumps = 1 if meanflow else sampling_steps

    def draw(use_ema: bool) -> torch.Tensor:
        model.eval()
        x = model.sample(num_samples, jumps, init_noise=noise, use_ema=use_ema)
        model.train()
        return x

    def score(x: torch.Tensor) -> float:
        return sliced_wasserstein(x, held_out, generator=torch.Generator().manual_seed(seed))

    untrained = draw(use_ema=False)
    lim = axis_limit(held_out)  # fixed axes for every frame of the GIF, set by the data
    frames = [scatter_frame([("data", held_out), ("step 0", untrained)], lim=lim)]

    def snapshot(trainer: Any, step: int) -> None:
        frames.append(scatter_frame([("data", held_out), (f"step {step}", draw(True))], lim=lim))

    every = max(1, steps // max(1, snapshots))
    trainer = _demo_trainer(model, train, seed, progress, [(every, snapshot)])
    trainer.fit(steps)
    trained = draw(use_ema=True)
    if steps % every:
        snapshot(trainer, steps)
    result: dict[str, Any] = {"sw_trained": score(trained), "sw_untrained": score(untrained)}
    panels = [("untrained model", untrained), ("trained model", trained)]
    if meanflow:  # the diffusion model of the same steps, beside MeanFlow's one jump
        torch.manual_seed(seed)
        diffusion = _demo_model(schedule, sampler)
        _demo_trainer(diffusion, train, seed, progress, []).fit(steps)
        diffusion.eval()
        baseline = diffusion.sample(num_samples, sampling_steps, init_noise=noise, use_ema=True)
        result["sw_diffusion"] = score(baseline)
        panels = [(f"diffusion, {sampling_steps} steps", baseline), ("MeanFlow, 1 step", trained)]
    result["paths"] = _write_pictures(out_dir, held_out, panels, frames)
    result["seconds"] = time.perf_counter() - start
    return result


def _check_demo_arguments(
    steps: int, sampling_steps: int, snapshots: int, num_samples: int, schedule: str
) -> None:
    """The numbers and the schedule of `run_demo`, before anything is written."""
    _check_count("steps", steps, MAX_STEPS)
    _check_count("sampling_steps", sampling_steps, NUM_TIMESTEPS)
    _check_count("snapshots", snapshots, MAX_STEPS)
    _check_count("num_samples", num_samples, 10**7)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")


def _demo_model(schedule: str, sampler: str) -> DiffusionModel:
    """The demo's untrained MLP diffusion model (initialised from torch's global RNG)."""
    from tinydiff import DiffusionModel, DiffusionModelConfig
    from tinydiff.nn import MLP

    config = DiffusionModelConfig(
        input_shape=(2,),
        num_timesteps=NUM_TIMESTEPS,
        **SCHEDULES[schedule],
        sampler_type=sampler,
        timestep_spacing="trailing",
    )
    model = DiffusionModel(MLP(input_dim=2, hidden_dim=128, num_layers=3), config)
    model.enable_ema(decay=0.995)
    return model


def _meanflow_model(schedule: str) -> DiffusionModel:
    """The demo's untrained MeanFlow model: a two-time MLP (time scale 0.1, measured in
    `benchmarks/few_step.py`) with the velocity target on the schedule's path."""
    from tinydiff import DiffusionModel, DiffusionModelConfig
    from tinydiff.nn import MLP

    config = DiffusionModelConfig(
        input_shape=(2,),
        num_timesteps=NUM_TIMESTEPS,
        noise_schedule_type=SCHEDULES[schedule]["noise_schedule_type"],
        target_type="pred_velocity",
        training_objective="meanflow",
    )
    net = MLP(input_dim=2, hidden_dim=128, num_layers=3, end_time=True, time_scale=0.1)
    model = DiffusionModel(net, config)
    model.enable_ema(decay=0.995)
    return model


def _demo_trainer(
    model: DiffusionModel,
    train: torch.Tensor,
    seed: int,
    progress: bool,
    callbacks: list[tuple[int, Callback]],
) -> Trainer:
    """The demo's trainer: AdamW with warm-up and cosine decay over the steps of ``fit``."""
    from tinydiff import Trainer

    return Trainer(
        model,
        train,
        batch_size=512,
        seed=seed,
        progress=progress,
        lr_scheduler="warmup_cosine",  # peak 2e-3, planned over the steps of fit()
        callbacks=callbacks,
    )


def _write_pictures(
    out_dir: Path,
    held_out: torch.Tensor,
    panels: list[tuple[str, torch.Tensor]],
    frames: list[Any],
) -> dict[str, Path]:
    """Write ``samples.png`` (the data, then ``panels``) and ``training.gif`` into
    ``out_dir``; returns their paths."""
    from tinydiff.plotting import save_gif, save_scatter_png

    return {
        "png": save_scatter_png(out_dir / "samples.png", [("held-out data", held_out), *panels]),
        "gif": save_gif(out_dir / "training.gif", frames),
    }


#: the demo's diffusion steps T (sampling_steps can be at most this)
NUM_TIMESTEPS = 1000
MAX_STEPS = 10_000_000
OUTPUT_NAMES = ("samples.png", "training.gif")


def _check_count(name: str, value: object, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise ValueError(f"{name} must be an integer in 1..{high}, got {value!r}")


def prepare_out_dir(out: str | Path) -> Path:
    """Create the output folder and check that the demo's pictures can be written there.

    Raises:
        ValueError: ``out`` is a file, cannot be created or written, or a picture's path is
            taken by a folder; the message says which.
    """
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file, not a folder; pass a folder to write into")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as err:
        raise ValueError(
            f"--out {out_dir} cannot be created or written ({err.strerror or err}); pass a "
            "folder you can write to"
        ) from None
    for name in OUTPUT_NAMES:
        if (out_dir / name).is_dir():
            raise ValueError(
                f"{out_dir / name} is a folder, so the demo could not write its picture there; "
                "remove it or pass another --out"
            )
    return out_dir


def _int_in(low: int, high: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer in {low}..{high}, got {value}")
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tinydiff", description="tinydiff command line")
    parser.add_argument("--version", action="version", version=f"tinydiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo: argparse.ArgumentParser = sub.add_parser(
        "demo",
        help="train on a 2D toy data set and write pictures of the samples",
        description="Train a small diffusion model on a 2D toy data set (about a minute on 2 "
        "CPU cores), write samples.png and training.gif, and print the sliced Wasserstein "
        "distance of its samples to held-out data beside that of an untrained model.",
    )
    demo.add_argument("--dataset", choices=sorted(TOY_DATASETS), default="swiss_roll")
    demo.add_argument(
        "--steps", type=_int_in(1, MAX_STEPS), default=3000, help="training steps (3000)"
    )
    demo.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory")
    demo.add_argument("--seed", type=_int_in(0, 2**63 - 1), default=0)
    demo.add_argument("--sampler", default="dpmpp_2m", help="sampler for the pictures")
    demo.add_argument(
        "--sampling-steps",
        type=_int_in(1, NUM_TIMESTEPS),
        default=50,
        help=f"sampling steps for the pictures, at most T = {NUM_TIMESTEPS} (50)",
    )
    demo.add_argument(
        "--schedule",
        choices=sorted(SCHEDULES),
        default=None,
        help="the diffusion process: cosine VP (pred_v; the default), rectified_flow (flow "
        "matching, velocity target; the default with meanflow) or edm (Karras et al. "
        "preconditioning)",
    )
    demo.add_argument(
        "--training-objective",
        choices=("diffusion", "meanflow"),
        default="diffusion",
        help="meanflow: a one-step MeanFlow model, trained beside a diffusion model (about "
        "twice the time; the pictures show both)",
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _fail(message: str) -> int:
    print(f"tinydiff demo: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tinydiff`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from tinydiff import samplers

        try:
            samplers.REGISTRY.canonical(args.sampler)
            prepare_out_dir(args.out)
        except ValueError as err:
            return _fail(str(err))
        # a 128-wide MLP gains nothing from intra-op threads, and on a busy machine OpenMP
        # threads that wait on each other make it many times slower
        torch.set_num_threads(1)
        try:
            result = run_demo(
                args.dataset,
                args.steps,
                args.out,
                args.seed,
                sampler=args.sampler,
                sampling_steps=args.sampling_steps,
                schedule=args.schedule,
                progress=not args.quiet,
                training_objective=args.training_objective,
            )
        except OSError as err:  # e.g. the disk filled up while writing the pictures
            return _fail(f"cannot write the pictures: {err}")
        except ValueError as err:  # e.g. meanflow on a process it does not support
            return _fail(str(err))
        print(f"dataset {args.dataset}: {args.steps} steps in {result['seconds']:.0f} s")
        if "sw_diffusion" in result:
            print(
                "sliced Wasserstein distance to held-out data: MeanFlow, 1 step "
                f"{result['sw_trained']:.4f}; diffusion, {args.sampling_steps} steps "
                f"{result['sw_diffusion']:.4f}; untrained {result['sw_untrained']:.4f}"
            )
        else:
            print(
                "sliced Wasserstein distance to held-out data: trained "
                f"{result['sw_trained']:.4f}, untrained {result['sw_untrained']:.4f} "
                "(lower is better)"
            )
        for kind, path in result["paths"].items():
            print(f"wrote {path} ({kind})")
    return 0
