"""Image grids and the demo GIF's fixed axes (tinydiff.plotting)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tinydiff import plotting

pytest.importorskip("PIL")


def test_image_grid_matches_a_hand_built_grid(tmp_path: Path) -> None:
    # three 1x2x2 images in [-1, 1], two per row, one pixel of padding at pad_value 1
    samples = torch.tensor(
        [
            [[[-1.0, 1.0], [0.0, 1.0]]],
            [[[1.0, 1.0], [-1.0, -1.0]]],
            [[[0.5, -0.5], [2.0, -3.0]]],  # out of range: clamped
        ]
    )
    a, b, c = 0, 255, 128  # -1, 1, 0 -> 0, 255, round(127.5) = 128
    p = 255  # padding
    q, r = round(0.75 * 255), round(0.25 * 255)  # 0.5 and -0.5
    expected = np.array(
        [
            [p, p, p, p, p, p, p],
            [p, a, b, p, b, b, p],
            [p, c, b, p, a, a, p],
            [p, p, p, p, p, p, p],
            [p, q, r, p, p, p, p],
            [p, b, a, p, p, p, p],
            [p, p, p, p, p, p, p],
        ],
        dtype=np.uint8,
    )
    path = tmp_path / "grid.png"
    image = plotting.image_grid(samples, nrow=2, path=path, padding=1, pad_value=1.0)
    assert image.mode == "L"
    np.testing.assert_array_equal(np.asarray(image), expected)
    from PIL import Image

    with Image.open(path) as saved:
        assert saved.format == "PNG"
        np.testing.assert_array_equal(np.asarray(saved), expected)


def test_image_grid_rgb_range_and_scale() -> None:
    # one 3x1x1 RGB image in [0, 10], upscaled 2x, no padding
    rgb = torch.tensor([0.0, 5.0, 10.0]).reshape(1, 3, 1, 1)
    image = plotting.image_grid(rgb, value_range=(0, 10), padding=0, scale=2)
    assert image.mode == "RGB"
    expected = np.broadcast_to(np.array([0, 128, 255], dtype=np.uint8), (2, 2, 3))
    np.testing.assert_array_equal(np.asarray(image), expected)


def test_image_grid_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\(N, C, H, W\) with C in \(1, 3, 4\)"):
        plotting.image_grid(torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match="nrow must be an integer >= 1"):
        plotting.image_grid(torch.zeros(2, 1, 4, 4), nrow=0)
    with pytest.raises(ValueError, match="low < high"):
        plotting.image_grid(torch.zeros(2, 1, 4, 4), value_range=(1, 1))
    with pytest.raises(TypeError, match="torch.Tensor"):
        plotting.image_grid(np.zeros((2, 1, 4, 4)))  # type: ignore[arg-type]


def test_demo_gif_frames_share_their_axes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every frame of the training GIF is drawn with the same axis limits, so the data panel
    stays put while the samples change."""
    pytest.importorskip("matplotlib")
    from tinydiff.cli import run_demo

    draw, save = plotting.scatter_frame, plotting.save_gif
    gif_limits: list[object] = []

    def frame(panels, *, lim=None, dpi=80):  # type: ignore[no-untyped-def]
        image = draw(panels, lim=lim, dpi=20)
        image.info["lim"] = lim  # remember how the frame was drawn
        return image

    def gif(path, frames, duration_ms=300):  # type: ignore[no-untyped-def]
        gif_limits.extend(f.info["lim"] for f in frames)
        return save(path, frames, duration_ms)

    monkeypatch.setattr(plotting, "scatter_frame", frame)
    monkeypatch.setattr(plotting, "save_gif", gif)
    run_demo(
        "swiss_roll",
        steps=4,
        out=tmp_path,
        snapshots=2,
        num_samples=64,
        sampling_steps=2,
        progress=False,
    )
    assert len(gif_limits) >= 3
    assert None not in gif_limits and len(set(gif_limits)) == 1, gif_limits
