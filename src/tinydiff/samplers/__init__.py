"""Samplers: the reverse-process solvers, one module each, registered by name.

Every module in this package is imported on first use of the package, so adding a sampler
means adding one file (or registering one from your own code or plugin). The contract is the
`tinydiff.samplers.base.Sampler` base class; `tinydiff.samplers.base.run_loop`
is the loop that drives any sampler over a precomputed plan.

Register your own (the plan's coefficients come from the process at the visited times; the
step only does tensor maths)::

    @tinydiff.samplers.register("my_ddim")
    class MyDDIM(tinydiff.samplers.Sampler):
        def plan(self, path):  # tinydiff.process.PathValues
            return {"coef_x0": path.alpha[1:], "coef_eps": path.sigma[1:]}

        def step(self, x, state, c, denoise, noise):
            pred = denoise(x, c["point"])
            return c["coef_x0"] * pred.x0 + c["coef_eps"] * pred.eps, state
"""

from __future__ import annotations

import importlib
import pkgutil

from tinydiff.samplers.base import (
    REGISTRY,
    Denoiser,
    Prediction,
    Sampler,
    default_sampler,
    get,
    names,
    register,
    run_loop,
    run_sampler,
    sampling_defaults,
)

__all__ = [
    "REGISTRY",
    "Denoiser",
    "Prediction",
    "Sampler",
    "default_sampler",
    "get",
    "names",
    "register",
    "run_loop",
    "run_sampler",
    "sampling_defaults",
]

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base" and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")
