"""Infotext: A1111's exact layout, its parser's semantics, and round trips."""
from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modules import infotext
from modules.errors import InvalidParams
from tests.growth import assert_linear_growth

# A typical A1111 1.10 txt2img infotext, as written into a PNG's `parameters` chunk.
A1111_TXT2IMG = (
    "a photo of an astronaut riding a horse on mars, highly detailed\n"
    "Negative prompt: blurry, lowres\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890, "
    "Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1"
)

# The example in A1111's parse_generation_parameters docstring (an older version, no schedule type).
A1111_OLD = (
    "girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, "
    "by Alphonse Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate\n"
    "Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, "
    "poorly drawn face, mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"
)


def test_build_typical_txt2img_matches_a1111_exactly():
    # Fields arrive shuffled and CFG scale as a float; the output is A1111's order and "7".
    fields = {
        "Version": "v1.10.1",
        "Model": "v1-5-pruned-emaonly",
        "Size": "512x512",
        "Seed": 1234567890,
        "CFG scale": 7.0,
        "Model hash": "6ce0161689",
        "Schedule type": "Karras",
        "Sampler": "DPM++ 2M",
        "Steps": 20,
    }
    text = infotext.build(
        "a photo of an astronaut riding a horse on mars, highly detailed", "blurry, lowres", fields
    )
    assert text == A1111_TXT2IMG


def test_build_orders_all_known_keys_then_extras_then_version_and_user():
    leading = list(infotext.LEADING_KEYS)
    extras = ["Hires upscale", "Hires upscaler", "Lora hashes", "Mask blur"]
    values = {k: f"v{i}" for i, k in enumerate(leading + extras + ["Version", "User"])}
    values["Clip skip"] = 2
    values["RNG"] = "CPU"
    rng = random.Random(7)
    keys = list(values)
    rng.shuffle(keys)
    shuffled = {k: values[k] for k in keys}
    # Extras keep the order in which they were inserted, whatever the order of the fixed keys.
    for extra in extras:
        shuffled[extra] = shuffled.pop(extra)
    last = infotext.build("p", "", shuffled).split("\n")[-1]
    written = [part.split(": ")[0] for part in last.split(", ")]
    assert written == leading + extras + ["Version", "User"]


def test_build_skips_none_clip_skip_one_and_gpu_rng():
    fields = {"Steps": 20, "Sampler": "Euler", "Seed": 1, "Clip skip": 1, "RNG": "GPU", "VAE": None}
    assert infotext.build("p", "", fields) == "p\nSteps: 20, Sampler: Euler, Seed: 1"
    fields.update({"Clip skip": 2, "RNG": "CPU"})
    assert infotext.build("p", "", fields) == "p\nSteps: 20, Sampler: Euler, Seed: 1, Clip skip: 2, RNG: CPU"


def test_build_hires_fields_like_a1111():
    fields = {
        "Hires upscale": 2.0,
        "Hires upscaler": "Latent",
        "Steps": 20,
        "Denoising strength": 0.7,
        "Sampler": "Euler a",
        "CFG scale": 7.5,
        "Seed": 42,
        "Size": "512x512",
    }
    assert infotext.build("castle", "", fields) == (
        "castle\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x512, "
        "Denoising strength: 0.7, Hires upscale: 2, Hires upscaler: Latent"
    )


def test_negative_prompt_line_omitted_when_empty_and_prompt_may_be_empty():
    fields = {"Steps": 1, "Sampler": "Euler", "Seed": 3}
    assert infotext.build("a\nb", "", fields) == "a\nb\nSteps: 1, Sampler: Euler, Seed: 3"
    assert infotext.build("", "bad", fields) == "Negative prompt: bad\nSteps: 1, Sampler: Euler, Seed: 3"
    assert infotext.build("", "", fields) == "Steps: 1, Sampler: Euler, Seed: 3"


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("plain", "plain"),
        ("a, b", '"a, b"'),
        ("lora: 1", '"lora: 1"'),
        ("two\nlines", '"two\\nlines"'),
        ('say "hi", ok', '"say \\"hi\\", ok"'),
        ("üñí, 🎨", '"üñí, 🎨"'),  # ensure_ascii=False: no \\u escapes
        ("back\\slash, x", '"back\\\\slash, x"'),
        ('a"b', 'a"b'),  # a quote alone needs no quoting, as in A1111
        ("", '""'),  # our additions: values A1111 would lose or change on reading
        (" padded ", '" padded "'),
        ('"quoted"', '"\\"quoted\\""'),
        (7, "7"),
        (7.0, "7"),
        (0.75, "0.75"),
        (True, "True"),
    ],
)
def test_quote(value, written):
    assert infotext.quote(value) == written


def test_quote_matches_json_dumps_for_values_a1111_quotes():
    for value in ["a, b", "k: v", "x\ny", "日本語, テスト"]:
        assert infotext.quote(value) == json.dumps(value, ensure_ascii=False)


def test_value_equal_to_key_is_written_bare_like_a1111():
    text = infotext.build("p", "", {"Steps": 2, "Sampler": "Euler", "Seed": 1, "Tiled": "Tiled"})
    assert text.endswith("Seed: 1, Tiled")


@pytest.mark.parametrize("key", ["x", "a,b", "a:b", " lead", "-x", "with\nnewline", ""])
def test_build_rejects_keys_that_cannot_be_read_back(key):
    with pytest.raises(InvalidParams):
        infotext.build("p", "", {"Steps": 2, key: "v"})


def test_parse_typical_txt2img():
    res = infotext.parse(A1111_TXT2IMG, defaults=False)
    assert res == {
        "Prompt": "a photo of an astronaut riding a horse on mars, highly detailed",
        "Negative prompt": "blurry, lowres",
        "Steps": "20",
        "Sampler": "DPM++ 2M",
        "Schedule type": "Karras",
        "CFG scale": "7",
        "Seed": "1234567890",
        "Size-1": "512",
        "Size-2": "512",
        "Model hash": "6ce0161689",
        "Model": "v1-5-pruned-emaonly",
        "Version": "v1.10.1",
    }


def test_parse_fills_a1111_defaults():
    res = infotext.parse(A1111_TXT2IMG)
    assert res["Schedule type"] == "Karras"  # present: not overwritten
    expected = {
        "Clip skip": "1",
        "RNG": "GPU",
        "Hires resize-1": 0,
        "Hires resize-2": 0,
        "Hires sampler": "Use same sampler",
        "Hires checkpoint": "Use same checkpoint",
        "Hires prompt": "",
        "Hires negative prompt": "",
        "Mask mode": "Inpaint masked",
        "Masked content": "original",
        "Inpaint area": "Whole picture",
        "Masked area padding": 32,
        "Schedule max sigma": 0,
        "Schedule min sigma": 0,
        "Schedule rho": 0,
        "VAE Encoder": "Full",
        "VAE Decoder": "Full",
        "FP8 weight": "Disable",
    }
    assert {k: res[k] for k in expected} == expected
    assert "Cache FP16 weight for LoRA" not in res


def test_parse_old_a1111_docstring_example():
    res = infotext.parse(A1111_OLD)
    assert res["Prompt"].startswith("girl with an artist's beret, determined")
    assert res["Prompt"].endswith("detailed, intricate")
    assert res["Negative prompt"].startswith("ugly, fat, obese")
    assert res["Sampler"] == "Euler a"
    assert res["Schedule type"] == "Automatic"
    assert (res["Size-1"], res["Size-2"], res["Model hash"]) == ("512", "512", "45dee52b")


@pytest.mark.parametrize(
    ("sampler", "expected"),
    [
        ("DPM++ 2M Karras", ("DPM++ 2M", "Karras")),
        ("DPM++ 2M SDE Exponential", ("DPM++ 2M SDE", "Exponential")),
        ("Euler SGM Uniform", ("Euler", "SGM Uniform")),  # the longer suffix wins over "Uniform"
        ("Euler a", ("Euler a", "Automatic")),
        ("DDIM", ("DDIM", "Automatic")),
    ],
)
def test_parse_infers_schedule_from_old_sampler_names(sampler, expected):
    res = infotext.parse(f"p\nSteps: 20, Sampler: {sampler}, CFG scale: 7, Seed: 1")
    assert (res["Sampler"], res["Schedule type"]) == expected


def test_parse_explicit_schedule_type_keeps_sampler_name():
    res = infotext.parse("p\nSteps: 20, Sampler: DPM++ 2M Karras, Schedule type: Uniform, Seed: 1")
    assert (res["Sampler"], res["Schedule type"]) == ("DPM++ 2M Karras", "Uniform")


def test_parse_needs_three_matches_on_the_last_line():
    two = "a photo\nSteps: 20, Seed: 5"
    res = infotext.parse(two, defaults=False)
    assert res == {"Prompt": "a photo\nSteps: 20, Seed: 5", "Negative prompt": ""}
    three = "a photo\nSteps: 20, Seed: 5, Sampler: Euler"
    res = infotext.parse(three, defaults=False)
    assert res == {"Prompt": "a photo", "Negative prompt": "", "Steps": "20", "Seed": "5", "Sampler": "Euler"}


def test_parse_prompt_only_and_empty_text():
    assert infotext.parse("just a prompt, with commas", defaults=False) == {
        "Prompt": "just a prompt, with commas",
        "Negative prompt": "",
    }
    assert infotext.parse("", defaults=False) == {"Prompt": "", "Negative prompt": ""}


def test_parse_sizes_quotes_and_multiline_negative():
    text = (
        "line one\nline two\nNegative prompt: bad\nworse\n"
        'Steps: 30, Sampler: Euler, Seed: 9, Size: 640x480, Hires resize: 1280x960, '
        'Lora hashes: "add_detail: 7c6bad76eb54, more: 0123456789ab", Seed resize from: 0x0, Empty: , '
        'Template: "a \\"b\\"\\nc"'
    )
    res = infotext.parse(text, defaults=False)
    assert res["Prompt"] == "line one\nline two"
    assert res["Negative prompt"] == "bad\nworse"
    assert (res["Size-1"], res["Size-2"]) == ("640", "480")
    assert (res["Hires resize-1"], res["Hires resize-2"]) == ("1280", "960")
    assert (res["Seed resize from-1"], res["Seed resize from-2"]) == ("0", "0")
    assert res["Lora hashes"] == "add_detail: 7c6bad76eb54, more: 0123456789ab"
    assert res["Template"] == 'a "b"\nc'
    assert res["Empty"] == ""
    assert "Size" not in res


def test_parse_old_hires_first_pass_size():
    base = "p\nSteps: 20, Sampler: Euler, Seed: 1, Size: 1024x1024, "
    res = infotext.parse(base + "First pass size: 0x0")
    assert (res["Size-1"], res["Size-2"], res["Hires resize-1"], res["Hires resize-2"]) == (512, 512, 1024, 1024)
    res = infotext.parse(base + "First pass size: 384x320")
    assert (res["Size-1"], res["Size-2"], res["Hires resize-1"], res["Hires resize-2"]) == (384, 320, 1024, 1024)


def test_parse_strips_prompt_lines_and_crlf_like_a1111():
    res = infotext.parse("  spaced  \r\n\r\nnext\r\nSteps: 1, Sampler: Euler, Seed: 2", defaults=False)
    assert res["Prompt"] == "spaced\n\nnext"
    assert res["Steps"] == "1"
    # A1111 drops blank lines before the first text of the negative prompt too.
    res = infotext.parse("p\nNegative prompt:\n\nbad\n\nworse\nSteps: 1, Sampler: Euler, Seed: 2", defaults=False)
    assert res["Negative prompt"] == "bad\n\nworse"


def test_fp8_default_adds_lora_cache_flag():
    res = infotext.parse("p\nSteps: 1, Sampler: Euler, Seed: 2, FP8 weight: Enable for SDXL")
    assert res["Cache FP16 weight for LoRA"] is False


# --- round trips -----------------------------------------------------------------------------------

_ALPHABET = list("abcXYZ019 ,:;\"'\\/()[]<>{}=-_.!?#%&*+|~`^@$") + list("äöüßéñçøåÆ漢字かなカナ한글Ωπ√∞€") + [
    "🎨", "🐱", "👩‍🎤", "🇯🇵", "\t",
]
_EXTRA_KEYS = ["Hires upscale", "Hires upscaler", "Lora hashes", "TI hashes", "Mask blur", "Some-ext/opt_1", "ADetailer model"]
_FIXED_KEYS = [k for k in infotext.LEADING_KEYS if k not in ("Clip skip", "RNG")] + list(infotext.TRAILING_KEYS)


def _random_text(rng: random.Random, max_len: int) -> str:
    return "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(1, max_len)))


def _random_prompt(rng: random.Random) -> str:
    """Prompts within the round-trip contract: no blank first line, no edge whitespace on lines."""
    lines = []
    for i in range(rng.randint(1, 4)):
        line = _random_text(rng, 40).strip()
        if i > 0 and rng.random() < 0.2:
            line = ""  # blank lines inside the prompt survive
        lines.append(line)
    lines[0] = lines[0] or "x"
    text = "\n".join(lines).rstrip("\n")
    return "" if rng.random() < 0.1 else text


def _random_value(rng: random.Random) -> tuple[object, str]:
    """A value and the string parse must give back."""
    kind = rng.randrange(4)
    if kind == 0:
        n = rng.randint(-10**12, 10**12)
        return n, str(n)
    if kind == 1:
        x = rng.choice([7.0, 7.5, 0.35, 1.0, 12.25, 1e-05])
        return x, {7.0: "7", 1.0: "1", 1e-05: "1e-05"}.get(x, repr(x))
    if kind == 2:
        text = _random_text(rng, 12) + rng.choice(["", "\n" + _random_text(rng, 6)])
        return text, text
    flag = rng.choice([True, False])
    return flag, str(flag)


@pytest.mark.parametrize("seed", range(300))
def test_random_round_trip(seed):
    rng = random.Random(seed)
    prompt = _random_prompt(rng)
    negative = rng.choice(["", _random_prompt(rng)])
    keys = rng.sample(_FIXED_KEYS, rng.randint(3, 8)) + rng.sample(_EXTRA_KEYS, rng.randint(0, 3))
    rng.shuffle(keys)
    fields: dict[str, object] = {}
    expected: dict[str, str] = {}
    for key in keys:
        if key == "Size":
            w, h = rng.randint(64, 4096), rng.randint(64, 4096)
            fields[key] = f"{w}x{h}"
            expected.update({"Size-1": str(w), "Size-2": str(h)})
            continue
        value, back = _random_value(rng)
        fields[key] = value
        expected[key] = back
    fields["Unset"] = None
    text = infotext.build(prompt, negative, fields)
    res = infotext.parse(text, defaults=False)
    assert res == {"Prompt": prompt, "Negative prompt": negative, **expected}, text


def test_round_trip_tricky_prompts():
    cases = [
        ("line, with: colons\nsecond line, \"quoted\"\n\nafter blank", "neg: one\nneg, two"),
        ("emoji 🎨🐱 and ünïcödé", ""),
        ("", "only negative"),
        ("a\\b \\n literal backslash-n", "Negative-ish: not a negative line"),
    ]
    fields = {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7, "Seed": 1, "Size": "512x768"}
    for prompt, negative in cases:
        res = infotext.parse(infotext.build(prompt, negative, fields), defaults=False)
        assert (res["Prompt"], res["Negative prompt"]) == (prompt, negative)
        assert (res["Steps"], res["CFG scale"], res["Size-1"], res["Size-2"]) == ("20", "7", "512", "768")


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet='ab :,"\\-/\t x1é', max_size=40))
def test_linear_param_scan_matches_the_pattern(line):
    """The linear scanner finds exactly what `findall` of A1111's pattern finds."""
    assert infotext.param_pairs(line) == infotext._RE_PARAM.findall(line)


@pytest.mark.parametrize("unit", ["a", "a b", "Steps: 1, Seed: 2, "])
def test_parse_time_grows_linearly(unit):
    """A long last line once took quadratic time (8,000 characters: 0.4 s) and froze the server."""
    def run_at(size: int):
        text = "prompt\n" + unit * (size // len(unit))
        return lambda: infotext.parse(text)

    assert_linear_growth(run_at, 5_000, 40_000)  # 8x the text: ~8x the time, not ~64x
