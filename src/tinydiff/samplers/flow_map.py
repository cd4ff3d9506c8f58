r"""Flow-map jumps: one network call per step, from t straight to the next time r.

A two-time network ([`takes_end_time`][tinydiff.denoiser.takes_end_time]) trained as a flow
map, e.g. with `training_objective="meanflow"` ([`tinydiff.objectives`][tinydiff.objectives]),
predicts the average velocity of the probability-flow ODE over $[r, t]$ (Geng et al. 2025,
"Mean Flows for One-step Generative Modeling", eq. 3), in tinydiff's velocity unit $s = t/T$:

$$
u(x_t, r, t) = \frac{1}{s_t - s_r}\int_{s_r}^{s_t} v(x_\tau, \tau)\,d\tau
= \frac{x_t - x_r}{s_t - s_r},
$$

so that the ODE's solution at r is one evaluation away (their eq. 12):

$$
x_r = x_t + \frac{r - t}{T}\,u(x_t, r, t).
$$

`model.sample(bsz, 1)` is one jump T -> 0, `sample(bsz, 2)` two jumps T -> T/2 -> 0 (the
default `trailing` spacing); any spacing or explicit times work. The network is called as
`network(x_t, t, r=r)`; its output goes through the model's target like any output (for
`pred_velocity`, the target MeanFlow trains, it is u itself), and the step uses the velocity
of the resulting (x0, eps): $u = \alpha'(s)\,\hat x_0 + \sigma'(s)\,\hat\epsilon$.
An x0 limit (`clip_x0`, `dynamic_threshold`) acts on that x0 estimate and so changes the
jump; flow-map models are usually sampled without one.

Classifier-free guidance applied to u at sampling time is not the flow map of the guided
ODE (the average of a guided velocity is not the guided average), so it is refused for
two-time networks. MeanFlow folds guidance into training instead (Geng et al. 2025, sec. 4.2):
a model trained with `training_objective_kwargs={"guidance_scale": w}` (and
`cond_drop_prob > 0`) learns the average velocity of the w-guided ODE, and
`model.sample(bsz, 1, cond=...)` (no `guidance_scale`) samples the w-guided distribution in
one call; the null condition gives the unconditional model.

A one-time network has no flow map: for it this sampler takes the first-order step with the
x0 estimate held fixed ([`tinydiff.samplers.euler`][tinydiff.samplers.euler], identical
coefficients), so that every model can be sampled with it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tinydiff.process import PathValues
from tinydiff.samplers._exp import first_order
from tinydiff.samplers.base import Denoiser, Noise, Row, Sampler, State, StepResult, register


@register("flow_map", aliases=("meanflow", "average_velocity"))
class FlowMap(Sampler):
    r"""Jump along the learnt flow map: $x_r = x_t + (r - t)/T\;u(x_t, r, t)$
    (Geng et al. 2025, eq. 12), r the next sampling time.

    NFE: one per step, `nfe(S) = S`. Without a step count a call makes one jump (T -> 0);
    spacing `trailing` on every process (`few_step_default`). A one-time network sampled
    with this sampler takes Euler steps: pass a step count (e.g. 50) for it.
    """

    few_step_default = 1

    def plan(self, path: PathValues) -> dict[str, Tensor]:
        num_steps = path.t.numel() - 1
        points = path.process.points(path.t[:-1])  # d alpha / ds, d sigma / ds at each t
        ds = (path.t[1:] - path.t[:-1]) / path.process.num_timesteps
        coefs = [first_order(path, i) for i in range(num_steps)]
        return {
            "jump_x0": ds * points[:, 3],
            "jump_eps": ds * points[:, 4],
            "coef_x": torch.tensor([c[0] for c in coefs], dtype=torch.float64),
            "coef_x0": torch.tensor([c[1] for c in coefs], dtype=torch.float64),
        }

    def check_denoiser(self, denoiser: Any) -> None:
        """Refuse guidance on a two-time network (see the module docstring).

        Raises:
            ValueError: a two-time network with a guidance strategy.
        """
        guided = getattr(denoiser, "guidance", None) is not None
        if getattr(denoiser, "end_time", False) and guided:
            raise ValueError(
                "the flow_map sampler jumps along the network's average velocity u(x_t, r, t); "
                "guidance applied to u at sampling time is not the flow map of the guided ODE, "
                "so it is refused. Fold guidance into training instead: "
                "training_objective='meanflow' with training_objective_kwargs={'guidance_scale': "
                "w} (and cond_drop_prob > 0) trains the w-guided model, which samples it with "
                "cond alone. Otherwise sample without guidance_scale / guidance, or sample the "
                "instantaneous velocity with an ODE sampler (sampler='euler' calls the network "
                "with r = t), many steps."
            )

    def step(self, x: Tensor, state: State, c: Row, denoise: Denoiser, noise: Noise) -> StepResult:
        if getattr(denoise, "end_time", False):  # fixed per run: no data-dependent branch
            pred = denoise(x, c["point"], r=c["t_next"])  # type: ignore[call-arg]
            return x + c["jump_x0"] * pred.x0 + c["jump_eps"] * pred.eps, state
        pred = denoise(x, c["point"])
        return c["coef_x"] * x + c["coef_x0"] * pred.x0, state
