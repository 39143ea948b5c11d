"""A package-style extension registering a sampler, a schedule and a style; relative imports work."""
from modules.plugins import api

from .sampling import sample_fixture_euler, uniform_linear


@api.hookimpl
def register_samplers():
    return [api.SamplerSpec("Fixture Euler", sample_fixture_euler, ("fixture_euler",), default_scheduler="linear_sigma")]


@api.hookimpl
def register_schedulers():
    return [api.SchedulerSpec("linear_sigma", "Linear sigma", uniform_linear)]


@api.hookimpl
def register_styles():
    return [api.StyleSpec("Fixture wrap", "[{prompt}] wrapped", "ugly", source="fixture-sampler")]
