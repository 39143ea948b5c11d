"""Chunked, weighted CLIP encoding on tiny random encoders (A1111 semantics)."""
from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from modules.checkpoints.model import TextEncoderSpec
from modules.text.chunking import chunk_prompt, pad_after_first_eos, target_token_count
from modules.text.encoder import TextConditioner, apply_emphasis
from modules.text.tokenizer import SpecialTokens, load_tokenizer, special_tokens, tokenize

BOS, EOS, COMMA, CAT, DOG, A = 49406, 49407, 267, 2368, 1929, 320


def _config(hidden: int = 32, layers: int = 3, projection: int = 16, act: str = "quick_gelu") -> dict:
    return dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=2,
                vocab_size=49408, max_position_embeddings=77, projection_dim=projection, hidden_act=act,
                bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS)


def _build(cls, config: dict, seed: int):
    """A tiny random encoder; layer norms get random affine parameters, as trained ones have,
    so that hidden-state means are not ~0 (which would make the mean restore meaningless)."""
    torch.manual_seed(seed)
    model = cls(CLIPTextConfig(**config)).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.3, 0.5)
    return model


def _truncated(model: CLIPTextModel, layers: int) -> CLIPTextModel:
    """The same weights with only the first `layers` transformer blocks: an independent clip skip."""
    config = dict(model.config.to_dict(), num_hidden_layers=layers)
    small = CLIPTextModel(CLIPTextConfig(**config)).eval()
    missing, _ = small.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    return small


SD1 = TextEncoderSpec(flavour="clip_l", layer="last", config=_config())
SD2 = TextEncoderSpec(flavour="open_clip", layer="penultimate_norm", config=_config(act="gelu"), pad_with_zero=True)
XL_L = TextEncoderSpec(flavour="clip_l", layer="penultimate", config=_config())
XL_G = TextEncoderSpec(flavour="open_clip", layer="penultimate", config=_config(hidden=48, projection=24, act="gelu"),
                       pad_with_zero=True, pooled=True)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def sd1(tokenizer):
    encoder = _build(CLIPTextModel, SD1.config, 0)
    return TextConditioner([encoder], [SD1], tokenizer), encoder


@pytest.fixture(scope="module")
def sd2(tokenizer):
    encoder = _build(CLIPTextModel, SD2.config, 1)
    return TextConditioner([encoder], [SD2], tokenizer), encoder


@pytest.fixture(scope="module")
def sdxl(tokenizer):
    clip_l = _build(CLIPTextModel, XL_L.config, 2)
    clip_g = _build(CLIPTextModelWithProjection, XL_G.config, 3)
    return TextConditioner([clip_l, clip_g], [XL_L, XL_G], tokenizer), clip_l, clip_g


def _padded_ids(tokenizer, text: str, zero_pad: bool = False) -> torch.Tensor:
    """diffusers-style: tokenizer padding to 77 (EOS), optionally OpenCLIP zeros after the first EOS."""
    ids = tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
    if zero_pad:
        ids = pad_after_first_eos(ids, EOS)
    return torch.tensor([ids])


# -- chunking ------------------------------------------------------------------------------------
def test_long_prompt_chunk_count_and_counter(sd1):
    cond, _ = sd1
    chunked = cond.chunk("cat " * 1000)
    assert len(chunked.chunks) == 14  # 13 full chunks + 25 tokens
    assert all(len(c.tokens) == 77 and c.tokens[0] == BOS and c.tokens[-1] == EOS for c in chunked.chunks)
    assert chunked.chunks[-1].tokens[1:27] == [CAT] * 25 + [EOS]
    assert cond.count_tokens("cat " * 1000) == (1000, 1050)
    assert cond.encode(["cat " * 1000]).cross_attn.shape == (1, 14 * 77, 32)


def test_counter_matches_a1111(sd1):
    cond, _ = sd1
    assert cond.count_tokens("a photo of a cat") == (5, 75)
    assert cond.count_tokens("") == (0, 75)
    assert cond.count_tokens("cat " * 75) == (75, 75)
    assert cond.count_tokens("cat " * 80) == (80, 150)
    assert cond.count_tokens("a cat BREAK a dog") == (77, 150)
    assert target_token_count(0) == 75 and target_token_count(76) == 150


def test_empty_prompt_is_one_chunk(sd1):
    cond, _ = sd1
    chunked = cond.chunk("")
    assert [c.tokens for c in chunked.chunks] == [[BOS] + [EOS] * 76]
    assert cond.encode([""]).cross_attn.shape == (1, 77, 32)


def test_break_starts_a_new_chunk(sd1):
    cond, _ = sd1
    chunks = cond.chunk("a cat BREAK a dog").chunks
    assert len(chunks) == 2
    assert chunks[0].tokens[:4] == [BOS, A, CAT, EOS] and chunks[0].tokens[4:] == [EOS] * 73
    assert chunks[1].tokens[:4] == [BOS, A, DOG, EOS]
    assert len(cond.chunk("a cat BREAK BREAK a dog").chunks) == 3


def _chunk_ids(tokens: list[int], backtrack: int = 20) -> list[list[int]]:
    ids = SpecialTokens(bos=BOS, eos=EOS, comma=COMMA)
    return [c.tokens for c in chunk_prompt([["x", 1.0]], [tokens], ids, comma_backtrack=backtrack).chunks]


def test_comma_backtrack_moves_the_phrase_after_a_near_comma():
    chunks = _chunk_ids([CAT] * 70 + [COMMA] + [DOG] * 10)
    assert len(chunks) == 2
    assert chunks[0][1:72] == [CAT] * 70 + [COMMA] and chunks[0][72:] == [EOS] * 5
    assert chunks[1][1:12] == [DOG] * 10 + [EOS]


def test_comma_backtrack_leaves_far_commas_and_can_be_disabled():
    far = _chunk_ids([CAT] * 50 + [COMMA] + [DOG] * 30)  # the comma is 25 tokens from the end
    assert far[0][1:76] == [CAT] * 50 + [COMMA] + [DOG] * 24 and far[1][1:8] == [DOG] * 6 + [EOS]
    near_off = _chunk_ids([CAT] * 70 + [COMMA] + [DOG] * 10, backtrack=0)
    assert near_off[0][71:76] == [COMMA] + [DOG] * 4
    edge = _chunk_ids([CAT] * 55 + [COMMA] + [DOG] * 30)  # exactly 20 from the end: moves
    assert edge[0][56:] == [COMMA] + [EOS] * 20 and edge[1][1:31] == [DOG] * 30


def test_comma_at_the_chunk_boundary_starts_the_next_chunk():
    chunks = _chunk_ids([CAT] * 75 + [COMMA] + [DOG])
    assert chunks[0][1:76] == [CAT] * 75 and chunks[1][1:4] == [COMMA, DOG, EOS]


def test_weights_follow_tokens_through_chunking(sd1):
    cond, _ = sd1
    chunk = cond.chunk("a (cat:1.5) dog").chunks[0]
    assert chunk.tokens[:5] == [BOS, A, CAT, DOG, EOS]
    assert chunk.multipliers[:5] == [1.0, 1.0, 1.5, 1.0, 1.0] and chunk.multipliers[5:] == [1.0] * 72


def test_pad_ids_for_both_flavours(sd1, tokenizer):
    cond, _ = sd1
    assert special_tokens(tokenizer) == SpecialTokens(bos=BOS, eos=EOS, comma=COMMA)
    tokens = cond.chunk("a cat").chunks[0].tokens
    assert tokens == [BOS, A, CAT] + [EOS] * 74  # SD1 pads with EOS
    assert pad_after_first_eos(tokens, EOS) == [BOS, A, CAT, EOS] + [0] * 73  # OpenCLIP pads with 0


def test_emphasis_none_keeps_brackets_literal(sd1, tokenizer):
    cond, _ = sd1
    chunk = cond.chunk("a (cat:1.5)", emphasis="None").chunks[0]
    n = len(tokenize(tokenizer, "a (cat:1.5)"))
    assert chunk.tokens[1:n + 1] == tokenize(tokenizer, "a (cat:1.5)") and set(chunk.multipliers) == {1.0}


# -- encoding ------------------------------------------------------------------------------------
def test_single_chunk_sd1_equals_diffusers_style_encoding(sd1, tokenizer):
    cond, encoder = sd1
    with torch.no_grad():
        expected = encoder(_padded_ids(tokenizer, "a photo of a cat"))[0]
    got = cond.encode(["a photo of a cat"])
    assert got.cross_attn.dtype == torch.float32 and got.pooled is None
    torch.testing.assert_close(got.cross_attn, expected)


def test_weight_changes_only_its_token_before_mean_restore(sd1):
    cond, _ = sd1
    plain = cond.encode(["a cat dog"]).cross_attn
    no_norm = cond.encode(["a (cat:1.5) dog"], emphasis="No norm").cross_attn
    changed = (no_norm != plain).any(dim=-1)[0]
    assert changed.nonzero().flatten().tolist() == [2]
    torch.testing.assert_close(no_norm[0, 2], plain[0, 2] * 1.5)


def test_original_emphasis_restores_the_mean(sd1):
    cond, _ = sd1
    plain = cond.encode(["a cat dog"]).cross_attn
    no_norm = cond.encode(["a (cat:1.5) dog"], emphasis="No norm").cross_attn
    original = cond.encode(["a (cat:1.5) dog"]).cross_attn
    torch.testing.assert_close(original.mean(), plain.mean())
    torch.testing.assert_close(original, no_norm * (plain.mean() / no_norm.mean()))
    assert not torch.allclose(original, plain)
    ignored = cond.encode(["a (cat:1.5) dog"], emphasis="Ignore").cross_attn
    torch.testing.assert_close(ignored, plain)
    with pytest.raises(ValueError, match="emphasis"):
        cond.encode(["a cat"], emphasis="Louder")


def test_apply_emphasis_means_are_over_the_whole_tensor():
    z = torch.randn(2, 77, 8)
    w = torch.ones(2, 77)
    w[1, 3] = 2.0
    out = apply_emphasis(z, w, "Original")
    torch.testing.assert_close(out.mean(), z.mean())
    torch.testing.assert_close(out[0] / z[0], torch.full_like(z[0], float(out[0, 0, 0] / z[0, 0, 0])))


@pytest.mark.parametrize("skip", [2, 3])
def test_clip_skip_matches_a_truncated_transformer(sd1, tokenizer, skip):
    cond, encoder = sd1
    small = _truncated(encoder, 3 - (skip - 1))
    with torch.no_grad():
        expected = small(_padded_ids(tokenizer, "a photo of a cat")).last_hidden_state
    got = cond.encode(["a photo of a cat"], clip_skip=skip).cross_attn
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, cond.encode(["a photo of a cat"]).cross_attn)


def test_clip_skip_uses_the_hidden_state_before_the_final_norm(sd1, tokenizer):
    cond, encoder = sd1
    with torch.no_grad():
        out = encoder(_padded_ids(tokenizer, "a cat"), output_hidden_states=True)
        expected = encoder.final_layer_norm(out.hidden_states[-2])
    torch.testing.assert_close(cond.encode(["a cat"], clip_skip=2).cross_attn, expected)
    with pytest.raises(ValueError, match="clip skip"):
        cond.encode(["a cat"], clip_skip=4)
    with pytest.raises(ValueError, match="clip skip"):
        cond.encode(["a cat"], clip_skip=0)


def test_sd2_penultimate_with_norm_zero_padding_and_no_clip_skip(sd2, tokenizer):
    cond, encoder = sd2
    small = _truncated(encoder, 2)  # diffusers' SD2 text encoder drops the last block
    with torch.no_grad():
        expected = small(_padded_ids(tokenizer, "a photo of a cat", zero_pad=True)).last_hidden_state
        eos_padded = small(_padded_ids(tokenizer, "a photo of a cat")).last_hidden_state
    got = cond.encode(["a photo of a cat"]).cross_attn
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, eos_padded)  # the pad ids reach the encoder
    torch.testing.assert_close(cond.encode(["a photo of a cat"], clip_skip=2).cross_attn, got)


def test_sd2_folder_with_the_last_block_cut_ignores_clip_skip(sd2, tokenizer):
    _, encoder = sd2
    small = _truncated(encoder, 2)
    spec = TextEncoderSpec(flavour="open_clip", layer="last", config=dict(SD2.config, num_hidden_layers=2),
                           pad_with_zero=True)
    cond = TextConditioner([small], [spec], tokenizer)
    with torch.no_grad():
        expected = small(_padded_ids(tokenizer, "a cat", zero_pad=True)).last_hidden_state
    torch.testing.assert_close(cond.encode(["a cat"], clip_skip=2).cross_attn, expected)
    torch.testing.assert_close(cond.encode(["a cat"]).cross_attn, sd2[0].encode(["a cat"]).cross_attn)


def test_sdxl_concat_and_pooled(sdxl, tokenizer):
    cond, clip_l, clip_g = sdxl
    text = "a photo of a cat"
    with torch.no_grad():
        hidden_l = clip_l(_padded_ids(tokenizer, text), output_hidden_states=True).hidden_states[-2]
        out_g = clip_g(_padded_ids(tokenizer, text, zero_pad=True), output_hidden_states=True)
    got = cond.encode([text, text])
    assert got.cross_attn.shape == (2, 77, 32 + 48) and got.pooled.shape == (2, 24)
    torch.testing.assert_close(got.cross_attn[:1], torch.cat([hidden_l, out_g.hidden_states[-2]], dim=-1))
    torch.testing.assert_close(got.pooled[:1], out_g.text_embeds)
    torch.testing.assert_close(cond.encode([text], clip_skip=2).cross_attn, got.cross_attn[:1])


def test_sdxl_clip_l_skip_option(sdxl, tokenizer):
    cond, clip_l, _ = sdxl
    with torch.no_grad():
        hidden = clip_l(_padded_ids(tokenizer, "a cat"), output_hidden_states=True).hidden_states
    got = cond.encode(["a cat"], clip_skip=3, sdxl_clip_l_skip=True).cross_attn
    torch.testing.assert_close(got[..., :32], hidden[-3])


def test_sdxl_pooled_comes_from_the_first_chunk(sdxl, tokenizer):
    cond, _, clip_g = sdxl
    with torch.no_grad():
        first = clip_g(_padded_ids(tokenizer, "a cat", zero_pad=True)).text_embeds
    got = cond.encode(["a cat BREAK a dog"])
    assert got.cross_attn.shape == (1, 154, 80) and got.chunk_counts == (1 * 2,)
    torch.testing.assert_close(got.pooled, first)


def test_multi_chunk_is_chunks_encoded_separately_and_concatenated(sd1):
    cond, _ = sd1
    got = cond.encode(["a cat BREAK a dog"]).cross_attn
    torch.testing.assert_close(got[:, :77], cond.encode(["a cat"]).cross_attn)
    torch.testing.assert_close(got[:, 77:], cond.encode(["a dog"]).cross_attn)


def test_batch_pads_shorter_texts_with_the_empty_chunk(sd1):
    cond, _ = sd1
    got = cond.encode(["a cat BREAK a dog", "a bird"])
    assert got.cross_attn.shape == (2, 154, 32) and got.chunk_counts == (2, 1)
    torch.testing.assert_close(got.cross_attn[1:, :77], cond.encode(["a bird"]).cross_attn)
    torch.testing.assert_close(got.cross_attn[1:, 77:], cond.encode([""]).cross_attn)


def test_bf16_encoder_returns_float32(tokenizer):
    encoder = _build(CLIPTextModel, SD1.config, 0)
    reference = TextConditioner([encoder], [SD1], tokenizer).encode(["a cat"]).cross_attn
    cond = TextConditioner([encoder.to(torch.bfloat16)], [SD1], tokenizer)
    got = cond.encode(["a (cat:1.2)"]).cross_attn
    assert got.dtype == torch.float32
    assert torch.allclose(cond.encode(["a cat"]).cross_attn, reference, atol=0.1)


def test_constructor_checks(tokenizer):
    encoder = _build(CLIPTextModel, SD1.config, 0)
    with pytest.raises(ValueError, match="spec"):
        TextConditioner([encoder], [SD1, SD1], tokenizer)
    with pytest.raises(ValueError, match="WithProjection"):
        TextConditioner([encoder], [XL_G], tokenizer)
    with pytest.raises(TypeError):
        TextConditioner([encoder], [SD1], tokenizer).encode("a cat")
