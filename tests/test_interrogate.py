"""Interrogation on tiny random-weight models: DeepDanbooru against a generic TF-SAME ResNet written
here, BLIP captions and CLIP rankings against direct transformers calls, A1111's output formats,
and the clear errors for missing or bad model files."""
from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from modules.errors import CheckpointError, InvalidParams
from modules.interrogate import clip, deepbooru
from modules.interrogate.options import InterrogateOptions, format_tags
from modules.interrogate.service import InterrogateFolders, Interrogator, ModelMissing, resize_and_fill
from tests.interrogate_helpers import TAGS, deepdanbooru_layout, install_models, write_deepdanbooru

SHORT = InterrogateOptions(interrogate_clip_min_length=3, interrogate_clip_max_length=6)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    return install_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def interrogator(models_dir) -> Interrogator:
    return Interrogator(InterrogateFolders.under(models_dir))


def _image(h: int = 40, w: int = 56, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype("uint8"))


# -- DeepDanbooru -----------------------------------------------------------
def _same_conv(x: torch.Tensor, weight: torch.Tensor, bias, stride: int) -> torch.Tensor:
    """TensorFlow's "SAME" padding for any size: out = ceil(in / stride)."""
    pads = []
    for size, k in ((x.shape[3], weight.shape[3]), (x.shape[2], weight.shape[2])):
        total = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.conv2d(F.pad(x, pads), weight, bias, stride)


def _reference_deepdanbooru(sd: dict, pixels: torch.Tensor) -> torch.Tensor:
    layout = {number: (stride, role) for number, _, stride, role in deepdanbooru_layout()}

    def conv(n, x):
        return _same_conv(x, sd[f"n_Conv_{n}.weight"], sd.get(f"n_Conv_{n}.bias"), layout[n][0])

    x = F.relu(conv(0, pixels.permute(0, 3, 1, 2)))
    x = F.max_pool2d(F.pad(x, [0, 1, 0, 1], value=-math.inf), 3, 2)
    numbers = sorted(layout)[1:-1]
    i = 0
    while i < len(numbers):
        n = numbers[i]
        if layout[n][1] == "proj":  # projection first: proj, reduce, mid, expand
            skip, first = conv(n, x), n + 1
            i += 4
        elif layout[numbers[i + 1]][0] == 2:  # a strided block without a projection before: it follows
            skip, first = conv(numbers[i + 3], x), n
            i += 4
        else:
            skip, first = x, n
            i += 3
        h = F.relu(conv(first + 1, F.relu(conv(first, x))))
        x = F.relu(conv(first + 2, h) + skip)
    return torch.sigmoid(conv(numbers[-1] + 1, x).mean(dim=(2, 3)))


def test_deepdanbooru_network_matches_a_generic_same_padded_resnet(tmp_path):
    path = write_deepdanbooru(tmp_path / "model-resnet_custom_v3.pt", width=4, seed=3)
    model = deepbooru.load_deepdanbooru(path)
    assert model.tags == TAGS
    sd = torch.load(path, weights_only=True)
    assert set(model.net.state_dict()) == {k for k in sd if k != "tags"}
    pixels = torch.rand(2, 128, 128, 3, generator=torch.Generator().manual_seed(1))
    expected = _reference_deepdanbooru(sd, pixels)
    torch.testing.assert_close(model.probabilities(pixels), expected, rtol=1e-4, atol=1e-5)


def test_format_tags_follows_a1111_options():
    scores = {"long_hair": 0.9, "smile": 0.6, "blue_(color)": 0.7, "rating:safe": 0.99, "solo": 0.4, "a_b": 0.55}
    assert format_tags(scores, InterrogateOptions()) == r"a b, blue \(color\), long hair, smile"
    by_score = InterrogateOptions(deepbooru_sort_alpha=False, deepbooru_use_spaces=False, deepbooru_escape=False)
    assert format_tags(scores, by_score) == "long_hair, blue_(color), smile, a_b"
    assert format_tags(scores, InterrogateOptions(interrogate_deepbooru_score_threshold=0.35,
                                                  deepbooru_filter_tags="long hair, a_b")) == \
        r"blue \(color\), smile, solo"
    ranks = InterrogateOptions(interrogate_return_ranks=True, deepbooru_sort_alpha=False)
    assert format_tags(scores, ranks) == r"(long hair:0.900), (blue \(color\):0.700), (smile:0.600), (a b:0.550)"


def test_deepdanbooru_interrogation_is_the_formatted_reference(interrogator, models_dir):
    image = _image()
    options = InterrogateOptions(interrogate_deepbooru_score_threshold=0.0, deepbooru_sort_alpha=False)
    text = interrogator.interrogate(image, "deepdanbooru", options)
    sd = torch.load(models_dir / "torch_deepdanbooru" / deepbooru.FILE_NAME, weights_only=True)
    square = np.asarray(resize_and_fill(image, 512), dtype=np.float32) / 255
    probs = _reference_deepdanbooru(sd, torch.from_numpy(square)[None])[0]
    assert text == format_tags(dict(zip(TAGS, probs.tolist(), strict=True)), options)
    assert len(text.split(", ")) == len(TAGS) - 1  # every tag but rating:safe
    assert interrogator.interrogate(image, "deepdanbooru", options) == text  # deterministic


def test_resize_and_fill_centres_and_stretches_edges():
    image = Image.new("RGB", (20, 10), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 20, 1))  # top row blue: it fills the top margin
    square = np.asarray(resize_and_fill(image, 40))
    assert square.shape == (40, 40, 3)
    assert (square[:8, :, 2] > 200).all() and (square[20, :, 0] > 200).all()


# -- CLIP interrogator --------------------------------------------------------
def test_caption_equals_transformers_generate(interrogator, models_dir):
    from transformers import AutoTokenizer, BlipForConditionalGeneration, BlipImageProcessorPil

    folder = models_dir / "BLIP" / "tiny-blip"
    model = BlipForConditionalGeneration.from_pretrained(folder).eval()
    pixels = BlipImageProcessorPil(size={"height": 32, "width": 32})(images=_image(), return_tensors="pt")
    ids = model.generate(pixel_values=pixels["pixel_values"], num_beams=1, min_length=3, max_length=6)
    expected = AutoTokenizer.from_pretrained(folder).decode(ids[0], skip_special_tokens=True)
    assert expected
    assert clip.Captioner.load(folder).caption(_image(), SHORT) == expected


def test_clip_ranking_equals_a_direct_transformers_computation(models_dir):
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    folder = models_dir / "CLIP" / "tiny-clip"
    model, tokenizer = CLIPModel.from_pretrained(folder).eval(), CLIPTokenizer.from_pretrained(folder)
    texts = [line.strip() for line in (clip.Path(clip.__file__).parent / "lists" / "mediums.txt").open()]
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    with torch.no_grad():
        image = model.get_image_features(**processor(images=_image(), return_tensors="pt"))
        tokens = tokenizer(texts, padding=True, return_tensors="pt")
        text = model.get_text_features(**tokens)
    image, text = (getattr(t, "pooler_output", t) for t in (image, text))
    image, text = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)
    probs = (100 * image @ text.T).softmax(dim=-1)[0]
    top = probs.topk(3)
    ranker = clip.Ranker.load(folder)
    ranked = ranker.rank(ranker.image_features(_image()), texts, 3)
    assert [name for name, _ in ranked] == [texts[i] for i in top.indices.tolist()]
    assert [score for _, score in ranked] == pytest.approx((top.values * 100).tolist(), rel=1e-4)
    calls = []
    ranker.model.text_model.register_forward_hook(lambda *_: calls.append(1))
    assert ranker.rank(ranker.image_features(_image()), texts, 3) == ranked and not calls  # cached features
    ranker.rank(ranker.image_features(_image()), texts[:5], 3)
    assert calls  # another list is encoded


def test_clip_interrogation_format(interrogator):
    text = interrogator.interrogate(_image(), "clip", SHORT)
    lists = clip.read_categories(clip.Path(clip.__file__).parent / "lists", SHORT)
    assert [c.name for c in lists] == ["artists", "mediums", "movements", "flavors"]
    parts = text.split(", ")
    caption = clip.Captioner.load(interrogator.blip_folder()).caption(_image(), SHORT)
    assert text.startswith(caption + ", by ")
    tail = parts[-6:]  # one artist, one medium, one movement, three flavors
    for part, category in zip(tail, [lists[0], lists[1], lists[2], lists[3], lists[3], lists[3]], strict=True):
        assert part in category.items
    assert interrogator.interrogate(_image(), "clip", SHORT) == text  # deterministic


def test_clip_options_skip_limit_and_ranks(interrogator, tmp_path):
    options = InterrogateOptions(interrogate_clip_min_length=3, interrogate_clip_max_length=6,
                                 interrogate_clip_skip_categories=("artists", "flavors"), interrogate_return_ranks=True,
                                 interrogate_clip_dict_limit=2)
    text = interrogator.interrogate(_image(), "clip", options)
    ranked = text.split(", ")[-2:]
    mediums = clip.read_categories(interrogator.list_folder(), options)[0]
    assert mediums.name == "mediums" and len(mediums.items) == 2
    assert ranked[0].startswith("(") and ranked[0].split(":")[0][1:] in mediums.items
    assert 0 < float(ranked[0].rstrip(")").rsplit(":", 1)[1]) <= 1


def test_user_lists_replace_the_bundled_ones(models_dir, tmp_path):
    folders = InterrogateFolders.under(models_dir)
    lists = tmp_path / "interrogate"
    lists.mkdir()
    (lists / "colours.top2.txt").write_text("red\ngreen\nblue\n", encoding="utf-8")
    interrogator = Interrogator(InterrogateFolders(folders.blip, folders.clip, folders.deepdanbooru, lists))
    parts = interrogator.interrogate(_image(), "clip", SHORT).split(", ")
    assert len(set(parts[-2:])) == 2 and set(parts[-2:]) <= {"red", "green", "blue"}


# -- errors -------------------------------------------------------------------
def test_missing_models_name_the_folder_and_files(tmp_path):
    empty = Interrogator(InterrogateFolders.under(tmp_path))
    with pytest.raises(ModelMissing, match=r"model-resnet_custom_v3\.pt .* in .*torch_deepdanbooru"):
        empty.interrogate(_image(), "deepdanbooru")
    with pytest.raises(ModelMissing, match=r"BLIP captioning model.*BLIP.*model\.safetensors"):
        empty.interrogate(_image(), "clip")
    install_models(tmp_path, ("blip",))
    with pytest.raises(ModelMissing, match=r"CLIP model.*clip_interrogator or .*CLIP"):
        empty.interrogate(_image(), "clip")
    with pytest.raises(InvalidParams, match="Unknown interrogation model 'blip9'"):
        empty.interrogate(_image(), "blip9")


def test_a_pickle_with_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "torch_deepdanbooru" / deepbooru.FILE_NAME
    path.parent.mkdir()
    torch.save({"tags": ["a"], "n_Conv_0.weight": Payload()}, path, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(CheckpointError, match="cannot be read as weights only"):
        Interrogator(InterrogateFolders.under(tmp_path)).interrogate(_image(), "deepdanbooru")
    assert not marker.exists()


def test_bad_deepdanbooru_files_are_clear_and_the_loaded_model_keeps_working(tmp_path):
    folder = tmp_path / "torch_deepdanbooru"
    good = write_deepdanbooru(folder / deepbooru.FILE_NAME)
    interrogator = Interrogator(InterrogateFolders.under(tmp_path))
    before = interrogator.interrogate(_image(), "deepdanbooru")
    sd = torch.load(good, weights_only=True)
    for name, broken, message in (("no-tags.pt", {k: v for k, v in sd.items() if k != "tags"}, "no list of tags"),
                                  ("few-tags.pt", {**sd, "tags": ["a"]}, "8 outputs but 1 tags"),
                                  ("no-head.pt", {k: v for k, v in sd.items() if "n_Conv_178" not in k},
                                   r"n_Conv_178\.weight is missing")):
        path = folder / name
        torch.save(broken, path)
        with pytest.raises(CheckpointError, match=message):
            deepbooru.load_deepdanbooru(path)
    assert interrogator.interrogate(_image(), "deepdanbooru") == before


def test_options_are_checked():
    assert InterrogateOptions.from_options({"deepbooru_use_spaces": False, "unrelated": 1}).deepbooru_use_spaces is False
    with pytest.raises(InvalidParams, match="interrogate_deepbooru_score_threshold must be a number from 0 to 1"):
        InterrogateOptions.from_options({"interrogate_deepbooru_score_threshold": 3})
    with pytest.raises(InvalidParams, match="interrogate_clip_min_length must not exceed"):
        InterrogateOptions.from_options({"interrogate_clip_min_length": 50, "interrogate_clip_max_length": 10})


def test_a_model_folder_without_safetensors_is_refused_by_name(models_dir, tmp_path):
    import shutil

    blip = shutil.copytree(models_dir / "BLIP" / "tiny-blip", tmp_path / "BLIP" / "no-weights")
    (blip / "model.safetensors").unlink()
    (blip / "pytorch_model.bin").write_bytes(b"a pickle is never read")
    folders = InterrogateFolders.under(models_dir)
    interrogator = Interrogator(InterrogateFolders(tmp_path / "BLIP", folders.clip, folders.deepdanbooru,
                                                   folders.lists))
    with pytest.raises(CheckpointError, match=r"The BLIP model in .*no-weights cannot be loaded.*model\.safetensors"):
        interrogator.interrogate(_image(), "clip", SHORT)
