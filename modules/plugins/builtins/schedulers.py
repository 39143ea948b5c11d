"""Built-in noise schedules, registered through the same hook extensions use.

Names and labels are those of A1111's `/sdapi/v1/schedulers`, in its order.
"Automatic" is registered so the UI and API can offer it; its function raises, and
`modules.sampling.schedules.resolve_scheduler` maps it to the sampler's default.
"""
from __future__ import annotations

from modules.plugins.hookspecs import hookimpl
from modules.plugins.specs import SchedulerSpec
from modules.sampling import schedules as s


@hookimpl
def register_schedulers() -> list[SchedulerSpec]:
    return [
        SchedulerSpec("automatic", "Automatic", s.automatic),
        SchedulerSpec("uniform", "Uniform", s.uniform, need_inner_model=True),
        SchedulerSpec("karras", "Karras", s.karras, default_rho=7.0),
        SchedulerSpec("exponential", "Exponential", s.exponential),
        SchedulerSpec("polyexponential", "Polyexponential", s.polyexponential, default_rho=1.0),
        SchedulerSpec("sgm_uniform", "SGM Uniform", s.sgm_uniform, aliases=("SGMUniform",), need_inner_model=True),
        SchedulerSpec("kl_optimal", "KL Optimal", s.kl_optimal),
        SchedulerSpec("align_your_steps", "Align Your Steps", s.align_your_steps),
        SchedulerSpec("simple", "Simple", s.simple, need_inner_model=True),
        SchedulerSpec("normal", "Normal", s.normal, need_inner_model=True),
        SchedulerSpec("ddim", "DDIM", s.ddim, need_inner_model=True),
        SchedulerSpec("beta", "Beta", s.beta, need_inner_model=True),
    ]
