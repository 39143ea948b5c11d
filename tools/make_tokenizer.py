"""Build CLIP's tokenizer files from the BPE data in open-clip-torch's wheel.

Atelier ships these files so that a first start never needs the hub (A1111 #11507).
The wheel is only downloaded (never installed: it would pull in torchvision), and the
gzipped BPE list inside it is turned into the `vocab.json` / `merges.txt` pair that
`transformers.CLIPTokenizer` reads. The output is deterministic.

Usage:
    python tools/make_tokenizer.py                 # pip download --no-deps open-clip-torch
    python tools/make_tokenizer.py --wheel W.whl   # use a wheel you already have
    python tools/make_tokenizer.py --out DIR       # default: modules/text/tokenizer
"""
from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
MERGES_COUNT = 49152 - 256 - 2  # CLIP's vocabulary size minus the bytes and the two specials
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
VOCAB_SIZE = 49408
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "modules" / "text" / "tokenizer"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters, in CLIP's order."""
    byte_values = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in byte_values]
    shifted = 0
    for b in range(256):
        if b not in byte_values:  # whitespace and control bytes move to chr(256 + n)
            byte_values.append(b)
            chars.append(chr(256 + shifted))
            shifted += 1
    return dict(zip(byte_values, chars, strict=True))


def read_merges(bpe_gz: bytes) -> list[str]:
    """The merge lines of the BPE file: lines 1..48894, after its header line."""
    lines = gzip.decompress(bpe_gz).decode("utf-8").split("\n")
    merges = lines[1:MERGES_COUNT + 1]
    if len(merges) != MERGES_COUNT or any(len(m.split()) != 2 for m in merges):
        raise ValueError(f"unexpected BPE data: {len(merges)} merges")
    return merges


def build_vocab(merges: list[str]) -> dict[str, int]:
    """Bytes, bytes + '</w>', the merges joined, then the two special tokens."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"vocabulary has {len(vocab)} entries, expected {VOCAB_SIZE}")
    return vocab


def tokenizer_config() -> dict[str, object]:
    return {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }


def special_tokens_map() -> dict[str, str]:
    return {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}


def write_files(out: Path, merges: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    vocab = build_vocab(merges)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    for name, data in (("tokenizer_config.json", tokenizer_config()),
                       ("special_tokens_map.json", special_tokens_map())):
        (out / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def download_wheel(dest: Path) -> Path:
    """`pip download --no-deps open-clip-torch` into dest; returns the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "open-clip-torch", "-d", str(dest)]
    subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob("open_clip_torch-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download left no open_clip_torch wheel in {dest}")
    return wheels[-1]


def read_bpe(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(BPE_MEMBER)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheel", type=Path, help="an open_clip_torch wheel; downloaded when omitted")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = ap.parse_args(argv)
    if args.wheel is not None:
        bpe = read_bpe(args.wheel)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            bpe = read_bpe(download_wheel(Path(tmp)))
    write_files(args.out, read_merges(bpe))
    print(f"wrote tokenizer files to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
