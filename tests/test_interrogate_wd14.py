"""WD14-style ONNX taggers: a tiny random tagger exported by torch in the released layout
(model.onnx NHWC BGR 0-255, selected_tags.csv), its tags against the same torch network on an
independently prepared input, over HTTP on a real server, and the missing / broken file errors."""
from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from modules.errors import CheckpointError
from modules.interrogate import wd14
from modules.interrogate.options import InterrogateOptions
from modules.interrogate.service import InterrogateFolders, Interrogator, ModelMissing
from tests.api_server import start_server

pytest.importorskip("onnxruntime")
SIZE = 32
# (name, category): 9 rating, 0 general, 4 character
TAGS = [("general", 9), ("explicit", 9), ("1girl", 0), ("long_hair", 0), ("smile", 0), ("cat_(animal)", 0),
        ("solo", 0), ("hatsune_miku", 4), ("some_character", 4), ("outdoors", 0)]


class TinyTagger(torch.nn.Module):
    """NHWC 0-255 in, one sigmoid score per tag out, like the released taggers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.head = torch.nn.Linear(8, len(TAGS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.conv(x.permute(0, 3, 1, 2) / 64.0 - 2.0).relu().mean(dim=(2, 3))
        return torch.sigmoid(self.head(features) * 4.0)


def write_tagger(folder) -> TinyTagger:
    folder.mkdir(parents=True, exist_ok=True)
    net = TinyTagger().eval()
    torch.onnx.export(net, (torch.zeros(1, SIZE, SIZE, 3),), str(folder / "model.onnx"), input_names=["input_1"],
                      output_names=["predictions_sigmoid"], dynamo=False)
    rows = "".join(f"{i},{name},{category},{100 - i}\n" for i, (name, category) in enumerate(TAGS))
    (folder / "selected_tags.csv").write_text("tag_id,name,category,count\n" + rows, encoding="utf-8")
    return net


def prepared(image: Image.Image) -> torch.Tensor:
    """The input as the taggers' own scripts prepare it: white background, centred square, BGR."""
    rgb = np.asarray(image.convert("RGB"))
    h, w, _ = rgb.shape
    side = max(h, w)
    canvas = np.full((side, side, 3), 255, dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top:top + h, left:left + w] = rgb
    resized = Image.fromarray(canvas).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(resized, dtype=np.float32)[:, :, ::-1].copy())[None]


def expected_tags(net: TinyTagger, image: Image.Image, options: InterrogateOptions) -> list[str]:
    with torch.no_grad():
        scores = net(prepared(image))[0].tolist()
    kept = [(name, s) for (name, cat), s in zip(TAGS, scores, strict=True)
            if cat != 9 and s >= (0.85 if cat == 4 else 0.35)]
    names = sorted(n for n, _ in kept) if options.deepbooru_sort_alpha else [n for n, _ in
                                                                              sorted(kept, key=lambda t: -t[1])]
    return [n.replace("_", " ").replace("(", "\\(").replace(")", "\\)") for n in names]


def _image(seed: int, size=(40, 24)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("wd14") / "models"
    net = write_tagger(root / "interrogators" / "wd-tiny-tagger")
    return root, net


def test_scores_equal_the_torch_network_on_independently_prepared_input(models):
    root, net = models
    tagger = wd14.Tagger.load(root / "interrogators" / "wd-tiny-tagger")
    for seed, size in ((0, (40, 24)), (1, (24, 40)), (2, (32, 32))):
        image = _image(seed, size)
        with torch.no_grad():
            want = net(prepared(image))[0].numpy()
        np.testing.assert_allclose(tagger.scores(image), want, rtol=1e-5, atol=1e-6)


def test_tags_equal_the_torch_network_on_independently_prepared_input(models):
    root, net = models
    interrogator = Interrogator(InterrogateFolders.under(root))
    options = InterrogateOptions(deepbooru_sort_alpha=False)
    seen = set()
    for seed in range(6):
        image = _image(seed)
        caption = interrogator.interrogate(image, "wd14", options)
        assert (caption.split(", ") if caption else []) == expected_tags(net, image, options)
        assert "general" not in caption and "explicit" not in caption  # ratings are never tags
        seen.update(t for t in caption.split(", ") if t)
    assert len(seen) >= 2  # the random tagger does keep tags, so the comparison means something


def test_missing_tagger_names_the_folder_and_files(tmp_path):
    interrogator = Interrogator(InterrogateFolders.under(tmp_path / "models"))
    with pytest.raises(ModelMissing) as err:
        interrogator.interrogate(_image(0), "wd14")
    assert "model.onnx" in str(err.value) and "selected_tags.csv" in str(err.value)
    assert "interrogators" in str(err.value) and err.value.field == "model"


def test_broken_files_name_the_file(tmp_path):
    folder = tmp_path / "models" / "interrogators" / "bad"
    write_tagger(folder)
    (folder / "selected_tags.csv").write_text("tag_id,name,category,count\n0,a,0,1\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match="scores 10 tags but .*lists 1"):
        Interrogator(InterrogateFolders.under(tmp_path / "models")).interrogate(_image(0), "wd14")
    (folder / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(CheckpointError, match="model.onnx is not a usable ONNX model"):
        Interrogator(InterrogateFolders.under(tmp_path / "models")).interrogate(_image(0), "wd14")


def test_interrogate_api_answers_wd14_and_422_without_a_tagger(models, tmp_path):
    root, net = models
    srv = start_server(root.parent)
    bare = start_server(tmp_path / "bare")
    try:
        image = _image(4)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        body = {"image": base64.b64encode(buffer.getvalue()).decode(), "model": "wd14"}
        response = httpx.post(f"{srv.url}/sdapi/v1/interrogate", json=body, timeout=120)
        assert response.status_code == 200, response.text
        caption = response.json()["caption"]
        assert (caption.split(", ") if caption else []) == expected_tags(net, image, InterrogateOptions())
        missing = httpx.post(f"{bare.url}/sdapi/v1/interrogate", json=body, timeout=120)
        assert missing.status_code == 422 and "selected_tags.csv" in missing.text
    finally:
        srv.stop()
        bare.stop()
