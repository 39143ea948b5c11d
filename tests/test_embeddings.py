"""Textual-inversion embeddings: file formats, trigger words in prompts, vectors at the right slots,
chunk boundaries, width checks, TI hashes and the A1111 embeddings listing."""
from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import save_file

from modules.pipeline.params import Txt2ImgParams
from modules.server.networks import embeddings_listing
from modules.text.chunking import CHUNK_LENGTH, chunk_prompt
from modules.text.embeddings import EmbeddingLookup, TokenEmbedding, token_embedding_layer
from modules.text.tokenizer import load_tokenizer, special_tokens, tokenize
from tests.conftest import make_app, make_engine
from tests.fixtures import make_tiny_lora as mk

SMALL = dict(steps=2, width=64, height=64, seed=3, sampler_name="Euler")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_checkpoints):
    root = tmp_path_factory.mktemp("ti")
    extra = root / "more-embeddings"
    g = torch.Generator().manual_seed(0)
    folder = root / "models" / "embeddings"
    mk.embedding_a1111(torch.randn(3, 32, generator=g), folder / "tripleword.pt")
    (extra / "sub").mkdir(parents=True)
    save_file({"emb_params": torch.randn(2, 32, generator=g)}, str(extra / "sub" / "duoword.safetensors"))
    save_file({"emb_params": torch.randn(1, 1024, generator=g)}, str(folder / "widesd2.safetensors"))
    save_file({"clip_l": torch.randn(2, 32, generator=g), "clip_g": torch.randn(2, 32, generator=g)},
              str(folder / "xlword.safetensors"))
    (folder / "garbage.pt").write_bytes(b"definitely not a pickle")
    app = make_app(root, embeddings_dirs=(extra,))
    app.engine.load_model(tiny_checkpoints["sd1"])
    return app.engine, root, app


def layer0_inputs(encoder, rows):
    """Hidden states entering the first transformer layer (token + position embeddings)."""
    seen = {}
    layer = encoder.encoder.layers[0] if hasattr(encoder, "encoder") else encoder.text_model.encoder.layers[0]

    def grab(_module, args, kwargs):
        seen.setdefault("x", (args or (kwargs["hidden_states"],))[0].clone())

    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        value = rows()
    finally:
        handle.remove()
    return seen["x"], value


def test_hook_register_embeddings(setup):
    """Vectors reach the text encoder at the trigger word's slots, one slot per vector."""
    engine, root, _ = setup
    hooks = engine.job_hooks("txt2img")
    model = engine.require_model()
    lookup = hooks.embeddings(model, engine.tokenizer(), Txt2ImgParams(prompt="a tripleword"))
    assert set(lookup.embeddings) == {"tripleword", "duoword"}  # widesd2 and xlword do not fit SD1
    text = engine.text_conditioner(model)
    chunked = text.chunk("a tripleword cat", embeddings=lookup)
    chunk = chunked.chunks[0]
    a, cat = tokenize(engine.tokenizer(), "a")[0], tokenize(engine.tokenizer(), "cat")[0]
    assert chunk.tokens[:6] == [text.ids.bos, a, 0, 0, 0, cat] and chunked.token_count == 5
    assert [offset for offset, _ in chunk.fixes] == [2]
    encoder = model.text_encoders[0]
    x, _ = layer0_inputs(encoder, lambda: text.encode(["a tripleword cat"], embeddings=lookup))
    vectors = torch.load(root / "models" / "embeddings" / "tripleword.pt", weights_only=True)["string_to_param"]["*"]
    positions = encoder.embeddings.position_embedding.weight
    assert torch.allclose(x[0, 2:5], vectors.float() + positions[2:5], atol=1e-5)
    word = token_embedding_layer(encoder).weight[cat] + positions[5]
    assert torch.allclose(x[0, 5], word, atol=1e-5)
    assert lookup.used.keys() == {"tripleword"}


def test_multi_vector_embedding_never_crosses_a_chunk():
    tokenizer = load_tokenizer()
    ids = special_tokens(tokenizer)
    emb = TokenEmbedding("tripleword", (torch.zeros(3, 4),))
    lookup = EmbeddingLookup([emb], tokenizer)
    word = tokenize(tokenizer, "tripleword")
    fragments = [["x " * 73, 1.0], ["tripleword", 1.2]]
    tokenized = [tokenize(tokenizer, "x " * 73), word]
    chunked = chunk_prompt(fragments, tokenized, ids, embeddings=lookup)
    first, second = chunked.chunks
    assert first.fixes == [] and first.tokens[74:] == [ids.eos] * 3  # 73 tokens, then padding
    assert second.fixes == [(1, emb)] and second.tokens[1:4] == [0, 0, 0] and second.multipliers[1:4] == [1.2] * 3
    fits = chunk_prompt([["x " * 72, 1.0], ["tripleword", 1.0]], [tokenize(tokenizer, "x " * 72), word], ids,
                        embeddings=lookup)
    assert len(fits.chunks) == 1 and fits.chunks[0].fixes == [(73, emb)] and CHUNK_LENGTH == 75


def test_txt2img_uses_embeddings_and_records_ti_hashes(setup):
    engine, root, _ = setup
    base = engine.txt2img(Txt2ImgParams(prompt="a cat", **SMALL))
    used = engine.txt2img(Txt2ImgParams(prompt="a tripleword cat", negative_prompt="duoword", **SMALL))
    sha = hashlib.sha256((root / "models" / "embeddings" / "tripleword.pt").read_bytes()).hexdigest()[:12]
    assert f'TI hashes: "tripleword: {sha}, duoword: ' in used.infotexts[0]
    assert used.warnings == [] and base.images[0].tobytes() != used.images[0].tobytes()


def test_width_mismatch_is_skipped_with_a_warning(setup):
    engine, _, _ = setup
    result = engine.txt2img(Txt2ImgParams(prompt="a widesd2 xlword", **SMALL))
    assert result.images and "TI hashes" not in result.infotexts[0]
    assert any("widesd2" in w and "1024" in w for w in result.warnings), result.warnings
    assert any("xlword" in w and "another model" in w for w in result.warnings), result.warnings


def test_embeddings_listing_in_a1111_shape(setup):
    listing = embeddings_listing(setup[2])
    assert listing["loaded"]["tripleword"] == {"step": 100, "sd_checkpoint": "0123456789",
                                               "sd_checkpoint_name": "tiny", "shape": 32, "vectors": 3}
    assert set(listing["skipped"]) == {"widesd2", "xlword"} and "garbage" not in listing["loaded"]


def test_sdxl_embedding_on_sdxl(tiny_checkpoints, tmp_path):
    g = torch.Generator().manual_seed(1)
    (tmp_path / "models" / "embeddings").mkdir(parents=True)
    save_file({"clip_l": torch.randn(2, 32, generator=g), "clip_g": torch.randn(2, 32, generator=g)},
              str(tmp_path / "models" / "embeddings" / "xlword.safetensors"))
    engine = make_engine(tmp_path)
    engine.load_model(tiny_checkpoints["sdxl"])
    result = engine.txt2img(Txt2ImgParams(prompt="a xlword", **SMALL))
    assert result.warnings == [] and "TI hashes: \"xlword: " in result.infotexts[0]
