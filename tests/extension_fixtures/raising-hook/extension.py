"""Every hook raises: registration, prepare_params, its post-processor and on_image_saved."""
from modules.plugins import api


@api.hookimpl
def register_styles():
    raise RuntimeError("styles exploded")


@api.hookimpl
def prepare_params(params, context):
    raise RuntimeError("prepare exploded")


def explode(image, params, context):
    raise RuntimeError("post-processor exploded")


@api.hookimpl
def register_postprocessors():
    return [api.PostprocessorSpec("raising-post", "Raising post", explode, always_on=True)]


@api.hookimpl
def on_image_saved(path, params, infotext):
    raise RuntimeError("saved hook exploded")
