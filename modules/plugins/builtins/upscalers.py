"""Built-in hires-fix upscalers, registered through the same hook extensions use.

The latent modes carry A1111's names and `torch.nn.functional.interpolate` settings
(`/sdapi/v1/latent-upscale-modes`); "Lanczos" and "Nearest" resize in pixel space, and
"None" is a plain Lanczos resize, as in A1111's upscaler list.
"""
from __future__ import annotations

from PIL import Image

from modules.plugins.hookspecs import hookimpl
from modules.plugins.specs import UpscalerSpec


def _pil_resize(resample: Image.Resampling):
    def upscale(image: Image.Image, scale: float) -> Image.Image:
        return image.resize((round(image.width * scale), round(image.height * scale)), resample=resample)

    return upscale


@hookimpl
def register_upscalers() -> list[UpscalerSpec]:
    return [
        UpscalerSpec("Latent", latent_mode="bilinear"),
        UpscalerSpec("Latent (antialiased)", latent_mode="bilinear", antialias=True),
        UpscalerSpec("Latent (bicubic)", latent_mode="bicubic"),
        UpscalerSpec("Latent (bicubic antialiased)", latent_mode="bicubic", antialias=True),
        UpscalerSpec("Latent (nearest)", latent_mode="nearest"),
        UpscalerSpec("Latent (nearest-exact)", latent_mode="nearest-exact"),
        UpscalerSpec("None", function=_pil_resize(Image.Resampling.LANCZOS)),
        UpscalerSpec("Lanczos", function=_pil_resize(Image.Resampling.LANCZOS)),
        UpscalerSpec("Nearest", function=_pil_resize(Image.Resampling.NEAREST)),
    ]
