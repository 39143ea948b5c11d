"""Built-in samplers, registered through the same hook extensions use.

Names, aliases, order, default schedules and flags follow A1111 v1.10's
`/sdapi/v1/samplers`; ComfyUI's and Forge's common extras follow, under ComfyUI's names as
aliases. `options` are the defaults the pipeline passes as keyword arguments; users may
override any of them. `brownian_noise` marks A1111's Brownian-tree SDE samplers.
"""
from __future__ import annotations

from modules.plugins.hookspecs import hookimpl
from modules.plugins.specs import SamplerSpec
from modules.sampling import samplers as k
from modules.sampling import samplers_cfgpp as cfgpp
from modules.sampling import samplers_deis as deis
from modules.sampling import samplers_dpm_solver as dpm_solver
from modules.sampling import samplers_dpmpp as dpmpp
from modules.sampling import samplers_extra as extra
from modules.sampling import samplers_flow
from modules.sampling.samplers_sa import sample_sa_solver
from modules.sampling.samplers_unipc import sample_unipc

INF = float("inf")
CHURN = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": INF, "s_noise": 1.0}
ANCESTRAL = {"eta": 1.0, "s_noise": 1.0}


@hookimpl
def register_samplers() -> list[SamplerSpec]:
    return [
        SamplerSpec("DPM++ 2M", dpmpp.sample_dpmpp_2m, ("k_dpmpp_2m",), default_scheduler="karras"),
        SamplerSpec("DPM++ SDE", dpmpp.sample_dpmpp_sde, ("k_dpmpp_sde", "dpmpp_sde_gpu"), ANCESTRAL,
                    default_scheduler="karras", uses_noise=True, second_order=True, brownian_noise=True),
        SamplerSpec("DPM++ 2M SDE", dpmpp.sample_dpmpp_2m_sde, ("k_dpmpp_2m_sde", "dpmpp_2m_sde_gpu"),
                    {**ANCESTRAL, "solver_type": "midpoint"}, default_scheduler="exponential", uses_noise=True,
                    brownian_noise=True),
        SamplerSpec("DPM++ 2M SDE Heun", dpmpp.sample_dpmpp_2m_sde, ("k_dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu"),
                    {**ANCESTRAL, "solver_type": "heun"}, default_scheduler="exponential", uses_noise=True,
                    brownian_noise=True),
        SamplerSpec("DPM++ 2S a", dpmpp.sample_dpmpp_2s_ancestral, ("k_dpmpp_2s_a",), ANCESTRAL,
                    default_scheduler="karras", uses_noise=True, second_order=True),
        SamplerSpec("DPM++ 3M SDE", dpmpp.sample_dpmpp_3m_sde, ("k_dpmpp_3m_sde", "dpmpp_3m_sde_gpu"), ANCESTRAL,
                    default_scheduler="exponential", uses_noise=True, discard_next_to_last_sigma=True,
                    brownian_noise=True),
        SamplerSpec("Euler a", k.sample_euler_ancestral, ("k_euler_a", "k_euler_ancestral"), ANCESTRAL,
                    default_scheduler="uniform", uses_noise=True),
        SamplerSpec("Euler", k.sample_euler, ("k_euler",), CHURN, default_scheduler="uniform"),
        SamplerSpec("LMS", k.sample_lms, ("k_lms",), {"order": 4}, default_scheduler="uniform"),
        SamplerSpec("Heun", k.sample_heun, ("k_heun",), CHURN, default_scheduler="uniform", second_order=True),
        SamplerSpec("DPM2", k.sample_dpm_2, ("k_dpm_2",), CHURN, default_scheduler="karras",
                    discard_next_to_last_sigma=True, second_order=True),
        SamplerSpec("DPM2 a", k.sample_dpm_2_ancestral, ("k_dpm_2_a",), ANCESTRAL, default_scheduler="karras",
                    uses_noise=True, discard_next_to_last_sigma=True, second_order=True),
        SamplerSpec("DPM fast", dpm_solver.sample_dpm_fast, ("k_dpm_fast", "dpm_fast"), ANCESTRAL,
                    default_scheduler="uniform", uses_noise=True),
        SamplerSpec("DPM adaptive", dpm_solver.sample_dpm_adaptive, ("k_dpm_ad", "dpm_adaptive"), ANCESTRAL,
                    default_scheduler="uniform", uses_noise=True),
        SamplerSpec("Restart", samplers_flow.sample_restart, ("restart",), {"s_noise": 1.0}, default_scheduler="karras",
                    uses_noise=True, second_order=True),
        SamplerSpec("DDIM", k.sample_ddim, ("ddim",), {"eta": 0.0, "s_noise": 1.0}, default_scheduler="ddim",
                    vp_start=True),
        SamplerSpec("DDIM CFG++", cfgpp.sample_ddim_cfg_pp, ("ddim_cfgpp",), {"eta": 0.0, "s_noise": 1.0},
                    default_scheduler="ddim", vp_start=True),
        SamplerSpec("PLMS", extra.sample_plms, ("plms",), default_scheduler="ddim", vp_start=True),
        SamplerSpec("UniPC", sample_unipc, ("unipc",), {"order": 3, "variant": "bh2", "lower_order_final": True},
                    default_scheduler="uniform"),
        SamplerSpec("LCM", k.sample_lcm, ("k_lcm",), default_scheduler="uniform", uses_noise=True),
        # ComfyUI / Forge
        SamplerSpec("Euler CFG++", cfgpp.sample_euler_cfg_pp, ("euler_cfg_pp", "k_euler_cfg_pp"),
                    default_scheduler="uniform"),
        SamplerSpec("DPM++ 2M CFG++", cfgpp.sample_dpmpp_2m_cfg_pp, ("dpmpp_2m_cfg_pp", "k_dpmpp_2m_cfg_pp"),
                    default_scheduler="karras"),
        SamplerSpec("DEIS", deis.sample_deis, ("deis",), {"max_order": 3, "deis_mode": "tab"},
                    default_scheduler="uniform"),
        SamplerSpec("iPNDM", extra.sample_ipndm, ("ipndm",), {"max_order": 4}, default_scheduler="uniform"),
        SamplerSpec("Res Multistep", extra.sample_res_multistep, ("res_multistep",), default_scheduler="uniform"),
        SamplerSpec("TCD", extra.sample_tcd, ("tcd",), {"gamma": 0.3}, default_scheduler="sgm_uniform",
                    uses_noise=True),
        SamplerSpec("SA-Solver", sample_sa_solver, ("sa_solver",), {**ANCESTRAL, "predictor_order": 3,
                    "corrector_order": 4}, default_scheduler="uniform", uses_noise=True),
        SamplerSpec("ER-SDE", extra.sample_er_sde, ("er_sde",), {"s_noise": 1.0, "max_stage": 3},
                    default_scheduler="uniform", uses_noise=True),
    ]
