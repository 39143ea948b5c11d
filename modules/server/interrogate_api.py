"""/sdapi/v1/interrogate (A1111's): {image, model} -> {caption}.

The image is interrogated on the app's engine (its `Interrogator`), in a worker thread, with the
caller's A1111 interrogation options. Unknown models, absent model files and bad images are 422s
whose message names the model, the folder and the files to fetch.
"""
from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool

from modules.errors import CheckpointError, InvalidParams
from modules.interrogate.options import InterrogateOptions
from modules.jobs.model import Caller
from modules.server.context import ServerContext
from modules.server.convert import decode_image


async def run_interrogation(ctx: ServerContext, image_b64: str, model: str, caller: Caller) -> dict[str, Any]:
    interrogator = ctx.app.engine.interrogator
    interrogator.check(model)  # the model's name and files, before the image is decoded
    image = decode_image(image_b64, ("image",), ctx.app.settings.limits.max_size).convert("RGB")
    options = InterrogateOptions.from_options(ctx.options_for(caller))
    try:
        caption = await run_in_threadpool(interrogator.interrogate, image, model, options)
    except CheckpointError as err:  # a model file that cannot be used: the user must replace it
        raise InvalidParams(str(err), field="model") from None
    return {"caption": caption}
