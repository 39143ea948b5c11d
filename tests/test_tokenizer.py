"""The bundled CLIP tokenizer files and the script that builds them."""
from __future__ import annotations

import gzip
import importlib.util
import json
import zipfile
from pathlib import Path

import pytest

from modules.text.tokenizer import TOKENIZER_DIR, load_tokenizer, special_tokens, tokenize, tokenize_many

ROOT = Path(__file__).resolve().parent.parent
FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")

# Reference ids, cross-checked against open_clip's own SimpleTokenizer over the same BPE data.
EXPECTED = {
    "a photo of a cat": [320, 1125, 539, 320, 2368],
    "Hello, World!": [3306, 267, 1002, 256],
    "café naïve résumé": [15304, 1097, 35689, 563, 29106, 7054, 4166],
    "日本語のテキスト": [39121, 44353, 34002, 252, 21575, 2429, 228, 47121, 32421, 486],
    "a 🐱 and 🚀🔥": [320, 22979, 537, 22400, 3016],
    "emoji👍🏽ok": [16327, 43722, 2481],
    "masterpiece, best quality, (1girl:1.2)": [12066, 267, 949, 3027, 267, 263, 272, 1611, 281, 272, 269, 273, 264],
    "  multiple   spaces\tand\nnewlines ": [6470, 9006, 537, 1218, 3418],
    "don't it's we're": [847, 713, 585, 568, 649, 982],
    "12345 3.14": [272, 273, 274, 275, 276, 274, 269, 272, 275],
    "ÄÖÜ straße": [10896, 7255, 47177, 1894, 127, 253, 324],
    "a,b,c": [320, 267, 321, 267, 322],
    "": [],
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def _tool():
    spec = importlib.util.spec_from_file_location("make_tokenizer", ROOT / "tools" / "make_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bundled_files_exist_and_have_clip_sizes():
    for name in FILES:
        assert (TOKENIZER_DIR / name).is_file(), name
    vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408
    assert sorted(vocab.values()) == list(range(49408))
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["cat</w>"] == 2368
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    lines = (TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert lines[0] == "#version: 0.2" and lines[1] == "i n" and lines[-1] == ""
    assert len(lines) == 1 + 48894 + 1


def test_a_photo_of_a_cat_with_special_tokens(tokenizer):
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tokenizer) == 49408


@pytest.mark.parametrize("text", list(EXPECTED))
def test_exact_ids_without_special_tokens(tokenizer, text):
    assert tokenize(tokenizer, text) == EXPECTED[text]


def test_tokenize_many_matches_single_calls_and_never_truncates(tokenizer):
    texts = list(EXPECTED)
    assert tokenize_many(tokenizer, texts) == [EXPECTED[t] for t in texts]
    assert tokenize_many(tokenizer, []) == []
    assert tokenize(tokenizer, "cat " * 300) == [2368] * 300


def test_special_tokens(tokenizer):
    ids = special_tokens(tokenizer)
    assert (ids.bos, ids.eos, ids.comma) == (49406, 49407, 267)


def test_missing_files_raise_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="make_tokenizer"):
        load_tokenizer(tmp_path)


def test_vocab_is_rebuilt_from_merges_deterministically(tmp_path):
    tool = _tool()
    merges = (TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").split("\n")[1:-1]
    mapping = tool.bytes_to_unicode()
    assert len(set(mapping.values())) == 256 and mapping[ord(" ")] == "Ġ" and mapping[0] == "Ā"
    tool.write_files(tmp_path, merges)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (TOKENIZER_DIR / name).read_bytes(), name


def test_script_reads_a_wheel(tmp_path):
    """main(--wheel) reads the gzip'd BPE list out of a wheel and writes the bundled files."""
    tool = _tool()
    merges = (TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").split("\n")[1:-1]
    bpe = "\n".join(['"bpe_simple_vocab_16e6.txt#version: 0.2', *merges, "extra merges beyond CLIP's 48894"])
    wheel = tmp_path / "open_clip_torch-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(tool.BPE_MEMBER, gzip.compress(bpe.encode("utf-8"), mtime=0))
    out = tmp_path / "out"
    assert tool.main(["--wheel", str(wheel), "--out", str(out)]) == 0
    for name in FILES:
        assert (out / name).read_bytes() == (TOKENIZER_DIR / name).read_bytes(), name


def test_script_rejects_short_bpe_data():
    tool = _tool()
    with pytest.raises(ValueError, match="merges"):
        tool.read_merges(gzip.compress(b"header\ni n\nt h\n"))
