"""Few-step digits: a guided MeanFlow model at 1 and 2 steps against the guided diffusion
model of ``examples/digits_cfg.py`` at 10 and 50 steps.

The same network (``tinydiff.nn.UNet(1, 32, (1, 2), num_classes=10)``, plus
``end_time=True, time_scale=0.1`` for MeanFlow), the same data (half of scikit-learn's 8x8
digits; the other half is held out as the reference), the same training recipe (the
`Trainer`'s defaults: batch 128, warm-up and cosine decay from 2e-3, EMA 0.999, sampled
with the EMA weights), ``cond_drop_prob=0.1``. Trained:

* ``diffusion``: the example's model (the cosine table, ``pred_v``), ``--steps`` steps,
  sampled with classifier-free guidance at w = 1 and w = ``--omega`` (``ddim``, the
  example's sampler, and ``dpmpp_2m``) at 10 and 50 steps;
* ``meanflow_equal`` / ``meanflow_twice``: ``training_objective="meanflow"`` on rectified
  flow with the guidance folded into training
  (``training_objective_kwargs={"guidance_scale": omega}``), ``--steps`` and
  ``2 * --steps`` steps, sampled with the label and no sampling-time guidance (``flow_map``,
  1 and 2 network calls);
* ``meanflow_unguided``: the same with ``guidance_scale=1`` (the conditional model, no
  guidance), ``--steps`` steps: what the folded-in guidance changes;
* ``consistency_tuned``: the ``diffusion`` row's model (same seed, its EMA weights) tuned
  ``--steps // 2`` more steps with ``tinydiff.objectives.consistency_tuning`` (ECT's
  finite-difference form, 4 stages, lr 1e-3), sampled with the label and no guidance
  (``consistency``, 1 and 2 calls); its steps and wall time are the total.

Scored with the small digits classifier of ``digits_classifier.py`` (trained on all the real
digits): the Frechet distance of its penultimate features (`tinydiff.metrics.fid`) between
``--per-class`` samples of each digit and the held-out half, and the fraction of samples it
reads as the requested digit; beside the floor (the training half against the held-out
half). Network calls per sample count the guided batch of 2 rows as 2.

Run (one thread, niced, on a shared machine; the rows may run in separate processes,
each merges its results into ``results/few_step_digits.json`` and rewrites the table)::

    python benchmarks/few_step_digits.py --steps 1500 --rows diffusion,meanflow_equal
    python benchmarks/few_step_digits.py --steps 1500 --rows meanflow_twice
"""

from __future__ import annotations

import argparse
import fcntl
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_classifier import digits_data, train_classifier

from tinydiff import DiffusionModel, Trainer, objectives
from tinydiff.metrics import fid
from tinydiff.nn import UNet

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = ("diffusion", "meanflow_equal", "meanflow_twice", "meanflow_unguided", "consistency_tuned")
READING = "## Reading"  # a hand-written section after the tables, kept when regenerating
RF = {"noise_schedule_type": "rectified_flow", "target_type": "pred_velocity"}


def split() -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(train images, labels, held-out images, labels, all images, labels)."""
    x, y = digits_data()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, held = perm[: len(x) // 2], perm[len(x) // 2 :]
    return x[train], y[train], x[held], y[held], x, y


def build(row: str, omega: float, base_channels: int) -> DiffusionModel:
    torch.manual_seed(0)
    if row in ("diffusion", "consistency_tuned"):
        net = UNet(1, base_channels, (1, 2), num_classes=10)
        return DiffusionModel(net, input_shape=(1, 8, 8), cond_drop_prob=0.1)
    net = UNet(1, base_channels, (1, 2), num_classes=10, end_time=True, time_scale=0.1)
    return DiffusionModel(
        net,
        input_shape=(1, 8, 8),
        cond_drop_prob=0.1,
        training_objective="meanflow",
        training_objective_kwargs={"guidance_scale": 1.0 if row == "meanflow_unguided" else omega},
        **RF,
    )


def run_row(row: str, args: argparse.Namespace) -> dict[str, Any]:
    x_train, y_train, x_held, y_held, x_all, y_all = split()
    body, head = train_classifier(x_all, y_all)
    with torch.no_grad():
        held_accuracy = float((head(body(x_held)).argmax(1) == y_held).double().mean())
    floor = {"fd": fid(x_train, x_held, body), "accuracy": held_accuracy}
    steps = 2 * args.steps if row == "meanflow_twice" else args.steps
    model = build(row, args.omega, args.base_channels)
    model.enable_ema(decay=0.999)
    trainer = Trainer(model, x_train, cond=y_train, batch_size=128, lr_scheduler="warmup_cosine")
    start = time.perf_counter()
    history = trainer.fit(steps)
    seconds = time.perf_counter() - start
    print(f"{row}: {steps} steps in {seconds:.0f} s, final loss {sum(history[-100:]) / 100:.4f}")
    if row == "consistency_tuned":  # the diffusion row's model (same seed), tuned on top
        tune = max(1, args.steps // 2)
        model = objectives.consistency_tuning(model, use_ema=True, stage_steps=max(1, tune // 4))
        trainer = Trainer(
            model, x_train, cond=y_train, batch_size=128, lr=1e-3, lr_scheduler="warmup_cosine"
        )
        start = time.perf_counter()
        history = trainer.fit(tune)
        tune_seconds = time.perf_counter() - start
        print(f"  tuned {tune} steps in {tune_seconds:.0f} s, loss {sum(history[-50:]) / 50:.4g}")
        steps, seconds = steps + tune, seconds + tune_seconds
    model.eval()
    labels = torch.arange(10).repeat_interleave(args.per_class)
    noise = torch.randn(len(labels), 1, 8, 8, generator=torch.Generator().manual_seed(1))

    def score(samples: Tensor) -> dict[str, float]:
        images = samples.clamp(-1, 1)
        with torch.no_grad():
            accuracy = float((head(body(images)).argmax(1) == labels).double().mean())
        return {"fd": fid(images, x_held, body), "accuracy": accuracy}

    cells: dict[str, dict[str, float]] = {}
    if row == "diffusion":
        for w in (1.0, args.omega):
            for sampler in ("ddim", "dpmpp_2m"):
                for n in (10, 50):
                    out = model.sample(
                        len(labels),
                        n,
                        sampler=sampler,
                        init_noise=noise,
                        cond={"class_labels": labels},
                        guidance_scale=w,
                        use_ema=True,
                    )
                    key = f"{sampler} {n} steps, w = {w:g}"
                    cells[key] = {**score(out), "calls": n * (2 if w != 1 else 1)}
                    print(f"  {key}: {cells[key]}", flush=True)
    else:
        tuned = row == "consistency_tuned"  # no EMA of its own: sampled with its weights
        for n in (1, 2):
            out = model.sample(
                len(labels), n, init_noise=noise, cond={"class_labels": labels}, use_ema=not tuned
            )
            key = f"{'consistency' if tuned else 'flow_map'} {n} step{'s' if n > 1 else ''}"
            cells[key] = {**score(out), "calls": n}
            print(f"  {key}: {cells[key]}", flush=True)
    return {"steps": steps, "seconds": seconds, "cells": cells, "floor": floor}


def report(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        "# Few-step digits: guided MeanFlow against the guided diffusion model",
        "",
        f"Generated by `benchmarks/few_step_digits.py --steps {meta['steps']}` "
        f"(`--per-class {meta['per_class']} --omega {meta['omega']:g} --base-channels "
        f"{meta['base_channels']}`), one torch thread, niced, on a shared 2-core CPU machine, "
        "seed 0. UNet(1, 32, (1, 2), num_classes=10) as in examples/digits_cfg.py (MeanFlow: "
        "plus end_time=True, time_scale=0.1), trained on half of the digits (898) with the "
        "Trainer's defaults (batch 128, warm-up + cosine from 2e-3, EMA 0.999), "
        "cond_drop_prob=0.1. MeanFlow folds guidance into training (guidance_scale = "
        f"{meta['omega']:g}; meanflow_unguided: 1) and samples with the label only. The "
        "diffusion model samples with classifier-free guidance at w (tinydiff's "
        "convention: w = 1 conditional), the same scale convention as guidance_scale.",
        "",
        "FD: Frechet distance of the benchmark classifier's penultimate features "
        f"(`tinydiff.metrics.fid`), {10 * meta['per_class']} samples against the 899 held-out "
        "digits. Accuracy: the fraction the classifier reads as the requested digit. Calls: "
        "network evaluations per sample (a guided step counts 2).",
        "",
    ]
    floors = [results[r]["floor"] for r in ROWS if r in results]
    if floors:
        f = floors[0]
        lines += [
            f"Floor (the 898 training digits against the held-out 899): FD {f['fd']:.3f}; "
            f"the classifier reads {f['accuracy']:.3f} of the held-out digits right (it was "
            "trained on all digits).",
            "",
        ]
    lines += [
        "| model | training steps | training wall time | sampling | calls | FD | accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        if row not in results:
            continue
        r = results[row]
        for key, c in r["cells"].items():
            lines.append(
                f"| {row} | {r['steps']} | {r['seconds']:.0f} s | {key} | {c['calls']} | "
                f"{c['fd']:.3f} | {c['accuracy']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def _write_report(path: Path, results: dict[str, Any]) -> None:
    """The generated tables, keeping a hand-written "## Reading" section of the old file."""
    old = path.read_text() if path.exists() else ""
    notes = old[old.index(READING) :] if READING in old else ""
    path.write_text(report(results) + ("\n" + notes if notes else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--per-class", type=int, default=90)
    parser.add_argument("--omega", type=float, default=3.0)
    parser.add_argument("--base-channels", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the json and md go")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the md from the json, train nothing"
    )
    args = parser.parse_args()
    if args.report_only:
        results = json.loads((args.out / "few_step_digits.json").read_text())
        _write_report(args.out / "few_step_digits.md", results)
        return
    torch.set_num_threads(args.threads)
    rows = [r for r in args.rows.split(",") if r]
    unknown = set(rows) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {', '.join(ROWS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "few_step_digits.json"
    for row in rows:
        out = run_row(row, args)
        with (args.out / ".few_step_digits.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # rows may finish at once in separate processes
            results = json.loads(path.read_text()) if path.exists() else {}
            meta = {k: getattr(args, k) for k in ("steps", "per_class", "omega", "base_channels")}
            if results.get("meta", meta) != meta:
                results = {}  # another size: start afresh
            results.update({"meta": meta, row: out})
            path.write_text(json.dumps(results, indent=1) + "\n")
            _write_report(args.out / "few_step_digits.md", results)
        print(report(results))


if __name__ == "__main__":
    main()
