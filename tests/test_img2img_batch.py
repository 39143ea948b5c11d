"""img2img Batch from folders: which folders a caller may use (local vs shared server); the browser test
(tests/test_img2img_batch_browser.py) runs a batch end to end."""
from __future__ import annotations

from pathlib import Path

import pytest

from modules.app import build_app
from modules.errors import InvalidParams
from modules.jobs.model import Caller
from modules.server.batch_dirs import batch_images, resolve_dirs
from modules.server.config import ServerConfig
from modules.server.context import build_context
from modules.settings import Settings


def _context(tmp_path: Path, **config):
    settings = Settings(models_dir=tmp_path / "models", outputs_dir=tmp_path / "outputs", data_dir=tmp_path / "data",
                        device="cpu", precision="fp32")
    return build_context(build_app(settings), ServerConfig(preload_model=False, **config))


def test_shared_server_keeps_each_user_in_their_own_batch_folder(tmp_path: Path) -> None:
    ctx = _context(tmp_path, listen=True, gradio_auth=(("alice", "a"), ("bob", "b")))
    alice, bob = Caller("alice"), Caller("bob")
    mine = tmp_path / "data" / "batch" / "alice"
    (mine / "in").mkdir(parents=True)
    (tmp_path / "data" / "batch" / "bob" / "in").mkdir(parents=True)
    dirs = resolve_dirs(ctx, alice, "in", "out", "")
    assert dirs.input == (mine / "in").resolve() and dirs.output == (mine / "out").resolve() and dirs.mask is None
    for bad in ("../bob/in", str(tmp_path / "data" / "batch" / "bob" / "in"), "/etc", str(tmp_path / "models")):
        with pytest.raises(InvalidParams, match="outside your batch folder"):
            resolve_dirs(ctx, alice, bad, "out", "")
    with pytest.raises(InvalidParams, match="output_dir|outside your batch folder"):
        resolve_dirs(ctx, alice, "in", "/tmp/elsewhere", "")
    (mine / "link").symlink_to(tmp_path / "data" / "batch" / "bob" / "in")  # a link out of the folder
    with pytest.raises(InvalidParams, match="outside your batch folder"):
        resolve_dirs(ctx, alice, "link", "out", "")
    with pytest.raises(InvalidParams, match="is not a folder"):
        resolve_dirs(ctx, bob, "nope", "out", "")
    assert resolve_dirs(ctx, alice, "in", "", "").output == mine / "output"


def test_local_server_takes_any_folder_and_matches_masks_by_name(tmp_path: Path) -> None:
    from PIL import Image

    ctx = _context(tmp_path)
    src, masks = tmp_path / "anywhere" / "in", tmp_path / "anywhere" / "masks"
    src.mkdir(parents=True), masks.mkdir()
    for name in ("b.png", "a.jpg"):
        Image.new("RGB", (8, 8)).save(src / name)
    (src / "notes.txt").write_text("not an image")
    Image.new("L", (8, 8)).save(masks / "a.png")
    dirs = resolve_dirs(ctx, Caller("local"), str(src), str(tmp_path / "out"), str(masks))
    assert [(p.name, m.name if m else None) for p, m in batch_images(dirs)] == [("a.jpg", "a.png"), ("b.png", None)]
    with pytest.raises(InvalidParams, match="must differ"):
        resolve_dirs(ctx, Caller("local"), str(src), str(src), "")
    with pytest.raises(InvalidParams, match="Input directory"):
        resolve_dirs(ctx, Caller("local"), " ", "", "")
    with pytest.raises(InvalidParams, match="No images"):
        batch_images(resolve_dirs(ctx, Caller("local"), str(masks.parent), "", ""))
