"""sd-webui-controlnet's HTTP API: /controlnet/version, model_list, module_list, control_types,
settings and detect, field for field (served at /controlnet/* and /ext/controlnet/*)."""
from __future__ import annotations

import base64
import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from modules.plugins import api

from . import preprocessors
from .units import decode_image

API_VERSION = 2  # sd-webui-controlnet's external_code.get_api_version()
CONTROL_TYPES = ("All", "Canny", "Depth", "NormalMap", "OpenPose", "Lineart", "SoftEdge", "Scribble", "Inpaint",
                 "Shuffle", "Tile", "Reference", "T2I-Adapter", "IP-Adapter")
_MODEL_WORDS = {"Scribble": ("scribble", "sketch"), "Lineart": ("lineart",), "SoftEdge": ("softedge", "hed"),
                "NormalMap": ("normal",), "OpenPose": ("openpose", "pose"), "T2I-Adapter": ("t2i",),
                "IP-Adapter": ("ip-adapter", "ip_adapter")}


def short_hash(path: Path, cache: dict[tuple[Path, float], str]) -> str:
    """The first 8 hex digits of the file's sha256, as sd-webui-controlnet shows them ("" for folders)."""
    if path.is_dir():
        return ""
    key = (path, path.stat().st_mtime)
    if key not in cache:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        cache[key] = digest.hexdigest()[:8]
    return cache[key]


def model_titles(ext: Any, cache: dict) -> list[str]:
    files = ext.library.files()
    titles = []
    for name in ext.library.names():
        digest = short_hash(files[name], cache)
        titles.append(f"{name} [{digest}]" if digest else name)
    return titles


def module_detail(pre: preprocessors.Preprocessor) -> dict[str, Any]:
    sliders = [{"name": s.name, "value": s.value, "min": s.min, "max": s.max, "step": s.step}
               for s in (pre.resolution, pre.a, pre.b) if s is not None]
    return {"model_free": pre.name == "none", "sliders": sliders}


def control_type(tag: str, modules: list[str], models: list[str]) -> dict[str, Any]:
    """Modules and models of one Control Type, with a sensible default pair."""
    if tag == "All":
        return {"module_list": modules, "model_list": ["None", *models], "default_option": "none",
                "default_model": "None"}
    tagged = [p.name for p in preprocessors.PREPROCESSORS if p.tag == tag]
    words = _MODEL_WORDS.get(tag, (tag.lower(),))
    matching = [] if tag == "Reference" else [m for m in models if any(w in m.lower() for w in words)]
    if tag == "Reference":  # no model: reference_only first, as upstream's default
        tagged = sorted(tagged, key=lambda name: name != "reference_only")
    return {"module_list": ["none", *tagged], "model_list": ["None", *matching],
            "default_option": tagged[0] if tagged else "none", "default_model": matching[0] if matching else "None"}


def encode_png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def api_router(ext: Any) -> Any:
    from fastapi import APIRouter, Body, HTTPException

    router = APIRouter(tags=["ControlNet (sd-webui-controlnet compatible)"])
    hashes = ext.hashes

    @router.get("/version")
    def version() -> dict[str, Any]:
        return {"version": API_VERSION}

    @router.get("/model_list")
    def model_list(update: bool = True) -> dict[str, Any]:
        if update:
            ext.library.refresh()
        return {"model_list": model_titles(ext, hashes)}

    @router.get("/module_list")
    def module_list(alias_names: bool = False) -> dict[str, Any]:
        names = [(p.aliases[0] if alias_names and p.aliases else p.name) for p in preprocessors.PREPROCESSORS]
        detail = {name: module_detail(p) for name, p in zip(names, preprocessors.PREPROCESSORS, strict=True)}
        return {"module_list": names, "module_detail": detail}

    @router.get("/control_types")
    def control_types() -> dict[str, Any]:
        modules = [p.name for p in preprocessors.PREPROCESSORS]
        models = model_titles(ext, hashes)
        return {"control_types": {tag: control_type(tag, modules, models) for tag in CONTROL_TYPES}}

    @router.get("/settings")
    def settings() -> dict[str, Any]:
        return {"control_net_unit_count": ext.unit_count}

    @router.post("/detect")
    def detect(controlnet_module: str = Body("none"), controlnet_input_images: list[str] = Body([]),  # noqa: B008
               controlnet_processor_res: int = Body(-1), controlnet_threshold_a: float = Body(-1),  # noqa: B008
               controlnet_threshold_b: float = Body(-1), controlnet_masks: list[str] = Body([]),  # noqa: B008
               low_vram: bool = Body(False)) -> dict[str, Any]:  # noqa: B008
        pre = preprocessors.find(controlnet_module)
        if pre is None:
            raise HTTPException(status_code=422, detail=f"Module not available: {controlnet_module!r}")
        if not controlnet_input_images:
            raise HTTPException(status_code=422, detail="No image selected")
        if pre.uses_mask and len(controlnet_masks) != len(controlnet_input_images):
            raise HTTPException(status_code=422,
                                detail=f"Preprocessor {pre.name} requires `controlnet_masks` param.")
        images, poses = [], []
        try:
            for i, data in enumerate(controlnet_input_images):
                image = decode_image(data, i, "controlnet_input_images")
                mask = decode_image(controlnet_masks[i], i, "controlnet_masks") if i < len(controlnet_masks) else None
                detected = preprocessors.run(pre, image, mask, controlnet_processor_res, controlnet_threshold_a,
                                             controlnet_threshold_b, 0, ext.annotators)
                images.append(encode_png(detected))
                poses.append(getattr(detected, "poses", None))
        except api.InvalidParams as err:
            raise HTTPException(status_code=422, detail=str(err)) from None
        if any(p is not None for p in poses):  # pose preprocessors also give their keypoints, as the extension does
            return {"images": images, "info": "Success", "poses": poses}
        return {"images": images, "info": "Success"}

    return router
