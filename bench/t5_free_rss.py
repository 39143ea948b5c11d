"""Host RSS around `--t5-after-encoding free` for a mid-size random T5 (not a test; numbers depend on the host).

    PYTHONPATH=. .venv/bin/python bench/t5_free_rss.py

Writes a random T5 v1.1 encoder (d_model 1024, 8 layers, fp32 safetensors, 518 MiB) to a temporary folder,
reads it as the engine does (bf16), then frees it (`t5_release.free`'s steps), reads it again and frees it again,
printing the process's VmRSS after each step.
"""
from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import T5Config, T5EncoderModel

from modules.checkpoints.families import FAMILIES
from modules.checkpoints.load_mmdit import T5Source, reload_t5
from modules.checkpoints.manager import release_memory
from modules.pipeline.t5_release import refill, release

CONFIG = dict(vocab_size=32128, d_model=1024, d_kv=64, num_heads=16, d_ff=2816, num_layers=8,
              relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
              use_cache=False, layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def write_t5(path: Path) -> None:
    model = T5EncoderModel(T5Config(**CONFIG))
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"},
              str(path))
    del model
    release_memory()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t5xxl_random.safetensors"
        write_t5(path)
        source = T5Source.of(path, "file", FAMILIES["flux-dev"], torch.bfloat16)
        steps = {"base": rss_mib()}
        t5 = reload_t5(source, torch.device("cpu"))
        gc.collect()
        steps["loaded"] = rss_mib()
        weights = sum(p.numel() * p.element_size() for p in t5.parameters()) / 2**20
        release(t5)
        gc.collect()
        steps["freed, no malloc_trim"] = rss_mib()
        release_memory()
        steps["freed"] = rss_mib()
        fresh = reload_t5(source, torch.device("cpu"))
        refill(t5, fresh)
        del fresh
        steps["read again"] = rss_mib()
        release(t5)
        release_memory()
        steps["freed again"] = rss_mib()
        print(f"T5 weights {weights:.0f} MiB (bf16); VmRSS MiB: " + ", ".join(f"{k} {v:.0f}" for k, v in steps.items()))


if __name__ == "__main__":
    main()
