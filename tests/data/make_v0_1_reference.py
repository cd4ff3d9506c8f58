"""Write ``v0_1_samples.safetensors``: samples of tinydiff 0.1 that later versions must reproduce.

Run with tinydiff 0.1.0 (commit 612bccb) installed: ``python tests/data/make_v0_1_reference.py``.
For every sampler x spacing x target (and the learned-range variance, zero terminal SNR and
a guided run) it samples 4 points of a 2-d Gaussian mixture with the exact denoiser in float64
from a fixed generator; ``tests/test_v0_1_compat.py`` recomputes each entry with the current code.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from safetensors.torch import save_file

from tinydiff import DiffusionModel
from tinydiff.testing import ExactDenoiser, GaussianMixture

MIXTURE = GaussianMixture([[-1.0, 0.5], [1.5, -0.5]], [0.3, 0.5])
SCHEDULES = ("linear", "cosine")
#: the targets tinydiff 0.1 had (later targets have no 0.1 reference)
V0_1_TARGETS = ("pred_eps", "pred_x_0", "pred_v")
#: the spacings and samplers tinydiff 0.1 had (later ones have no 0.1 reference)
V0_1_SPACINGS = (
    "karras",
    "leading",
    "linspace",
    "logsnr",
    "logsnr_trailing",
    "quadratic",
    "trailing",
)
V0_1_SAMPLERS = (
    "ddim",
    "ddpm",
    "deis",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_3m",
    "euler",
    "heun",
    "unipc",
)


def cases() -> list[tuple[str, dict, str, dict]]:
    """(key, config kwargs, sampler, sample kwargs) of every entry."""
    out = []
    for schedule, sampler, spacing, target in itertools.product(
        SCHEDULES, V0_1_SAMPLERS, V0_1_SPACINGS, V0_1_TARGETS
    ):
        cfg = dict(
            input_shape=(2,), num_timesteps=100, noise_schedule_type=schedule, target_type=target
        )
        key = f"{schedule}/{sampler}/{spacing}/{target}"
        out.append((key, cfg, sampler, dict(timestep_spacing=spacing)))
    for sampler in V0_1_SAMPLERS:
        cfg = dict(input_shape=(2,), num_timesteps=100, sigma_type="learned_range")
        out.append((f"learned_range/{sampler}", cfg, sampler, dict(timestep_spacing="trailing")))
        cfg = dict(
            input_shape=(2,), num_timesteps=100, target_type="pred_v", zero_terminal_snr=True
        )
        out.append((f"zero_snr/{sampler}", cfg, sampler, dict(timestep_spacing="trailing")))
    cfg = dict(input_shape=(2,), num_timesteps=100, sampler_type="heun")
    out.append(("heun_churn", cfg, "heun", dict(sampler_kwargs={"s_churn": 2.0})))
    out.append(("ddim_eta", cfg, "ddim", dict(sampler_kwargs={"eta": 0.7})))
    return out


def sample(cfg: dict, sampler: str, kwargs: dict) -> torch.Tensor:
    model = DiffusionModel(torch.nn.Identity(), cfg)
    model.nn_module = ExactDenoiser(MIXTURE, model).double()
    gen = torch.Generator().manual_seed(1234)
    return model.sample(4, 7, sampler=sampler, generator=gen, **kwargs)


if __name__ == "__main__":
    out = {key: sample(cfg, s, kw).contiguous() for key, cfg, s, kw in cases()}
    path = Path(__file__).with_name("v0_1_samples.safetensors")
    save_file(out, str(path))
    print(f"wrote {len(out)} entries to {path}")
