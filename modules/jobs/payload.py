"""The one typed job payload: what every front end submits, the queue stores and the executor runs.

A `JobPayload` holds the task's typed params (`Txt2ImgParams` or `Img2ImgParams`), the
checkpoint, the stored input images and the request as the client sent it. It goes to
JSON and back losslessly, types included: each field is encoded by its declared type,
and decoding coerces by that type again, so a float stays a float and a tuple a tuple.
Input images never travel inside the params: they are files beside the job (`inputs`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from modules.errors import InvalidParams
from modules.pipeline.extras import ExtrasJobParams
from modules.pipeline.params import GenerationParams, Img2ImgParams, Txt2ImgParams

PAYLOAD_VERSION = 1
PARAMS_BY_KIND: dict[str, type] = {"txt2img": Txt2ImgParams, "img2img": Img2ImgParams, "extras": ExtrasJobParams}
IMAGE_FIELDS = ("init_images", "mask")  # stored as files beside the job, never inside the params
SERVER_ONLY_FIELDS = ("outdir", *IMAGE_FIELDS)  # no client sets these: the executor and the inputs do


def params_class(kind: str) -> type[GenerationParams]:
    try:
        return PARAMS_BY_KIND[kind]
    except KeyError:
        raise InvalidParams(f"Unknown job kind {kind!r}; use one of {', '.join(PARAMS_BY_KIND)}",
                            field="kind") from None


@cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name not in SERVER_ONLY_FIELDS}


def field_names(cls: type) -> frozenset[str]:
    """The params fields a client may set (server-only fields excluded)."""
    return frozenset(_field_types(cls))


def _options(tp: Any) -> tuple[Any, ...]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """`value` as the declared type `tp`; raises InvalidParams naming the field."""
    options = _options(tp)
    if value is None:
        if type(None) in options or tp is Any:
            return None
        raise InvalidParams(f"{name} must be set", field=name)
    concrete = [o for o in options if o is not type(None)]
    for option in concrete:
        ok, result = _as(option, name, value)
        if ok:
            return result
    raise InvalidParams(f"{name} must be {_describe(concrete)}, got {value!r}", field=name)


def _as(tp: Any, name: str, value: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp) or tp
    if tp is Any:
        return True, value
    if origin is bool:
        return isinstance(value, bool), value
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if origin is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, value
        if not math.isfinite(value):
            raise InvalidParams(f"{name} must be a finite number, got {value!r}", field=name)
        return True, float(value)
    if origin is str:
        return isinstance(value, str), value
    if origin is Path:
        return isinstance(value, (str, Path)), Path(value)
    if origin is tuple:
        return _as_tuple(tp, name, value)
    if origin is dict:
        return isinstance(value, Mapping), _json_value(name, value)
    raise TypeError(f"no JSON codec for {name}: {tp!r}")


def _as_tuple(tp: Any, name: str, value: Any) -> tuple[bool, Any]:
    if not isinstance(value, (list, tuple)):
        return False, value
    args = typing.get_args(tp)
    if not args:
        return True, tuple(value)
    if len(args) == 2 and args[1] is Ellipsis:
        return True, tuple(_coerce(f"{name}[{i}]", args[0], v) for i, v in enumerate(value))
    if len(args) != len(value):
        return False, value
    return True, tuple(_coerce(f"{name}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value, strict=True)))


def _json_value(name: str, value: Any) -> Any:
    """A JSON-able copy (mappings with text keys, lists, text, numbers, booleans, None)."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise InvalidParams(f"{name} must hold plain JSON values: {err}", field=name) from None


_TYPE_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "text", Path: "a path",
               tuple: "a list", dict: "a mapping"}


def _describe(options: list[Any]) -> str:
    return " or ".join(_TYPE_WORDS.get(typing.get_origin(o) or o, str(o)) for o in options)


def build_params(cls: type[GenerationParams], values: Mapping[str, Any], **server_fields: Any) -> GenerationParams:
    """Typed params from plain values by field name; unknown names and wrong types are InvalidParams."""
    types_by_name = _field_types(cls)
    unknown = sorted(set(values) - set(types_by_name))
    if unknown:
        raise InvalidParams(f"Unknown parameter(s) for {cls.__name__}: {', '.join(unknown)}", field=unknown[0])
    typed = {name: _coerce(name, types_by_name[name], value) for name, value in values.items()}
    return cls(**typed, **server_fields)


def encode_params(params: GenerationParams) -> dict[str, Any]:
    """The params' client fields as JSON values (tuples as lists, paths as text)."""
    return {name: _encode(getattr(params, name)) for name in _field_types(type(params))}


def _encode(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_encode(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def decode_params(kind: str, data: Mapping[str, Any], **server_fields: Any) -> GenerationParams:
    return build_params(params_class(kind), data, **server_fields)


@dataclass(frozen=True)
class JobPayload:
    """One job as submitted: typed params (without input images), checkpoint, stored inputs, the request."""

    kind: str
    params: GenerationParams
    checkpoint: str
    inputs: Mapping[str, Any] = field(default_factory=dict)  # init_images: [paths], mask: path
    request: Mapping[str, Any] = field(default_factory=dict)  # echoed as A1111's `parameters`
    warnings: tuple[str, ...] = ()
    source: str = "api"  # "api", "jobs-api", "ui" or "cli"
    script: Mapping[str, Any] | None = None  # {"name": script title, "args": {option: value}}; None: no script
    weights: str = ""  # "fp8" / "fp8-sdxl" / "auto" from the fp8_storage option; "": the server's --weights
    components: Mapping[str, Any] | None = None  # {"sd_vae", "forge_additional_modules"}; None: the worker's

    def to_json(self) -> dict[str, Any]:
        return {"version": PAYLOAD_VERSION, "kind": self.kind, "checkpoint": self.checkpoint,
                "params": encode_params(self.params), "inputs": _json_value("inputs", self.inputs),
                "request": _json_value("request", self.request), "warnings": list(self.warnings),
                "source": self.source,
                **({"script": _json_value("script", self.script)} if self.script else {}),
                **({"weights": self.weights} if self.weights else {}),
                **({"components": _json_value("components", self.components)} if self.components else {})}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], kind: str | None = None) -> JobPayload:
        """The payload back; rows written before payloads had a version (`kind` from the job) still read."""
        kind = data.get("kind", kind)
        params = data.get("params") or {}
        if data.get("version") is None:  # legacy row: drop fields that are no longer params
            params = {k: v for k, v in params.items() if k in field_names(params_class(kind))}
        elif data["version"] != PAYLOAD_VERSION:
            raise InvalidParams(f"job payload version {data['version']!r} is newer than {PAYLOAD_VERSION}")
        return cls(kind=kind, params=decode_params(kind, params), checkpoint=data.get("checkpoint") or "",
                   inputs=dict(data.get("inputs") or {}), request=dict(data.get("request") or {}),
                   warnings=tuple(data.get("warnings") or ()), source=data.get("source", "api"),
                   script=dict(data["script"]) if data.get("script") else None,
                   weights=str(data.get("weights") or ""),
                   components=dict(data["components"]) if data.get("components") else None)
