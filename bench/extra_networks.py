"""LoRA apply/restore cost on an SD1-sized UNet + text encoder, and the extra-networks card grid at 1,000 entries.

    .venv/bin/python bench/extra_networks.py [--out bench/extra_networks.json]

Weights are uninitialised (only timings matter). The LoRA covers what kohya trains by default:
every attention / feed-forward / proj linear of the UNet and every text-encoder linear, rank 16.
Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def sd1_model():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
        te = CLIPTextModel(CLIPTextConfig())
    unet, te = unet.to_empty(device="cpu"), te.to_empty(device="cpu")
    spec = SimpleNamespace(arch="sd1", text_encoders=(SimpleNamespace(flavour="clip_l"),))
    return SimpleNamespace(spec=spec, unet=unet, text_encoders=[te])


def lora_layers(model, rank=16):
    layers = {}
    for target, module in (("unet", model.unet), ("te0", model.text_encoders[0])):
        for name, child in module.named_modules():
            if isinstance(child, torch.nn.Linear) and (target == "te0" or "transformer_blocks" in name or "proj_" in name):
                w = child.weight
                layers[(target, name)] = (torch.randn(rank, w.shape[1]) * 0.01, torch.randn(w.shape[0], rank) * 0.01)
    return layers


def bench_patch(model, layers, repeats=3):
    from modules.plugins.patch import ModelPatch

    rows = []
    for _ in range(repeats):
        patch = ModelPatch(model)
        start = time.perf_counter()
        for (target, name), (down, up) in layers.items():
            patch.add(target, name, up @ down)
        deltas = time.perf_counter() - start
        with patch.applied():
            pass
        rows.append((deltas, patch.apply_seconds, patch.restore_seconds))
    return min(rows, key=lambda r: sum(r))


def load_browser():
    spec = importlib.util.spec_from_file_location("atelier_ext_lora", REPO / "extensions/lora/__init__.py",
                                                  submodule_search_locations=[str(REPO / "extensions/lora")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["atelier_ext_lora"] = module
    spec.loader.exec_module(module)
    return sys.modules["atelier_ext_lora.browser"]


def bench_cards(n=1000):
    from modules.plugins import api

    browser = load_browser()
    items = [api.ExtraNetworkItem(f"folder{i % 20}/lora-{i:04d}", path=f"/x/lora-{i}.safetensors",
                                  folder=f"folder{i % 20}", prompt=f"<lora:lora-{i:04d}:0.8>",
                                  preview="/x/p.png" if i % 2 else None, description=f"style number {i}")
             for i in range(n)]
    start = time.perf_counter()
    html = browser.render_cards(items, "txt2img", "lora")
    render = time.perf_counter() - start
    start = time.perf_counter()
    filtered = browser.render_cards(browser.filter_items(items, "lora-09", "folder3"), "txt2img", "lora")
    search = time.perf_counter() - start
    spec = api.ExtraNetworkSpec("lora", "Lora", items=lambda: items, refresh=lambda: None)
    import gradio as gr

    start = time.perf_counter()
    with gr.Blocks():
        browser.build_tab(spec, "txt2img", None)
    build = time.perf_counter() - start
    return {"cards": n, "html_bytes": len(html), "render_s": render, "search_s": search,
            "search_hits": filtered.count('class="atelier-card"'), "gradio_build_s": build}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "extra_networks.json")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = sd1_model()
    layers = lora_layers(model)
    numel = sum(dict(model.unet.named_modules())[n].weight.numel() if t == "unet" else
                dict(model.text_encoders[0].named_modules())[n].weight.numel() for t, n in layers)
    deltas, apply, restore = bench_patch(model, layers)
    result = {"device": "cpu", "threads": torch.get_num_threads(), "lora_layers": len(layers),
              "patched_params": numel, "deltas_s": deltas, "apply_s": apply, "restore_s": restore,
              **bench_cards()}
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
