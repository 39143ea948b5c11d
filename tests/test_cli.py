"""The `webui.py generate` command line, run as a user would run it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from PIL import Image

from modules import infotext

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "webui.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_generate_writes_images_with_infotext(tiny_sd1, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("generate", "--ckpt", str(tiny_sd1), "--prompt", "a cat, (blue:1.2)",
                   "--negative-prompt", "dog", "--steps", "3", "--sampler", "Euler", "--scheduler", "Karras",
                   "--cfg-scale", "6", "--seed", "77", "--width", "64", "--height", "64",
                   "--batch-size", "2", "--n-iter", "1", "--clip-skip", "2", "--precision", "fp32",
                   "--data-dir", str(tmp_path / "data"), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    paths = [Path(line) for line in proc.stdout.split()]
    assert len(paths) == 2 and all(p.is_file() and p.is_relative_to(out) for p in paths)
    assert [p.name.split("-", 1)[1] for p in paths] == ["77.png", "78.png"]
    fields = infotext.parse(Image.open(paths[1]).info["parameters"])
    assert fields["Prompt"] == "a cat, (blue:1.2)" and fields["Negative prompt"] == "dog"
    assert (fields["Seed"], fields["Steps"], fields["Sampler"]) == ("78", "3", "Euler")
    assert (fields["Schedule type"], fields["Clip skip"]) == ("Karras", "2")


def test_generate_reports_bad_input_without_traceback(tiny_sd1, tmp_path):
    proc = run_cli("generate", "--ckpt", str(tiny_sd1), "--width", "65", "--height", "64",
                   "--out", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2
    assert "width must be a multiple of 8" in proc.stderr and "Traceback" not in proc.stderr


def test_generate_reports_missing_checkpoint(tmp_path):
    proc = run_cli("generate", "--ckpt", str(tmp_path / "nope.safetensors"), "--width", "64", "--height", "64",
                   "--out", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2
    assert "nope.safetensors" in proc.stderr and "Traceback" not in proc.stderr


def test_generate_flux_dev_takes_distilled_cfg_shift_and_family_defaults(tmp_path):
    """Unset generation flags take FLUX.1-dev's defaults (CFG 1, Euler, Simple), not SD's CFG 7 / DPM++ 2M."""
    from tests.fixtures.make_tiny_mmdit import make_all_in_one

    ckpt = make_all_in_one("flux-dev", tmp_path / "models" / "Stable-diffusion" / "tiny-flux-dev.safetensors")
    out = tmp_path / "out"
    proc = run_cli("generate", "--ckpt", str(ckpt), "--prompt", "a fox", "--steps", "2", "--seed", "3",
                   "--width", "64", "--height", "64", "--distilled-cfg-scale", "2.5", "--shift", "2",
                   "--data-dir", str(tmp_path / "data"), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    fields = infotext.parse(Image.open(proc.stdout.split()[0]).info["parameters"])
    assert (fields["Steps"], fields["Sampler"], fields["Schedule type"]) == ("2", "Euler", "Simple")
    assert (fields["CFG scale"], fields["Distilled CFG Scale"], fields["Shift"]) == ("1", "2.5", "2")
