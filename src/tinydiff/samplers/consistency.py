r"""Multistep consistency sampling (Song et al. 2023, "Consistency Models", Alg. 1).

A consistency model ([`tinydiff.objectives.Consistency`][tinydiff.objectives.Consistency])
maps any $x_t$ straight to the ODE's end point, $f(x_t, t) = \hat x_0$ (the denoiser's x0
estimate). One step from the initial noise is a sample; more steps alternate the jump with
fresh noise at the next time $t_{i+1}$ of the plan:

$$
\hat x_0 = f(x_{t_i}, t_i),\qquad x_{t_{i+1}} = \alpha(t_{i+1})\,\hat x_0 +
\sigma(t_{i+1})\,z,\quad z \sim \mathcal N(0, I),
$$

and the last step returns $\hat x_0$. `model.sample(bsz, 1)` makes one network call,
`sample(bsz, 2)` two (T -> T/2 -> 0 with the default `trailing` spacing); explicit times
choose the intermediate levels. Any model can be sampled so (a diffusion model's x0
estimate from pure noise is the data mean: blurry), which is how a tuned model is compared
with the model it was tuned from.

Classifier-free guidance is refused: the guided x0 estimate of a consistency model is not
the consistency function of the guided ODE.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from tinydiff.process import PathValues
from tinydiff.samplers.base import Denoiser, Noise, Row, Sampler, State, StepResult, register


@register("consistency", aliases=("multistep_consistency", "consistency_multistep"))
class Consistency(Sampler):
    r"""Jump to $\hat x_0 = f(x_t, t)$, then renoise to the next time:
    $x_{t_{i+1}} = \alpha(t_{i+1})\hat x_0 + \sigma(t_{i+1})z$ (Song et al. 2023, Alg. 1);
    the last step returns $\hat x_0$.

    NFE: one per step, `nfe(S) = S`. Without a step count a call makes one jump (T -> 0);
    spacing `trailing` on every process (`few_step_default`).
    """

    stochastic = True
    few_step_default = 1  # one jump: the consistency function maps noise to data

    def plan(self, path: PathValues) -> dict[str, Tensor]:
        alpha_next, sigma_next = path.alpha[1:].clone(), path.sigma[1:].clone()
        alpha_next[-1], sigma_next[-1] = 1.0, 0.0  # the last step returns x0 itself
        return {"alpha_next": alpha_next, "sigma_next": sigma_next}

    def check_denoiser(self, denoiser: Any) -> None:
        """Refuse guidance (see the module docstring).

        Raises:
            ValueError: a denoiser with a guidance strategy.
        """
        if getattr(denoiser, "guidance", None) is not None:
            raise ValueError(
                "the consistency sampler jumps with the model's x0 estimate f(x_t, t); a "
                "guided x0 estimate is not the consistency function of the guided ODE, so "
                "guidance is refused. Sample without guidance_scale / guidance (a conditional "
                "model still takes cond), or sample the guided ODE with a diffusion sampler "
                "(e.g. sampler='unipc'), many steps."
            )

    def step(self, x: Tensor, state: State, c: Row, denoise: Denoiser, noise: Noise) -> StepResult:
        assert noise is not None  # stochastic sampler: the loop always passes noise
        x0 = denoise(x, c["point"]).x0
        return c["alpha_next"] * x0 + c["sigma_next"] * noise, state
