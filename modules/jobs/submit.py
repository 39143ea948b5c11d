"""The one submit service: every front end (web UI, /sdapi/v1, the jobs API, the CLI) queues jobs here.

A front end turns its own request shape into a `Submission` (params fields by name, decoded
input images, the checkpoint, `override_settings`). The service validates it once, at this
edge, against the server's limits and registries, and raises `InvalidParams` naming the
field; it then stores the input images, builds the typed `JobPayload` and queues it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modules.errors import AtelierError, InvalidParams
from modules.jobs import overrides as job_overrides
from modules.jobs.inputs import discard_inputs, store_inputs
from modules.jobs.manager import JobManager
from modules.jobs.model import Caller, Job
from modules.jobs.payload import (
    IMAGE_FIELDS,
    JobPayload,
    build_params,
    encode_params,
    field_names,
    params_class,
)
from modules.jobs.script_runs import check_script
from modules.settings import Limits


@dataclass(frozen=True)
class Submission:
    """A job as a front end asks for it; `values` are params fields by name (unset ones take defaults)."""

    kind: str  # "txt2img", "img2img" (inpainting is img2img with a mask) or "extras" (upscaling)
    values: Mapping[str, Any]
    images: Mapping[str, Any] = field(default_factory=dict)  # init_images: [PIL images], mask: PIL image
    checkpoint: str | None = None  # None: the server's current sd_model_checkpoint
    overrides: Mapping[str, Any] = field(default_factory=dict)  # A1111's override_settings
    request: Mapping[str, Any] | None = None  # what the client sent, echoed back; None: the params
    warnings: tuple[str, ...] = ()
    source: str = "api"
    script: Mapping[str, Any] | None = None  # {"name": title, "args": [positional] or {named}}


@dataclass(frozen=True)
class SubmitService:
    """Validates submissions once and queues them on the job manager (the only caller of its `submit`)."""

    jobs: JobManager
    limits: Limits
    registries: Any  # samplers and schedulers by name
    options: Callable[[Caller | None], Mapping[str, Any]]  # a caller's A1111 options (None: the server's)
    resolve_checkpoint: Callable[[str | None], tuple[str, str]]  # name (None: current) -> (name, title)
    inputs_dir: Path
    interrogation: Callable[[str], None] | None = None  # model name -> raises when it is not installed
    check_components: Callable[[Mapping[str, Any]], None] | None = None  # raises AtelierError for a bad choice

    def prepare(self, submission: Submission, caller: Caller | None = None) -> JobPayload:
        """The validated payload, input images still in memory; raises InvalidParams naming the field.

        The job starts from `caller`'s options (per-user defaults under auth; None: the server's)."""
        cls = params_class(submission.kind)
        names = field_names(cls)
        self._check_names(submission.values)
        changes, warnings = job_overrides.overridden(submission.overrides, names)
        options = self.options(caller)
        values = {**job_overrides.job_defaults(options, names), **submission.values, **changes}
        images = {k: v for k, v in submission.images.items() if k in IMAGE_FIELDS and v is not None}
        try:
            params = build_params(cls, values, **images)
        except TypeError as err:  # a dataclass refusing an argument
            raise InvalidParams(str(err)) from None
        _validate(params, self.limits, names)
        _check_face_models(params, self.registries)
        params = self._named_refiner(params)
        checkpoint, title = self._checkpoint(submission.checkpoint) if getattr(cls, "needs_checkpoint", True) \
            else ("", "")
        script = check_script(submission, params, self.registries, self._checkpoint_name, self.limits, options,
                              self.interrogation)
        components = self._components(options, submission.overrides) if checkpoint else None
        request = submission.request
        if request is None:
            request = {**encode_params(params), "override_settings": {"sd_model_checkpoint": title}}
        return JobPayload(submission.kind, dataclasses.replace(params, init_images=(), mask=None)
                          if images else params, checkpoint, images, dict(request),
                          (*submission.warnings, *warnings), submission.source, script,
                          job_overrides.job_weights(options, submission.overrides), components)

    def submit(self, caller: Caller, submission: Submission) -> Job:
        """Validate, store the input images beside the job and queue it for `caller`."""
        payload = self.prepare(submission, caller)
        stored = store_inputs(self.inputs_dir, payload.inputs)
        try:
            return self.jobs.submit(caller, payload.kind, dataclasses.replace(payload, inputs=stored).to_json())
        except BaseException:
            discard_inputs(stored)
            raise

    def _check_names(self, values: Mapping[str, Any]) -> None:
        for field_name in ("upscaler_1", "upscaler_2"):  # Extras: pixel upscalers by name
            name = values.get(field_name)
            if name not in (None, "", "None") and (name not in self.registries.upscalers
                                                   or self.registries.upscalers.get(name).is_latent):
                known = ", ".join(s.name for s in self.registries.upscalers if not s.is_latent)
                raise InvalidParams(f"Unknown upscaler {name!r} for {field_name}. Known: {known}", field=field_name)
        sampler = values.get("sampler_name")
        if sampler is not None and sampler not in self.registries.samplers:
            raise InvalidParams(f"Unknown sampler {sampler!r}. Known: {', '.join(self.registries.samplers.names())}",
                                field="sampler_name")
        scheduler = values.get("scheduler")
        if scheduler and str(scheduler).lower() != "automatic" and scheduler not in self.registries.schedulers:
            raise InvalidParams(f"Unknown scheduler {scheduler!r}. "
                                f"Known: Automatic, {', '.join(self.registries.schedulers.names())}",
                                field="scheduler")

    def _named_refiner(self, params: Any) -> Any:
        """The params with their refiner as the checkpoint's name; an unknown refiner is refused here."""
        if not getattr(params, "uses_refiner", False):
            return params
        try:
            name = self.resolve_checkpoint(params.refiner_checkpoint.strip())[0]
        except AtelierError as err:
            raise InvalidParams(f"Refiner checkpoint: {err}", field="refiner_checkpoint") from None
        return dataclasses.replace(params, refiner_checkpoint=name)

    def _components(self, options: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any] | None:
        components = job_overrides.job_components(options, overrides)
        if components and self.check_components is not None:
            try:
                self.check_components(components)
            except AtelierError as err:
                key = next((k for k in job_overrides.COMPONENT_OPTIONS if k in overrides), "sd_vae")
                raise InvalidParams(str(err), field=key) from None
        return components or None

    def _checkpoint_name(self, name: str) -> str:
        try:
            return self.resolve_checkpoint(name)[0]
        except AtelierError as err:
            raise InvalidParams(str(err), field="script_args") from None

    def _checkpoint(self, name: str | None) -> tuple[str, str]:
        try:
            return self.resolve_checkpoint(name)
        except AtelierError as err:
            raise InvalidParams(str(err), field="sd_model_checkpoint") from None


def _check_face_models(params: Any, registries: Any) -> None:
    """Face restoration asked for (restore_faces, Extras' visibilities) needs its files: InvalidParams naming them."""
    wanted = []
    if getattr(params, "restore_faces", False):
        wanted.append((params.face_restoration_model, "restore_faces"))
    if getattr(params, "gfpgan_visibility", 0) > 0:
        wanted.append(("GFPGAN", "gfpgan_visibility"))
    if getattr(params, "codeformer_visibility", 0) > 0:
        wanted.append(("CodeFormer", "codeformer_visibility"))
    faces = getattr(registries, "face_restorers", None)
    for name, field_name in wanted:
        if faces is None:
            raise InvalidParams("Face restoration is not available in this process", field=field_name)
        faces.check(name, field_name)


def _validate(params: Any, limits: Limits, names: frozenset[str]) -> None:
    try:
        params.validate(limits)
    except InvalidParams as err:
        if err.field is None:
            first = str(err).split(" ", 1)[0]
            err.field = first if first in names or first in IMAGE_FIELDS else None
        raise
