"""Ship the T5 v1.1 tokenizer (FLUX.1's and SD3.5's `tokenizer_2` / `tokenizer_3`) offline.

The files come from the Apache-2.0 `diffsynth` 1.1.7 wheel on PyPI, which bundles the T5 v1.1
SentencePiece vocabulary (32,000 pieces + 100 `<extra_id_N>`, Google's Apache-2.0 T5 release)
as a `tokenizers` JSON file. The wheel is only downloaded, never installed; each file is checked
against its SHA-256 before it is written, so the output is reproducible byte for byte.

Usage:
    python tools/make_t5_tokenizer.py                 # pip download --no-deps diffsynth==1.1.7
    python tools/make_t5_tokenizer.py --wheel W.whl   # a wheel you already have
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "diffsynth==1.1.7"
MEMBER_DIR = "diffsynth/tokenizer_configs/flux/tokenizer_2/"
FILES = {
    "tokenizer.json": "f5dfec163765e18e270537fe896c49f5fad74db1525641d9b255a3008b999596",
    "tokenizer_config.json": "1a3d2db64215ed77854dd4208aac5f8361c1b5471cabd19c0ef1472d1a895eb0",
    "special_tokens_map.json": "7a1985a994c41886db38c719d2a3d2f40606663cc19d7c5d6a85d349320e06d2",
}
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "modules" / "text" / "tokenizer_t5"


def download_wheel(folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", WHEEL,
                    "-d", str(folder)], check=True)
    return next(folder.glob("diffsynth-*.whl"))


def extract(wheel: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        for name, digest in FILES.items():
            data = zf.read(MEMBER_DIR + name)
            got = hashlib.sha256(data).hexdigest()
            if got != digest:
                raise SystemExit(f"{name}: sha256 {got} != expected {digest}")
            (out / name).write_bytes(data)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheel", type=Path)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if args.wheel is not None:
        extract(args.wheel, args.out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            extract(download_wheel(Path(tmp)), args.out)
    print(f"wrote {', '.join(FILES)} to {args.out}")


if __name__ == "__main__":
    main()
