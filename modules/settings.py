"""Command-line flags -> a frozen Settings object, built once and passed around."""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
WEIGHT_MODES = ("auto", "fp8")
RNG_SOURCES = ("gpu", "cpu", "nv")
EMPHASIS_MODES = ("Original", "No norm", "Ignore")
SDE_NOISE_MODES = ("brownian", "sequential")


@dataclass(frozen=True)
class Limits:
    """Server policy: the largest job a request may ask for. No job field can raise these."""

    max_size: int = 4096  # pixels a side
    max_batch_size: int = 64
    max_n_iter: int = 10000
    max_steps: int = 1000


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Settings:
    """Everything the engine needs to know about this process. Never mutated."""

    models_dir: Path = REPO_ROOT / "models"
    ckpt: Path | None = None
    ckpt_dirs: tuple[Path, ...] = ()
    vae_path: Path | None = None
    sd_vae: str = "Automatic"  # A1111's "SD VAE": Automatic, None, or a file name in models/VAE
    text_encoders: tuple[str, ...] = ()  # FLUX.1 / SD3.5: chosen files in models/text_encoder (else by name)
    outputs_dir: Path = REPO_ROOT / "outputs"
    data_dir: Path = REPO_ROOT / "data"
    device: str = "auto"
    precision: str = "auto"
    xformers: bool = False
    force_v_prediction: bool = False
    rng_source: str = "gpu"
    clip_skip: int = 1
    emphasis: str = "Original"
    eta_noise_seed_delta: int = 0
    sde_noise: str = "brownian"  # SDE samplers' noise: A1111's seeded Brownian tree, or faster sequential draws
    preview_every: int = 1
    vae_tiling: bool = False  # decode / encode large images tile by tile (bounded memory)
    vae_tile_size: int = 64  # latents per tile side (64 = 512 pixels); tiles overlap by a quarter
    upscaler_tile: int = 0  # model upscalers: input pixels per tile side; 0 = automatic from free memory
    upscaler_tile_overlap: int = 0  # pixels shared by neighbouring tiles; 0 = automatic
    vram: str = "normal"  # "normal", "medvram" (one model on the GPU at a time) or "lowvram" (one block)
    memory_policy: str | None = None  # "none", "normal" or "low" (modules/pipeline/memory_policy.py); None: vram
    offload: str | None = None  # diffusers' names: "none", "model" or "sequential" (mapped onto memory_policy)
    gpu_weights: float | None = None  # GiB of weights kept on the device; None: free memory minus keep_free
    keep_free: float = 2.0  # GiB of device memory left free for activations
    t5_after_encoding: str = "keep"  # "keep" (as the policy says), "cpu" (back to the CPU after encoding), "free"
    max_size: int = 4096
    max_batch_size: int = DEFAULT_LIMITS.max_batch_size
    max_n_iter: int = DEFAULT_LIMITS.max_n_iter
    max_steps: int = DEFAULT_LIMITS.max_steps
    styles_file: Path | None = None  # A1111's format; None: data_dir / "styles.csv" (filled in below)
    extensions_dirs: tuple[Path, ...] = (REPO_ROOT / "extensions",)
    disable_all_extensions: bool = False
    disable_extra_extensions: bool = False  # keep only the bundled extensions
    extensions_allow: tuple[str, ...] | None = None  # None: any extension may load
    enable_insecure_extension_access: bool = False  # allow installs even when listening beyond localhost
    lora_dirs: tuple[Path, ...] = ()  # --lora-dir: searched after models/Lora
    embeddings_dirs: tuple[Path, ...] = ()  # --embeddings-dir: searched after models/embeddings
    controlnet_unit_count: int = 3  # ControlNet units per job (sd-webui-controlnet's control_net_unit_count)
    compile: bool = False  # the denoiser and VAE decoder through torch.compile (inductor)
    compile_mode: str = "default"  # torch.compile mode: default, max-autotune, ...
    compile_backend: str = "inductor"  # any torch.compile backend (openvino once installed)
    compile_freeze: bool = False  # inductor's freezing: prepacked constant weights (a second copy)
    weights: str = "auto"  # --weights fp8: float UNet / transformer weights kept as fp8 (A1111's "FP8 weight")
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.styles_file is None:  # user data lives under the data directory, which git ignores
            object.__setattr__(self, "styles_file", self.data_dir / "styles.csv")

    @property
    def limits(self) -> Limits:
        return Limits(self.max_size, self.max_batch_size, self.max_n_iter, self.max_steps)

    @property
    def checkpoint_dir(self) -> Path:
        """Where users put their checkpoints (searched first)."""
        return self.models_dir / "Stable-diffusion"

    @property
    def checkpoint_dirs(self) -> list[Path]:
        # FLUX.1 / SD3.5 transformers are also kept in unet/ and diffusion_models/ (ComfyUI, Forge)
        return [self.checkpoint_dir, *self.ckpt_dirs, self.models_dir / "unet", self.models_dir / "diffusion_models"]

    @property
    def text_encoder_dirs(self) -> list[Path]:
        """Split CLIP-L / CLIP-G / T5-XXL files for FLUX.1 and SD3.5."""
        return [self.models_dir / "text_encoder", self.models_dir / "clip"]

    @property
    def vae_dir(self) -> Path:
        return self.models_dir / "VAE"

    @property
    def lora_folders(self) -> list[Path]:
        return [self.models_dir / "Lora", *self.lora_dirs]

    @property
    def embedding_folders(self) -> list[Path]:
        return [self.models_dir / "embeddings", *self.embeddings_dirs]

    @property
    def upscaler_folders(self) -> list[Path]:
        """A1111's per-architecture folders, then ComfyUI's shared one."""
        return [self.models_dir / name for name in ("ESRGAN", "RealESRGAN", "SwinIR", "DAT", "HAT", "upscale_models")]

    @property
    def hash_cache(self) -> Path:
        return self.data_dir / "hashes.json"


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by every command; each maps to a Settings field."""
    group = parser.add_argument_group("models and devices")
    group.add_argument("--models-dir", type=Path, help="folder holding Stable-diffusion/, VAE/, Lora/")
    group.add_argument("--ckpt", type=Path, help="checkpoint file or diffusers folder to load")
    group.add_argument("--ckpt-dir", type=Path, action="append", default=[], help="extra checkpoint folder")
    group.add_argument("--vae-path", type=Path, help="VAE file that overrides the checkpoint's VAE")
    group.add_argument("--lora-dir", type=Path, action="append", default=[],
                       help="extra LoRA / LyCORIS folder (models/Lora is always searched)")
    group.add_argument("--embeddings-dir", type=Path, action="append", default=[],
                       help="extra textual-inversion folder (models/embeddings is always searched)")
    group.add_argument("--text-encoder", dest="text_encoders", action="append", default=[],
                       help="FLUX.1 / SD3.5: a clip_l / clip_g / t5xxl file in models/text_encoder to use "
                            "(repeat for each; default: found by name)")
    group.add_argument("--vae", dest="sd_vae", default="Automatic",
                       help="Automatic (NAME.vae.* beside the checkpoint), None, or a file in models/VAE")
    group.add_argument("--outputs-dir", type=Path, help="where images are saved")
    group.add_argument("--data-dir", type=Path, help="caches and state")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    group.add_argument("--precision", choices=PRECISIONS, default="auto",
                       help="compute dtype; fp16 is refused on the CPU")
    group.add_argument("--weights", choices=WEIGHT_MODES, default="auto",
                       help="auto: weights as stored (GGUF and fp8 files stay packed); fp8: keep a float "
                            "checkpoint's UNet / transformer weights as float8, upcast per layer")
    group.add_argument("--xformers", action="store_true", help="use xformers attention when installed")
    group.add_argument("--force-v-prediction", action="store_true", help="treat checkpoints as v-prediction")
    group.add_argument("--rng", dest="rng_source", choices=RNG_SOURCES, default="gpu",
                       help="noise source, as A1111's 'Random number generator source'")
    group.add_argument("--clip-skip", type=int, default=1)
    group.add_argument("--emphasis", choices=EMPHASIS_MODES, default="Original")
    group.add_argument("--eta-noise-seed-delta", type=int, default=0, help="A1111's ENSD")
    group.add_argument("--sde-noise", choices=SDE_NOISE_MODES, default="brownian",
                       help="noise of the DPM++ SDE samplers: brownian (A1111's seeded Brownian tree, "
                            "reproduces A1111) or sequential (per-image draws, faster)")
    add_performance_arguments(parser)


def gib(text: str) -> float:
    """A GiB amount for --gpu-weights / --keep-free: a number, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of GiB") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give 0 or more GiB")
    return value


def add_performance_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("performance and memory")
    group.add_argument("--vae-tiling", action="store_true",
                       help="decode and encode large images tile by tile (blended overlaps), in bounded memory")
    group.add_argument("--vae-tile-size", type=int, default=64, help="VAE tile side in latents (64 = 512 px)")
    group.add_argument("--upscaler-tile", type=int, default=0,
                       help="model upscaler tile side in pixels (0 = automatic from free memory)")
    group.add_argument("--upscaler-tile-overlap", type=int, default=0, help="model upscaler tile overlap (0 = auto)")
    group.add_argument("--compile", action="store_true",
                       help="compile the UNet/transformer and the VAE decoder with torch.compile (the first job "
                            "of each size compiles; cached under DATA_DIR/cache/inductor)")
    group.add_argument("--compile-mode", choices=("default", "max-autotune", "max-autotune-no-cudagraphs"),
                       default="default", help="torch.compile mode for --compile")
    group.add_argument("--compile-backend", default="inductor",
                       help="torch.compile backend for --compile: inductor, or openvino when installed")
    group.add_argument("--compile-freeze", action="store_true",
                       help="--compile with inductor's freezing: weights become prepacked constants (faster on the "
                            "CPU, a second copy of the weights in memory); jobs with a LoRA run uncompiled")
    vram = group.add_mutually_exclusive_group()
    vram.add_argument("--medvram", dest="vram", action="store_const", const="medvram", default="normal",
                      help="keep only the model in use (text encoder, UNet or VAE) on the GPU")
    vram.add_argument("--lowvram", dest="vram", action="store_const", const="lowvram",
                      help="keep only the block in use on the GPU (slowest, least VRAM)")
    vram.add_argument("--memory-policy", choices=("none", "normal", "low"),
                      help="none: all weights on the GPU; normal: components on the CPU, whole on the GPU while the "
                           "budget holds them; low: only the running component, streamed block by block past the budget")
    vram.add_argument("--offload", choices=("none", "model", "sequential"),
                      help="diffusers' names: model = --memory-policy low with no budget limit (one component at "
                           "a time), sequential = low with --gpu-weights 0 (one block at a time)")
    group.add_argument("--gpu-weights", type=gib, help="GiB of weights kept on the GPU (Forge's GPU Weights); "
                                                         "default: free memory minus --keep-free")
    group.add_argument("--keep-free", type=gib, default=2.0,
                       help="GiB of GPU memory left free for activations when --gpu-weights is not given")
    group.add_argument("--t5-after-encoding", choices=("keep", "cpu", "free"), default="keep",
                       help="FLUX.1 / SD3.5: keep T5 as the policy says, send it to the CPU after each encoding, "
                            "or free it and read it again from its file when next needed")
    add_extension_arguments(parser)


def add_extension_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("extensions")
    group.add_argument("--styles-file", type=Path,
                       help="prompt styles in A1111's styles.csv format (default: DATA_DIR/styles.csv)")
    group.add_argument("--extensions-dir", type=Path, action="append", default=[],
                       help="extra folder of extensions (extensions/ is always searched)")
    group.add_argument("--disable-all-extensions", action="store_true", help="load no extensions")
    group.add_argument("--disable-extra-extensions", action="store_true",
                       help="load only the extensions bundled with Atelier")
    group.add_argument("--extensions-allow", help="comma-separated names: only these extensions may load")
    group.add_argument("--enable-insecure-extension-access", action="store_true",
                       help="allow installing extensions and their requirements even when listening beyond localhost")


def settings_from_args(args: argparse.Namespace) -> Settings:
    base = Settings()
    data_dir = args.data_dir or base.data_dir
    return Settings(
        models_dir=args.models_dir or base.models_dir,
        ckpt=args.ckpt,
        ckpt_dirs=tuple(args.ckpt_dir),
        vae_path=args.vae_path,
        lora_dirs=tuple(getattr(args, "lora_dir", ())),
        embeddings_dirs=tuple(getattr(args, "embeddings_dir", ())),
        sd_vae=args.sd_vae,
        text_encoders=tuple(getattr(args, "text_encoders", ())),
        outputs_dir=args.outputs_dir or base.outputs_dir,
        data_dir=data_dir,
        device=args.device,
        precision=args.precision,
        xformers=args.xformers,
        force_v_prediction=args.force_v_prediction,
        rng_source=args.rng_source,
        clip_skip=args.clip_skip,
        emphasis=args.emphasis,
        eta_noise_seed_delta=args.eta_noise_seed_delta,
        sde_noise=getattr(args, "sde_noise", base.sde_noise),
        vae_tiling=getattr(args, "vae_tiling", False),
        vae_tile_size=getattr(args, "vae_tile_size", 64),
        upscaler_tile=getattr(args, "upscaler_tile", 0),
        upscaler_tile_overlap=getattr(args, "upscaler_tile_overlap", 0),
        vram=getattr(args, "vram", "normal"),
        compile=getattr(args, "compile", False) or getattr(args, "compile_freeze", False),
        compile_freeze=getattr(args, "compile_freeze", False),
        compile_mode=getattr(args, "compile_mode", "default"),
        compile_backend=getattr(args, "compile_backend", "inductor"),
        memory_policy=getattr(args, "memory_policy", None),
        offload=getattr(args, "offload", None),
        gpu_weights=getattr(args, "gpu_weights", None),
        keep_free=getattr(args, "keep_free", 2.0),
        t5_after_encoding=getattr(args, "t5_after_encoding", "keep"),
        styles_file=args.styles_file or data_dir / "styles.csv",
        extensions_dirs=(*base.extensions_dirs, *args.extensions_dir),
        disable_all_extensions=args.disable_all_extensions,
        disable_extra_extensions=args.disable_extra_extensions,
        extensions_allow=tuple(n.strip() for n in args.extensions_allow.split(",") if n.strip())
        if args.extensions_allow is not None else None,
        enable_insecure_extension_access=args.enable_insecure_extension_access,
        weights=getattr(args, "weights", "auto"),
    )


def parse_settings(argv: Sequence[str]) -> Settings:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    return settings_from_args(parser.parse_args(list(argv)))
