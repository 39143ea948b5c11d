"""The A1111 LoRA / embedding routes and the extension's card routes over HTTP; CLI flags."""
from __future__ import annotations

import httpx
import pytest
import torch
from safetensors.torch import save_file

from modules.cli import build_parser
from modules.settings import settings_from_args
from tests.api_server import start_server
from tests.fixtures import make_tiny_lora as mk


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoints):
    srv = start_server(tmp_path_factory.mktemp("lora-api"), {"tiny-sd1": tiny_checkpoints["sd1"]})
    yield srv
    srv.stop()


def test_loras_refresh_and_embeddings_routes(server, tmp_path):
    models = server.context.app.settings.models_dir
    with httpx.Client(base_url=server.url, timeout=120) as http:
        before = http.get("/sdapi/v1/loras").json()
        layers = {"lora_unet_down_blocks_0_attentions_0_proj_in": (32, 32, 1, 1)}
        mk.write(mk.lora_tensors(layers), models / "Lora" / "sub" / "ink.safetensors", {"ss_output_name": "inky"})
        (models / "Lora" / "sub" / "ink.preview.png").write_bytes(b"\x89PNG fake")
        assert http.post("/sdapi/v1/refresh-loras").status_code == 200
        loras = http.get("/sdapi/v1/loras").json()
        assert before == [] and [(x["name"], x["alias"]) for x in loras] == [("sub/ink", "ink")]
        assert loras[0]["path"].endswith("ink.safetensors") and loras[0]["metadata"] == {"ss_output_name": "inky"}
        assert http.get("/ext/lora/metadata", params={"kind": "lora", "name": "sub/ink"}).json() == {
            "ss_output_name": "inky"}
        assert http.get("/ext/lora/preview", params={"kind": "lora", "name": "sub/ink"}).content == b"\x89PNG fake"
        assert http.get("/ext/lora/preview", params={"kind": "lora", "name": "../../etc/passwd"}).status_code == 404
        (models / "embeddings").mkdir()
        save_file({"emb_params": torch.zeros(2, 32)}, str(models / "embeddings" / "twin.safetensors"))
        save_file({"emb_params": torch.zeros(1, 768)}, str(models / "embeddings" / "big.safetensors"))
        http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sd1"})
        body = dict(prompt="a cat <lora:ink:1> twin", width=64, height=64, steps=2, sampler_name="Euler", seed=1)
        info = http.post("/sdapi/v1/txt2img", json=body).json()["info"]
        assert "Lora hashes" in info and "TI hashes" in info
        listing = http.get("/sdapi/v1/embeddings").json()
        assert listing["loaded"]["twin"]["vectors"] == 2 and listing["loaded"]["twin"]["shape"] == 32
        assert listing["skipped"]["big"]["shape"] == 768
        assert "/ext/lora/preview" in http.get("/openapi.json").json()["paths"]


def test_generate_accepts_lora_and_embeddings_dirs(tmp_path):
    args = build_parser().parse_args(["generate", "--prompt", "x", "--lora-dir", str(tmp_path / "a"),
                                      "--lora-dir", str(tmp_path / "b"), "--embeddings-dir", str(tmp_path / "e")])
    settings = settings_from_args(args)
    assert settings.lora_dirs == (tmp_path / "a", tmp_path / "b") and settings.embeddings_dirs == (tmp_path / "e",)
    assert settings.lora_folders[0] == settings.models_dir / "Lora"
