"""The app's face restorers: model files found in the models folders, one network cached at a time.

Restorers are named as A1111 names them ("CodeFormer", "GFPGAN") plus "RestoreFormer"; each is
available when its file and a RetinaFace detection file are present. Files are recognised by name
(`*codeformer*`, `*gfpgan*`, `*restoreformer*`, `detection_Resnet50_Final`, `detection_mobilenet0.25_Final`);
the architecture itself is read from the keys when the file is loaded. Nothing is downloaded.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from modules.errors import InvalidParams
from modules.faces import load, restore
from modules.faces.restore import DetectOptions

SUFFIXES = (".pth", ".safetensors", ".ckpt")
RESTORER_FOLDERS = ("Codeformer", "GFPGAN", "facerestore_models")
DETECTOR_FOLDERS = ("facedetection", "GFPGAN", "Codeformer", "facerestore_models")
# restorer name -> (file-name marker, the file users fetch)
KNOWN = {
    "CodeFormer": ("codeformer", "codeformer-v0.1.0.pth (sczhou/CodeFormer releases) into models/Codeformer"),
    "GFPGAN": ("gfpgan", "GFPGANv1.4.pth or GFPGANv1.3.pth (TencentARC/GFPGAN releases) into models/GFPGAN"),
    "RestoreFormer": ("restoreformer", "RestoreFormer++.ckpt (wzhouxiff/RestoreFormerPlusPlus releases) or "
                      "RestoreFormer.pth (TencentARC/GFPGAN releases) into models/GFPGAN"),
}
DETECTOR_HINT = ("detection_Resnet50_Final.pth or detection_mobilenet0.25_Final.pth (xinntao/facexlib releases) "
                 "into models/facedetection (or models/GFPGAN)")
DEFAULT_WEIGHT = 0.5  # A1111's CodeFormer weight option default


def canonical_name(name: str) -> str | None:
    """A restorer's own spelling ("codeformer" -> "CodeFormer"); None for unknown names."""
    return {n.lower(): n for n in KNOWN}.get(str(name).strip().lower())


def _files(folders: list[Path]) -> list[Path]:
    found = []
    for folder in folders:
        if folder.is_dir():
            found += sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES
                            and not p.name.startswith("."))
    return found


@dataclass(frozen=True)
class RestorerInfo:
    name: str
    path: Path | None  # None: no file yet


class FaceRestorers:
    """Finds face model files under `models_dir`; restores faces, keeping one network per restorer."""

    def __init__(self, models_dir: Path | None, device: str = "auto", options: DetectOptions | None = None) -> None:
        self.models_dir = Path(models_dir) if models_dir is not None else None  # None: no files (tests, tools)
        self.device = device
        self.options = options or DetectOptions()
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[Path, object]] = {}

    def _folders(self, names: tuple[str, ...]) -> list[Path]:
        return [self.models_dir / name for name in names] if self.models_dir is not None else []

    def restorer_file(self, name: str) -> Path | None:
        marker = KNOWN[name][0]
        files = [p for p in _files(self._folders(RESTORER_FOLDERS)) if marker in p.stem.lower()]
        if name == "GFPGAN":  # RestoreFormer files are not GFPGAN
            files = [p for p in files if "restoreformer" not in p.stem.lower()]
        files.sort(key=lambda p: p.stem, reverse=True)  # GFPGANv1.4 before v1.3, RestoreFormer++ before v1
        return files[0] if files else None

    def detector_file(self) -> Path | None:
        files = [p for p in _files(self._folders(DETECTOR_FOLDERS))
                 if p.stem.lower().startswith("detection_") or "retinaface" in p.stem.lower()]
        files.sort(key=lambda p: "resnet50" not in p.stem.lower())  # ResNet-50 first, as facexlib's default
        return files[0] if files else None

    def restorers(self) -> list[RestorerInfo]:
        """Every restorer with the file it would use (A1111's /sdapi/v1/face-restorers lists them all)."""
        return [RestorerInfo(name, self.restorer_file(name)) for name in KNOWN]

    def names(self) -> list[str]:
        return list(KNOWN)

    def check(self, name: str, field: str = "face_restoration_model") -> None:
        """Raise InvalidParams naming the files to fetch when `name` cannot run."""
        canonical = canonical_name(name)
        if canonical is None:
            raise InvalidParams(f"Unknown face restoration model {name!r}. Known: {', '.join(KNOWN)}", field=field)
        missing = []
        if self.restorer_file(canonical) is None:
            missing.append(KNOWN[canonical][1])
        if self.detector_file() is None:
            missing.append(DETECTOR_HINT)
        if missing:
            raise InvalidParams(f"Face restoration with {canonical} needs model files that are not installed. Put "
                                f"{'; and '.join(missing)}. Atelier downloads nothing; restart after adding them.",
                                field=field)

    def canonical(self, name: str) -> str:
        self.check(name)
        return canonical_name(name)

    def _device(self) -> torch.device:
        if self.device not in ("auto", ""):
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _cached(self, slot: str, path: Path, loader) -> object:
        held = self._cache.get(slot)
        if held is None or held[0] != path:
            self._cache.pop(slot, None)  # free the previous network first
            self._cache[slot] = (path, loader(path))
        return self._cache[slot][1]

    def restore(self, image: Image.Image, name: str, weight: float = DEFAULT_WEIGHT,
                visibility: float = 1.0) -> Image.Image:
        """`image` with its faces restored by restorer `name`, blended at `visibility`."""
        name = self.canonical(name)
        if visibility <= 0:
            return image
        with self._lock:
            model = self._cached(name, self.restorer_file(name), load.load_restorer)
            detector = self._cached("detector", self.detector_file(), load.load_detector)
            device = self._device()
            model.net.to(device)
            detector.to(device)
            try:
                restored, _ = restore.restore_faces(image, detector, model, weight, self.options)
            finally:
                model.net.to("cpu")
                detector.to("cpu")
        return restore.blend(image.convert("RGB"), restored, visibility)
