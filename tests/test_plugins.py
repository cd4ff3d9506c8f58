"""Third-party plugins through the `tinydiff.plugins` entry-point group, with a real
distribution installed into a temporary site directory (a fresh interpreter per test, so the
running process's metadata caches are not involved)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def _install_dist(
    site: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]
) -> None:
    """Write a minimal installed distribution: modules plus a .dist-info with entry points."""
    for mod, code in modules.items():
        (site / f"{mod}.py").write_text(textwrap.dedent(code))
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    eps = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[tinydiff.plugins]\n{eps}\n")
    (info / "RECORD").write_text("")


def _run(site: Path, code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(SRC)])}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


PLUGIN = """
import torch
import tinydiff

@tinydiff.schedules.register("plugin_schedule")
def plugin_schedule(num_timesteps: int, floor: float = 0.01) -> torch.Tensor:
    return torch.linspace(1.0, floor, num_timesteps + 1)

@tinydiff.losses.register("plugin_loss")
def plugin_loss(pred, target):
    return (pred - target).abs() ** 3
"""


@pytest.fixture
def site(tmp_path: Path) -> Path:
    _install_dist(
        tmp_path,
        "tinydiff_example_plugin",
        {"example": "tinydiff_example_plugin_mod", "broken": "tinydiff_broken_plugin_mod"},
        {
            "tinydiff_example_plugin_mod": PLUGIN,
            "tinydiff_broken_plugin_mod": "raise ImportError('this plugin is broken on purpose')",
        },
    )
    return tmp_path


def test_plugin_entries_load_lazily_and_work_end_to_end(site: Path) -> None:
    result = _run(
        site,
        """
        import sys, warnings, torch
        import tinydiff
        assert "tinydiff_example_plugin_mod" not in sys.modules, "plugins must load lazily"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from tinydiff import DiffusionModel, DiffusionModelConfig
            cfg = DiffusionModelConfig(input_shape=(2,), num_timesteps=20,
                                       noise_schedule_type="Plugin-Schedule",
                                       schedule_kwargs={"floor": 0.05}, loss_type="plugin_loss")
        assert "tinydiff_example_plugin_mod" in sys.modules
        assert cfg.noise_schedule_type == "plugin_schedule"
        assert any("broken" in str(w.message) and "failed to load" in str(w.message)
                   for w in caught), [str(w.message) for w in caught]
        net = torch.nn.Linear(2, 2)
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__(); self.lin = torch.nn.Linear(2, 2)
            def forward(self, x, t):
                return self.lin(x)
        model = DiffusionModel(Net(), cfg)
        assert abs(model.alphas_cumprod[-1].item() - 0.05) < 1e-7
        model.loss(torch.randn(4, 2)).mean().backward()
        print("names", tinydiff.schedules.names("plugin*"))
        """,
    )
    assert result.returncode == 0, result.stderr
    assert "names ['plugin_schedule']" in result.stdout


def test_unknown_name_still_errors_after_plugins_load(site: Path) -> None:
    result = _run(
        site,
        """
        import warnings
        warnings.simplefilter("ignore")
        from pydantic import ValidationError
        from tinydiff import DiffusionModelConfig
        try:
            DiffusionModelConfig(input_shape=(2,), noise_schedule_type="plugin_schedul")
        except ValidationError as err:
            print(err)
        """,
    )
    assert result.returncode == 0, result.stderr
    assert "Did you mean 'plugin_schedule'" in result.stdout
    assert "may provide it" in result.stdout
