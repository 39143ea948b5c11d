"""`webui.py generate` with --init-image, --mask, --outpaint and --hires-*, run as a user would."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from modules import infotext
from tests.test_cli import run_cli
from tests.test_img2img import far_from, picture, rect_mask

COMMON = ("--steps", "2", "--sampler", "Euler", "--seed", "5", "--precision", "fp32")


def test_inpaint_from_the_command_line(tiny_sd1, tmp_path):
    init, mask = tmp_path / "in.png", tmp_path / "mask.png"
    picture(75, 69).save(init)  # not a multiple of 8: generated at 72x64
    rect_mask((75, 69), (20, 10, 40, 30)).save(mask)
    proc = run_cli("generate", "--ckpt", str(tiny_sd1), "--init-image", str(init), "--mask", str(mask),
                   "--denoising-strength", "0.6", "--mask-blur", "4", "--inpainting-fill", "fill",
                   "--inpaint-full-res", "--inpaint-full-res-padding", "4", *COMMON,
                   "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "generating at 72x64" in proc.stderr
    path = Path(proc.stdout.split()[0])
    out = Image.open(path)
    assert out.size == (75, 69)  # only masked: pasted back into the original
    keep = far_from((20, 10, 40, 30), (75, 69))
    assert np.array_equal(np.asarray(out.convert("RGB"))[keep], np.asarray(picture(75, 69))[keep])
    fields = infotext.parse(out.info["parameters"])
    assert fields["Denoising strength"] == "0.6" and fields["Mask blur"] == "4"
    assert fields["Inpaint area"] == "Only masked" and fields["Masked content"] == "fill"


def test_outpaint_from_the_command_line(tiny_sd1, tmp_path):
    init = tmp_path / "in.png"
    picture().save(init)
    proc = run_cli("generate", "--ckpt", str(tiny_sd1), "--init-image", str(init), "--outpaint", "16,0,8,0",
                   *COMMON, "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = Image.open(Path(proc.stdout.split()[0]))
    assert out.size == (80, 72)
    assert np.array_equal(np.asarray(out.convert("RGB"))[18:, 26:], np.asarray(picture())[10:, 10:])


def test_hires_from_the_command_line(tiny_sd1, tmp_path):
    proc = run_cli("generate", "--ckpt", str(tiny_sd1), "--width", "64", "--height", "64", "--hires-scale", "1.5",
                   "--hires-steps", "1", "--hires-upscaler", "Lanczos", "--denoising-strength", "0.4", *COMMON,
                   "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = Image.open(Path(proc.stdout.split()[0]))
    fields = infotext.parse(out.info["parameters"])
    assert out.size == (96, 96) and fields["Hires upscaler"] == "Lanczos" and fields["Hires steps"] == "1"
    assert fields["Denoising strength"] == "0.4" and fields["Hires upscale"] == "1.5"


def test_bad_image_input_is_reported_without_traceback(tiny_sd1, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    proc = run_cli("generate", "--ckpt", str(tiny_sd1), "--init-image", str(bad), *COMMON,
                   "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2 and "cannot read the init image" in proc.stderr and "Traceback" not in proc.stderr
    picture().save(tmp_path / "ok.png")
    proc = run_cli("generate", "--ckpt", str(tiny_sd1), "--init-image", str(tmp_path / "ok.png"),
                   "--outpaint", "3,0,0,0", *COMMON, "--data-dir", str(tmp_path / "data"), cwd=tmp_path)
    assert proc.returncode == 2 and "must be multiples of 8" in proc.stderr and "Traceback" not in proc.stderr
