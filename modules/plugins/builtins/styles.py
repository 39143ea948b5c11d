"""Built-in prompt styles: A1111's styles.csv, and applying the job's chosen styles.

Styles are applied in `prepare_params`, the hook extensions use too; the built-ins run
first, so a style may contain wildcards that an extension expands afterwards.
"""
from __future__ import annotations

import dataclasses

from modules.plugins.hookspecs import hookimpl
from modules.plugins.specs import StyleSpec
from modules.styles import apply_styles, load_styles_csv


@hookimpl
def register_styles(settings) -> list[StyleSpec]:
    path = getattr(settings, "styles_file", None)
    if path is None or not path.is_file():
        return []
    return load_styles_csv(path)


@hookimpl
def prepare_params(params, context):
    names = getattr(params, "styles", ())
    if not names:
        return None
    chosen = [context.registries.styles.get(name) for name in names]  # unknown: InvalidParams
    prompt, negative = apply_styles(params.prompt, params.negative_prompt, chosen)
    # The styled prompt is what infotext records; clearing `styles` keeps a re-run from applying them twice.
    return dataclasses.replace(params, prompt=prompt, negative_prompt=negative, styles=())
