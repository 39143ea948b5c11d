"""Appends its name to the prompt, so tests can see the call order."""
import dataclasses

from modules.plugins import api


@api.hookimpl
def prepare_params(params):
    if "order-test" in params.prompt:
        return dataclasses.replace(params, prompt=params.prompt + " c")
    return None
