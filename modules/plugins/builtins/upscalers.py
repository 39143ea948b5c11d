"""Built-in upscalers, registered through the same hook extensions use.

The latent modes carry A1111's names and `torch.nn.functional.interpolate` settings
(`/sdapi/v1/latent-upscale-modes`); "Lanczos" and "Nearest" resize in pixel space, and
"None" is a plain Lanczos resize, as in A1111's upscaler list. Model files in the upscaler
folders (models/ESRGAN, models/RealESRGAN, ..., models/upscale_models) follow, by file name,
each run by one `ModelUpscaler` per app (tiled, one network cached at a time).
"""
from __future__ import annotations

from typing import Any

from PIL import Image

from modules.errors import CheckpointError, InvalidParams
from modules.plugins.hookspecs import hookimpl
from modules.plugins.specs import UpscalerSpec
from modules.upscalers.discover import UpscalerFile, find_upscalers
from modules.upscalers.runner import ModelUpscaler, TileSettings


def _pil_resize(resample: Image.Resampling):
    def upscale(image: Image.Image, scale: float) -> Image.Image:
        return image.resize((round(image.width * scale), round(image.height * scale)), resample=resample)

    return upscale


def model_upscalers(settings: Any) -> list[UpscalerSpec]:
    """One spec per model file in `settings.upscaler_folders`; none without settings."""
    folders = getattr(settings, "upscaler_folders", None)
    if not folders:
        return []
    runner = ModelUpscaler(TileSettings(tile=settings.upscaler_tile, overlap=settings.upscaler_tile_overlap,
                                        device=settings.device, half=settings.precision != "fp32"))
    return [_spec(runner, found) for found in find_upscalers(folders)]


def _spec(runner: ModelUpscaler, found: UpscalerFile) -> UpscalerSpec:
    def upscale(image: Image.Image, scale: float, progress: Any = None) -> Image.Image:
        try:
            return runner.upscale(image, scale, found.path, progress)
        except CheckpointError as err:  # a model file that cannot be used: the user must replace it (a 4xx)
            raise InvalidParams(f"{err} Upscaler '{found.name}' cannot run; replace or remove the file.") from None

    return UpscalerSpec(found.name, function=upscale, aliases=found.aliases, model_path=str(found.path),
                        scale=found.scale)


@hookimpl
def register_upscalers(settings: Any) -> list[UpscalerSpec]:
    lanczos = _pil_resize(Image.Resampling.LANCZOS)
    return [
        UpscalerSpec("Latent", latent_mode="bilinear"),
        UpscalerSpec("Latent (antialiased)", latent_mode="bilinear", antialias=True),
        UpscalerSpec("Latent (bicubic)", latent_mode="bicubic"),
        UpscalerSpec("Latent (bicubic antialiased)", latent_mode="bicubic", antialias=True),
        UpscalerSpec("Latent (nearest)", latent_mode="nearest"),
        UpscalerSpec("Latent (nearest-exact)", latent_mode="nearest-exact"),
        UpscalerSpec("None", function=lanczos),
        UpscalerSpec("Lanczos", function=lanczos),
        UpscalerSpec("Nearest", function=_pil_resize(Image.Resampling.NEAREST)),
        *model_upscalers(settings),
    ]
