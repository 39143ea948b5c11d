"""The generation engine: the one object every front end talks to. No UI code here."""
from __future__ import annotations

import re
import weakref
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from modules.checkpoints.components import (
    ComponentChoice,
    find_sd_vae,
    is_flow_file,
    pick_modules,
    vae_latent_channels,
)
from modules.checkpoints.discover import find_checkpoints, find_vaes, vae_beside_checkpoint
from modules.checkpoints.load_mmdit import ComponentDirs, chosen_encoders, reload_t5, t5_source_problem
from modules.checkpoints.manager import ModelManager
from modules.checkpoints.model import CheckpointInfo, LoadedModel
from modules.devices import DeviceConfig, apply_attention, apply_memory_format
from modules.errors import CheckpointError, InvalidParams
from modules.interrogate.service import InterrogateFolders, Interrogator
from modules.pipeline.compiled import check_compiler, compile_model
from modules.pipeline.control import JobControl, ProgressCallback
from modules.pipeline.generation import Task, run_task
from modules.pipeline.hooks import NoHooks, StageHooks
from modules.pipeline.img2img import IMG2IMG
from modules.pipeline.job import Job, new_job
from modules.pipeline.memory_policy import MemoryPolicy, policy_from_settings
from modules.pipeline.offload import Placement
from modules.pipeline.params import GenerationParams, Img2ImgParams, Result, Txt2ImgParams
from modules.pipeline.refiner import check_compatible
from modules.pipeline.sampling import SamplerRegistries
from modules.pipeline.t5_release import T5Release, is_freed
from modules.pipeline.tiling import circular_padding
from modules.pipeline.txt2img import TXT2IMG
from modules.pipeline.vae_tiling import VaeTiling
from modules.sampling.padded_heads import pad_self_attention_heads
from modules.sampling.schedules import DiscreteSchedule
from modules.settings import Settings

HooksFactory = Callable[[str], StageHooks]  # task name -> one job's hooks
_TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]{8,64}\]$")  # A1111 titles: "name.safetensors [shorthash]"
_CHECKPOINT_SUFFIX = re.compile(r"\.(safetensors|ckpt|gguf)$", re.IGNORECASE)


def task_for(params: GenerationParams) -> Task:
    """The task a params type runs: txt2img, or img2img (inpainting and outpainting included)."""
    if isinstance(params, Txt2ImgParams):
        return TXT2IMG
    if isinstance(params, Img2ImgParams):
        return IMG2IMG
    raise InvalidParams(f"no task runs {type(params).__name__}")


class Engine:
    """Owns the loaded model and the registries; runs typed jobs.

    `hooks_for(task)` builds one job's hooks (the app passes the plugin layer's JobHooks;
    without it jobs run with `NoHooks`); `demo_checkpoint` is the bundled demo model's path.
    """

    def __init__(self, settings: Settings, registries: SamplerRegistries, devices: DeviceConfig,
                 hooks_for: HooksFactory | None = None, demo_checkpoint: Path | None = None) -> None:
        self.settings = settings
        self.registries = registries
        self.devices = devices
        self.hooks_for = hooks_for
        self.demo_checkpoint = demo_checkpoint
        self.models = ModelManager(settings.hash_cache)
        self.manage_on_cpu = False  # apply a managing policy on the CPU too (tests and overhead benchmarks)
        self.placement = Placement(policy_from_settings(settings), devices.device)  # --memory-policy, --medvram, ...
        self.t5_release: T5Release | None = None  # --t5-after-encoding free: T5 freed and read again
        if settings.compile:
            check_compiler(devices.device, settings.compile_backend, settings.compile_freeze,  # refuse at start
                           self.placement.enabled)
        self._tokenizer = None
        self._per_model: dict[int, dict] = {}
        self.loaded_weights: str | None = None  # the `weights` of the last load (a VAE reload keeps it)
        self.requested_choice = self.loaded_choice = self.default_choice()  # VAE / text encoders asked, loaded
        # "Interrogate CLIP / DeepBooru" on this engine's device (fp32 on the CPU, as the models ship)
        self.interrogator = Interrogator(InterrogateFolders.under(settings.models_dir), devices.device,
                                         devices.dtype if devices.device.type == "cuda" else torch.float32)

    # -- models -------------------------------------------------------------
    def checkpoints(self) -> list[CheckpointInfo]:
        files = [self.settings.ckpt] if self.settings.ckpt else []
        return find_checkpoints(self.settings.checkpoint_dirs, files)

    def default_checkpoint(self) -> CheckpointInfo | None:
        """--ckpt if given; else the first checkpoint found that is not the bundled demo; else the demo."""
        if self.settings.ckpt:
            return self.find_checkpoint(self.settings.ckpt)
        found = self.checkpoints()
        demo_name = self.demo_checkpoint.name if self.demo_checkpoint is not None else None
        others = [i for i in found if Path(i.path).name != demo_name]  # the demo, or a copy
        if others:
            return others[0]
        demo = find_checkpoints([], [self.demo_checkpoint]) if self.demo_checkpoint is not None else []
        return demo[0] if demo else None

    def find_checkpoint(self, name_or_path: str | Path) -> CheckpointInfo:
        path = Path(name_or_path)
        if path.exists():
            found = find_checkpoints([], [path])
            if found:
                return found[0]
        for info in self.checkpoints():
            if str(name_or_path) in (info.name, info.stem, str(info.path)):
                return info
        raise CheckpointError(f"Checkpoint not found: {name_or_path}. Put models in "
                              f"{self.settings.models_dir / 'Stable-diffusion'} or pass --ckpt FILE.")

    def load_model(self, name_or_path: str | Path, choice: ComponentChoice | None = None,
                   weights: str | None = None) -> LoadedModel:
        """Load a checkpoint with the VAE / text encoder `choice` (None: the start-up flags'); `weights`
        ("auto", "fp8", "fp8-sdxl") overrides --weights for this load."""
        self.requested_choice = choice if choice is not None else self.default_choice()
        return self._load(name_or_path, self.requested_choice, weights)

    def _load(self, name_or_path: str | Path, choice: ComponentChoice, weights: str | None) -> LoadedModel:
        info = self.find_checkpoint(name_or_path)
        picked = pick_modules(choice.modules, (self.settings.vae_dir,), self.settings.text_encoder_dirs)
        vae_path = self.vae_for(info, choice, picked.vae)
        components = self.component_dirs(picked.encoders)
        self._per_model.clear()
        self._rebuild_if_t5_stale()
        self.placement.detach()
        model = self.models.load(info, device=self.placement.load_device(), dtype=self.devices.dtype,
                                 vae_path=vae_path, force_v=self.settings.force_v_prediction,
                                 vae_dtype=self.devices.vae_dtype, channels_last_vae=self.devices.channels_last,
                                 components=components, weights=weights or self.settings.weights)
        self.loaded_weights, self.loaded_choice = weights or self.settings.weights, choice
        self._set_attention(model)
        # the UNet measured ~5% slower in NHWC; VAE weights read as NHWC are not copied again
        apply_memory_format([model.vae], self.devices.channels_last)
        if self.settings.compile:
            compile_model(model, self.devices.device, self.settings.data_dir / "cache" / "inductor",
                          self.settings.compile_mode, self.settings.compile_backend, self.settings.compile_freeze)
        self._place(model)
        return model

    def _place(self, model: LoadedModel) -> None:
        """Under a managing policy the model lives on the CPU and each part comes to the device when it runs."""
        self._drop_t5_release(model)
        if self.placement.enabled:
            model.device = self.devices.device
            names = [spec.flavour for spec in model.spec.text_encoders]
            if len(names) != len(model.text_encoders) or len(set(names)) != len(names):
                names = None
            self.placement.attach(model.unet, model.vae, model.text_encoders, names,
                                  "transformer" if model.spec.family is not None else "unet")
        else:
            for module in (model.unet, model.vae, *model.text_encoders):
                module.to(self.devices.device)
        self._free_t5(model)

    def _rebuild_if_t5_stale(self) -> None:
        """A freed T5 whose file is gone or changed cannot be read back: loading the model again rebuilds it."""
        release = self.t5_release
        if release is not None and is_freed(release.t5) and t5_source_problem(release.model.t5_source):
            self.models.invalidate()

    def _drop_t5_release(self, model: LoadedModel) -> None:
        old = self.t5_release
        if old is not None:
            old.detach(reload=old.model is model)  # the same model re-placed: its T5 is read back first
            self.t5_release = None

    def _free_t5(self, model: LoadedModel) -> None:
        """Under `t5_after_encoding == "free"`, T5 is freed after each encoding and read again before it runs."""
        if self.placement.policy.t5_after_encoding != "free" or model.t5_source is None:
            return
        t5 = model.text_encoders[[s.flavour for s in model.spec.text_encoders].index("t5xxl")]
        self.t5_release = T5Release(model, t5, lambda device: reload_t5(model.t5_source, device),
                                    lambda: self.placement.load_device(), lambda: self.placement.forget("t5xxl"))

    def check_memory_policy(self, policy: MemoryPolicy) -> None:
        """InvalidParams when `policy` would move weights that --compile-freeze's frozen graphs hold copies of."""
        placement = Placement(policy, self.devices.device, always=self.manage_on_cpu)
        if self.settings.compile_freeze and placement.enabled:
            raise InvalidParams(f"memory_policy {policy.mode!r} moves weights between the GPU and the CPU, which "
                                "--compile-freeze cannot follow (its frozen graphs keep their own copy on the "
                                "device). Keep the 'none' policy, or restart without --compile-freeze.",
                                field="memory_policy")

    def set_memory_policy(self, policy: MemoryPolicy) -> None:
        """Switch the memory policy; the loaded model is re-placed at once (no reload)."""
        if policy == self.placement.policy:
            return
        self.check_memory_policy(policy)
        self.placement.detach()
        self.placement = Placement(policy, self.devices.device, always=self.manage_on_cpu)
        model = self.models.current
        if model is not None:
            self._place(model)

    def memory_report(self) -> dict:
        """The memory policy, its budget and the resident components (for /sdapi/v1/memory)."""
        return self.placement.report()

    def default_choice(self) -> ComponentChoice:
        return ComponentChoice(sd_vae=self.settings.sd_vae)

    def component_dirs(self, picked: dict[str, Path] | None = None) -> ComponentDirs:
        """Where FLUX.1 / SD3.5 transformer files find the text encoders and VAE they lack; `picked`
        (the picker's text encoders by kind) wins over --text-encoder, which wins over names."""
        dirs = tuple(self.settings.text_encoder_dirs)
        chosen = {**chosen_encoders(self.settings.text_encoders, dirs), **(picked or {})}
        return ComponentDirs(text_encoders=dirs, vaes=(self.settings.vae_dir,), chosen=chosen)

    def vaes(self) -> list[Path]:
        return find_vaes(self.settings.vae_dir)

    def vae_for(self, info: CheckpointInfo, choice: ComponentChoice | None = None,
                picked: Path | None = None) -> Path | None:
        """The picker's VAE when it fits the model (16 latent channels for FLUX.1 / SD3.5, 4 for SD), else
        --vae-path, else (SD1/SD2/SDXL only) the `sd_vae` choice: Automatic (NAME.vae.safetensors beside the
        checkpoint), None (the checkpoint's own), or a file in models/VAE. FLUX.1 / SD3.5 otherwise take
        their VAE from the file or from models/VAE by name."""
        flow = is_flow_file(info.path)
        if picked is not None and vae_latent_channels(picked) in (None, 16 if flow else 4):
            return picked
        if self.settings.vae_path:
            return self.settings.vae_path
        choice = choice if choice is not None else self.default_choice()
        if flow:
            return None
        if choice.sd_vae == "Automatic":
            return vae_beside_checkpoint(info.path) if info.format != "diffusers" else None
        return find_sd_vae(choice.sd_vae, self.settings.vae_dir)

    def refiner_model(self, params: GenerationParams, base: LoadedModel) -> LoadedModel | None:
        """The refiner `params` ask for, loaded beside `base` (which stays loaded), or None (slot freed).

        A missing file or one whose latents differ from `base`'s is a clear error."""
        if not getattr(params, "uses_refiner", False):
            self.models.drop_refiner()
            return None
        info = self._refiner_info(params.refiner_checkpoint)
        if Path(info.path).resolve() == Path(base.info.path).resolve():
            return base
        if self.placement.enabled:
            raise InvalidParams(f"the refiner cannot run with the {self.placement.policy.mode!r} memory policy yet "
                                "(--memory-policy, --medvram, --lowvram, --offload); use the 'none' policy or leave "
                                "the refiner off", field="refiner_checkpoint")
        model = self.models.load_refiner(info, device=self.placement.load_device(), dtype=self.devices.dtype,
                                         vae_path=self.vae_for(info), vae_dtype=self.devices.vae_dtype,
                                         channels_last_vae=self.devices.channels_last,
                                         components=self.component_dirs())
        try:
            check_compatible(base, model)
        except InvalidParams:
            self.models.drop_refiner()
            raise
        self._set_attention(model)
        return model

    def _set_attention(self, model: LoadedModel) -> None:
        """xformers where asked; bf16 on the CPU pads 40-dim self-attention heads to 48 (faster SDPA)."""
        apply_attention([model.unet, model.vae], self.devices.attention)
        if self.devices.pad_attention_heads:
            pad_self_attention_heads(model.unet)

    def _refiner_info(self, name: str) -> CheckpointInfo:
        """A refiner by name, title ('name.safetensors [hash]') or file name; a clear error when missing."""
        bare = _TITLE_HASH.sub("", name.strip())
        for candidate in (bare, _CHECKPOINT_SUFFIX.sub("", bare)):
            try:
                return self.find_checkpoint(candidate)
            except CheckpointError:
                continue
        raise InvalidParams(f"Refiner checkpoint not found: {name}. Put it in "
                            f"{self.settings.models_dir / 'Stable-diffusion'} or choose another refiner.",
                            field="refiner_checkpoint")

    def use_vae(self, sd_vae: str | None) -> None:
        """Reload the current checkpoint when a job's `sd_vae` (an X/Y/Z cell's; None: the requested choice's)
        differs from the loaded one. The checkpoint's requested choice stays what the next job gets back."""
        model, loaded = self.models.current, self.models.vae_path
        if model is None or loaded is False:  # nothing loaded, or a model built by hand (benchmarks, tests)
            return
        wanted = self.requested_choice if sd_vae is None else replace(self.requested_choice, sd_vae=sd_vae)
        if wanted != self.loaded_choice:
            self._load(model.info.path, wanted, self.loaded_weights)

    def require_model(self) -> LoadedModel:
        model = self.models.current
        if model is None:
            raise CheckpointError("No model is loaded. Choose a checkpoint first.")
        return model

    def vae_tiling(self) -> VaeTiling | None:
        """Tile sizes for the VAE when --vae-tiling is on, else None."""
        if not self.settings.vae_tiling:
            return None
        tile = self.settings.vae_tile_size
        return VaeTiling(tile=tile, overlap=max(tile // 4, 1))

    # -- per-model helpers, built once per loaded model ----------------------
    def _cached(self, model: LoadedModel, key: str, build):
        """Per-model helpers; a slot whose model is gone (a released refiner whose id() was reused) starts over."""
        slot = self._per_model.get(id(model))
        if slot is None or slot["model"]() is not model:
            self._per_model = {k: v for k, v in self._per_model.items() if v["model"]() is not None}
            slot = self._per_model[id(model)] = {"model": weakref.ref(model)}
        if key not in slot:
            slot[key] = build()
        return slot[key]

    def tokenizer(self):
        if self._tokenizer is None:
            from modules.text.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer()
        return self._tokenizer

    def text_conditioner(self, model: LoadedModel):
        from modules.text.encoder import TextConditioner

        if model.spec.family is not None:  # FLUX.1 / SD3.5: CLIP pooled + T5 states
            from modules.text.flow_encoder import FlowTextConditioner

            folder = Path(model.info.path) if model.info.format == "diffusers" else None
            return self._cached(model, "text", lambda: FlowTextConditioner(
                model.text_encoders, model.spec.family, self.tokenizer(), folder))
        return self._cached(model, "text", lambda: TextConditioner(
            model.text_encoders, list(model.spec.text_encoders), self.tokenizer()))

    def discrete_schedule(self, model: LoadedModel) -> DiscreteSchedule:
        return self._cached(model, "schedule", lambda: DiscreteSchedule(model.spec.alphas_cumprod()))

    # -- jobs ---------------------------------------------------------------
    def job_hooks(self, task: str) -> StageHooks:
        """The hooks one job calls (prepare_params, guidance, post-processing, saved, wrap points)."""
        return self.hooks_for(task) if self.hooks_for is not None else NoHooks()

    def new_job(self, params: GenerationParams, control: JobControl | None = None,
                on_progress: ProgressCallback | None = None, hooks: StageHooks | None = None) -> Job:
        """A job on the loaded model after the hooks' `prepare`; params are not validated here."""
        task = task_for(params)
        self.use_vae(getattr(params, "sd_vae", None))
        return new_job(self, task.name, params, hooks or self.job_hooks(task.name), control, on_progress)

    def run(self, job: Job) -> Result:
        model = job.model
        release = self.t5_release if self.t5_release is not None and self.t5_release.model is model else None
        if release is not None:
            release.ensure_loaded()  # before the job's LoRA patch, which must land on real weights
        try:
            with circular_padding(bool(getattr(job.params, "tiling", False)), model.unet, model.vae):
                return run_task(job, task_for(job.params))
        finally:
            if release is not None:
                release.free()  # after the patch is reverted

    def generate(self, params: GenerationParams, control: JobControl | None = None,
                 on_progress: ProgressCallback | None = None) -> Result:
        """Run already validated params (the job system validates once, at its edge)."""
        return self.run(self.new_job(params, control, on_progress))

    def txt2img(self, params: Txt2ImgParams, control: JobControl | None = None,
                on_progress: ProgressCallback | None = None) -> Result:
        """The library edge: validate against the server's limits, then generate."""
        params.validate(self.settings.limits)
        return self.generate(params, control, on_progress)

    def img2img(self, params: Img2ImgParams, control: JobControl | None = None,
                on_progress: ProgressCallback | None = None) -> Result:
        """img2img; with `params.mask` inpainting, with `params.outpaint` outpainting. Validates first."""
        params.validate(self.settings.limits)
        return self.generate(params, control, on_progress)
