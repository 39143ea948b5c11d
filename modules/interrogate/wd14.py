"""WD14-style ONNX taggers (SmilingWolf's wd-v1-4 / wd-v3 families) through onnxruntime.

A tagger is a folder as its Hugging Face repository holds it: `model.onnx` (NHWC float32 input,
BGR, 0-255, one score in [0, 1] per tag) and `selected_tags.csv` (`tag_id,name,category,count`;
category 9 is the rating, 4 a character, 0 a general tag).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from modules.errors import CheckpointError, InvalidParams

MODEL_FILE, TAGS_FILE = "model.onnx", "selected_tags.csv"
RATING, CHARACTER = 9, 4
GENERAL_THRESHOLD, CHARACTER_THRESHOLD = 0.35, 0.85  # the taggers' published defaults


def find_folder(folder: Path) -> Path | None:
    """`folder` itself or its first sub-folder (by name) holding both files."""
    candidates = [folder, *sorted(p for p in folder.iterdir() if p.is_dir())] if folder.is_dir() else []
    return next((c for c in candidates if (c / MODEL_FILE).is_file() and (c / TAGS_FILE).is_file()), None)


def square_input(image: Image.Image, size: int) -> np.ndarray:
    """The tagger's input: transparency and margins white, padded to a centred square, resized
    (bicubic) to size x size, as a 1 x size x size x 3 BGR float32 array of 0-255."""
    rgba = image.convert("RGBA")
    flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    flat.alpha_composite(rgba)
    side = max(flat.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(flat.convert("RGB"), ((side - flat.width) // 2, (side - flat.height) // 2))
    pixels = np.asarray(square.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    return np.ascontiguousarray(pixels[None, :, :, ::-1])


@dataclass
class Tagger:
    session: Any
    input_name: str
    size: int
    tags: list[str]
    categories: list[int]

    @classmethod
    def load(cls, folder: Path) -> Tagger:
        try:
            import onnxruntime
        except ImportError:
            raise InvalidParams("WD14 tagging needs onnxruntime: pip install onnxruntime", field="model") from None
        tags, categories = read_tags(folder / TAGS_FILE)
        try:
            session = onnxruntime.InferenceSession(str(folder / MODEL_FILE), providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own Fail / InvalidGraph types
            raise CheckpointError(f"{folder / MODEL_FILE} is not a usable ONNX model ({err}). "
                                  "Download the tagger's model.onnx again.") from None
        inputs, outputs = session.get_inputs(), session.get_outputs()
        shape = inputs[0].shape
        if len(shape) != 4 or not isinstance(shape[1], int) or shape[1] != shape[2] or shape[3] != 3:
            raise CheckpointError(f"{folder / MODEL_FILE} takes input {shape}, not a square NHWC RGB image; "
                                  "it is not a WD14-style tagger.")
        width = outputs[0].shape[-1]
        if isinstance(width, int) and width != len(tags):
            raise CheckpointError(f"{folder / MODEL_FILE} scores {width} tags but {folder / TAGS_FILE} lists "
                                  f"{len(tags)}; use the two files of the same tagger.")
        return cls(session, inputs[0].name, shape[1], tags, categories)

    def scores(self, image: Image.Image) -> np.ndarray:
        return self.session.run(None, {self.input_name: square_input(image, self.size)})[0][0]

    def kept(self, image: Image.Image) -> dict[str, float]:
        """Character tags at or above 0.85 and general tags at or above 0.35; ratings dropped."""
        out = {}
        for tag, category, score in zip(self.tags, self.categories, self.scores(image).tolist(), strict=True):
            threshold = CHARACTER_THRESHOLD if category == CHARACTER else GENERAL_THRESHOLD
            if category != RATING and score >= threshold:
                out[tag] = score
        return out


def read_tags(path: Path) -> tuple[list[str], list[int]]:
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        return [row["name"] for row in rows], [int(row["category"]) for row in rows]
    except (OSError, KeyError, TypeError, ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not a tagger's tag list (columns name and category): {err}") from None
