"""A cfg_denoiser hook: records the steps it sees; with mode "cond-only" it drops the guidance,
with mode "raise" it fails (to test the failure rule inside sampling)."""
from modules.plugins import api

SEEN: list = []


@api.hookimpl
def cfg_denoiser(step: api.DenoiserStep, params):
    options = params.extension_args.get("cfg-probe")
    if options is None:
        return None
    SEEN.append((step.step, float(step.sigma[0]), step.uncond is not None))
    if options.get("mode") == "raise":
        raise RuntimeError("probe exploded")
    if options.get("mode") == "cond-only":
        return step.cond
    return None
