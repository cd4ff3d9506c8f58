"""The demo command, toy data sets, the sliced Wasserstein metric and the plotting helpers."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinydiff.cli import main, run_demo
from tinydiff.datasets import TOY_DATASETS, make_toy
from tinydiff.metrics import sliced_wasserstein

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.mark.parametrize("name", sorted(TOY_DATASETS))
def test_toy_datasets_are_reproducible_and_unit_scaled(name: str) -> None:
    a = make_toy(name, 5000, torch.Generator().manual_seed(0))
    b = make_toy(name, 5000, torch.Generator().manual_seed(0))
    assert a.shape == (5000, 2) and torch.equal(a, b)
    assert 0.3 < a.std(0).min() and a.std(0).max() < 2.0 and a.mean(0).abs().max() < 0.6
    with pytest.raises(ValueError, match="unknown toy data set"):
        make_toy("spiral", 10)


def test_sliced_wasserstein_closed_form_for_shifted_gaussians() -> None:
    """For N(0, I) and N(m, I) in 2D, the projection on theta gives W2 = |theta . m|, so
    SW2^2 = E_theta (theta . m)^2 = |m|^2 / 2."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 2, generator=gen, dtype=torch.float64)
    m = torch.tensor([3.0, 4.0], dtype=torch.float64)
    y = torch.randn(4000, 2, generator=gen, dtype=torch.float64) + m
    sw = sliced_wasserstein(x, y, num_projections=2000, generator=gen)
    assert sw == pytest.approx(5.0 / math.sqrt(2), rel=0.05)
    assert sliced_wasserstein(x, x.clone()) == 0.0
    with pytest.raises(ValueError, match="event shapes differ"):
        sliced_wasserstein(x, torch.randn(5, 3))


def test_run_demo_learns_and_writes_pictures(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    result = run_demo(
        "eight_gaussians",
        steps=400,
        out=tmp_path,
        seed=0,
        snapshots=3,
        num_samples=500,
        sampling_steps=20,
        progress=False,
    )
    assert result["sw_trained"] < 0.5 * result["sw_untrained"]
    png, gif = result["paths"]["png"], result["paths"]["gif"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(gif) as im:
        assert im.format == "GIF" and im.n_frames >= 4


def test_cli_help_and_errors(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    assert "--dataset" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--steps", "0"])
    assert exit_info.value.code == 2 and "must be an integer in 1.." in capsys.readouterr().err
    assert main(["demo", "--sampler", "nope"]) == 2
    assert "unknown sampler" in capsys.readouterr().err


def test_python_dash_m_tinydiff() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tinydiff", "--version"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert result.returncode == 0 and result.stdout.startswith("tinydiff ")


def test_meanflow_demo_trains_a_one_step_model_beside_a_diffusion_model(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    result = run_demo(
        "eight_gaussians",
        steps=300,
        out=tmp_path,
        seed=0,
        snapshots=2,
        num_samples=400,
        sampling_steps=10,
        progress=False,
        training_objective="meanflow",
    )
    # one jump of the trained MeanFlow model is far closer to the data than the untrained one
    assert result["sw_trained"] < 0.6 * result["sw_untrained"]  # measured 0.17 against 0.34
    assert result["sw_diffusion"] < 0.6 * result["sw_untrained"]
    assert result["paths"]["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="training_objective"):
        run_demo(out=tmp_path / "x", training_objective="consistency")
