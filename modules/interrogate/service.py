"""The interrogator one engine owns: finds the models in the models folder, loads them once, and
runs "clip" (BLIP caption + CLIP ranking), "deepdanbooru" or "wd14" (tags) on an image.

Models are never downloaded. A missing model raises `ModelMissing` (an InvalidParams: a 422 from
the API, a message in the UI) naming the folder and the files to put there.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from modules.errors import InvalidParams
from modules.interrogate import clip, deepbooru, wd14
from modules.interrogate.options import InterrogateOptions, format_tags

log = logging.getLogger(__name__)

MODELS = ("clip", "deepdanbooru", "wd14")
WD14_FOLDER = "interrogators"  # the A1111 WD14 tagger extension's folder
BUNDLED_LISTS = Path(__file__).resolve().parent / "lists"
CLIP_FOLDERS = ("clip_interrogator", "CLIP")


class ModelMissing(InvalidParams):
    """An interrogation model is not installed; the message names the folder and the files."""


@dataclass(frozen=True)
class InterrogateFolders:
    blip: Path
    clip: tuple[Path, ...]
    deepdanbooru: Path
    lists: Path  # user lists; the bundled ones are used when it holds no .txt
    wd14: Path | None = None  # WD14-style ONNX taggers, one folder each

    @classmethod
    def under(cls, models_dir: Path) -> InterrogateFolders:
        models_dir = Path(models_dir)
        return cls(models_dir / "BLIP", tuple(models_dir / name for name in CLIP_FOLDERS),
                   models_dir / "torch_deepdanbooru", models_dir / "interrogate", models_dir / WD14_FOLDER)


def hf_folder(folder: Path, model_type: str) -> Path | None:
    """`folder` itself or its first sub-folder (by name) holding a config.json of `model_type`."""
    candidates = [folder, *sorted(p for p in folder.iterdir() if p.is_dir())] if folder.is_dir() else []
    for candidate in candidates:
        config = candidate / "config.json"
        if config.is_file():
            try:
                kind = json.loads(config.read_text(encoding="utf-8")).get("model_type")
            except (ValueError, OSError, AttributeError):
                continue
            if kind == model_type:
                return candidate
    return None


def resize_and_fill(image: Image.Image, size: int) -> Image.Image:
    """A1111's "resize and fill": fit inside size x size, centred, edges stretched into the margins."""
    image = image.convert("RGB")
    if image.width >= image.height:  # A1111's integer sizes and offsets
        w, h = size, max(1, image.height * size // image.width)
    else:
        w, h = max(1, image.width * size // image.height), size
    array = np.asarray(image.resize((w, h), Image.Resampling.LANCZOS))
    left, top = size // 2 - w // 2, size // 2 - h // 2
    padded = np.pad(array, ((top, size - h - top), (left, size - w - left), (0, 0)), mode="edge")
    return Image.fromarray(padded)


class Interrogator:
    """Interrogation for one device. Thread-safe: one image at a time; models cached after first use."""

    def __init__(self, folders: InterrogateFolders, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.folders = folders
        self.device = torch.device(device)
        self.dtype = dtype
        self._lock = threading.Lock()
        self._loaded: dict[tuple[str, Path], Any] = {}

    # -- finding models -----------------------------------------------------
    def blip_folder(self) -> Path:
        found = hf_folder(self.folders.blip, "blip")
        if found is None:
            raise ModelMissing(
                f"CLIP interrogation needs a BLIP captioning model, and none is in {self.folders.blip}. Put a "
                "Hugging Face folder there, e.g. Salesforce/blip-image-captioning-large as "
                f"{self.folders.blip / 'blip-image-captioning-large'} (config.json, model.safetensors, "
                "tokenizer.json or vocab.txt, tokenizer_config.json).", field="model")
        return found

    def clip_folder(self) -> Path:
        for folder in self.folders.clip:
            found = hf_folder(folder, "clip")
            if found is not None:
                return found
        where = " or ".join(str(f) for f in self.folders.clip)
        raise ModelMissing(
            f"CLIP interrogation needs a CLIP model, and none is in {where}. Put a Hugging Face folder there, "
            f"e.g. openai/clip-vit-large-patch14 as {self.folders.clip[0] / 'clip-vit-large-patch14'} "
            "(config.json, model.safetensors, vocab.json, merges.txt, tokenizer_config.json).", field="model")

    def deepdanbooru_file(self) -> Path:
        folder = self.folders.deepdanbooru
        files = sorted(folder.glob("*.pt")) if folder.is_dir() else []
        preferred = [f for f in files if f.name == deepbooru.FILE_NAME]
        if not files:
            raise ModelMissing(
                f"DeepDanbooru needs {deepbooru.FILE_NAME} (the TorchDeepDanbooru port A1111 uses) in {folder}.",
                field="model")
        return (preferred or files)[0]

    def wd14_folder(self) -> Path:
        folder = self.folders.wd14
        found = wd14.find_folder(folder) if folder is not None else None
        if found is None:
            raise ModelMissing(
                f"WD14 tagging needs a tagger folder in {folder}: {wd14.MODEL_FILE} and {wd14.TAGS_FILE} from a "
                f"SmilingWolf tagger, e.g. wd-v1-4-moat-tagger-v2 as {folder / 'wd-v1-4-moat-tagger-v2' if folder else ''}.",
                field="model")
        return found

    def list_folder(self) -> Path:
        user = self.folders.lists
        return user if user.is_dir() and any(user.glob("*.txt")) else BUNDLED_LISTS

    def check(self, model: str) -> None:
        """Raise InvalidParams for an unknown model, ModelMissing when its files are absent."""
        if model == "clip":
            self.blip_folder()
            self.clip_folder()
        elif model == "deepdanbooru":
            self.deepdanbooru_file()
        elif model == "wd14":
            self.wd14_folder()
        else:
            raise InvalidParams(f"Unknown interrogation model {model!r}; use one of {', '.join(MODELS)}",
                                field="model")

    # -- running --------------------------------------------------------------
    def interrogate(self, image: Image.Image, model: str, options: InterrogateOptions | None = None) -> str:
        """The prompt text for `image`: a caption with list matches ("clip"), or tags ("deepdanbooru")."""
        options = options or InterrogateOptions()
        self.check(model)
        with self._lock:
            if model == "clip":
                return self._clip(image, options)
            if model == "wd14":
                return self._wd14(image, options)
            return self._deepdanbooru(image, options)

    def _cached(self, kind: str, path: Path, load: Callable[[Path], Any]) -> Any:
        key = (kind, path)
        if key not in self._loaded:
            for old in [k for k in self._loaded if k[0] == kind]:  # one file per kind in memory
                del self._loaded[old]
            log.info("loading %s interrogation model %s", kind, path)
            self._loaded[key] = load(path)
        return self._loaded[key]

    @contextmanager
    def _on_device(self, modules: list[torch.nn.Module], options: InterrogateOptions):
        for module in modules:
            module.to(self.device, self.dtype)
        try:
            yield
        finally:
            if not options.interrogate_keep_models_in_memory and self.device.type != "cpu":
                for module in modules:
                    module.to("cpu")

    def _clip(self, image: Image.Image, options: InterrogateOptions) -> str:
        captioner = self._cached("blip", self.blip_folder(), clip.Captioner.load)
        ranker = self._cached("clip", self.clip_folder(), clip.Ranker.load)
        categories = clip.read_categories(self.list_folder(), options)
        with self._on_device([captioner.model, ranker.model], options):
            return clip.interrogate_clip(captioner, ranker, categories, image, options)

    def _deepdanbooru(self, image: Image.Image, options: InterrogateOptions) -> str:
        tagger = self._cached("deepdanbooru", self.deepdanbooru_file(), deepbooru.load_deepdanbooru)
        square = resize_and_fill(image, deepbooru.INPUT_SIZE)
        pixels = torch.from_numpy(np.asarray(square, dtype=np.float32) / 255).unsqueeze(0)
        with self._on_device([tagger.net], options):
            probs = tagger.probabilities(pixels)[0]
        return format_tags(dict(zip(tagger.tags, probs.tolist(), strict=True)), options)

    def _wd14(self, image: Image.Image, options: InterrogateOptions) -> str:
        """The tagger's own thresholds (general 0.35, character 0.85), then A1111's tag formatting options."""
        tagger = self._cached("wd14", self.wd14_folder(), wd14.Tagger.load)
        kept = tagger.kept(image)
        return format_tags(kept, dataclasses.replace(options, interrogate_deepbooru_score_threshold=0.0))
