"""The other text that users send, grown 8x: styles, wildcard expansion and styles.csv reading
stay linear (issue 23: a super-linear parser holds the GIL and freezes the server)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from modules.errors import InvalidParams
from modules.plugins.specs import StyleSpec
from modules.styles import apply_styles, load_styles_csv
from tests.growth import assert_linear_growth

WILDCARDS = Path(__file__).parents[1] / "extensions" / "wildcards"


@pytest.fixture(scope="module")
def wildcards():
    spec = importlib.util.spec_from_file_location("wildcards_under_test", WILDCARDS / "extension.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("unit", ["__a", "__", "___", "__colors__ ", "__a/b-", "{prompt}"])
def test_wildcard_expansion_grows_linearly(wildcards, unit):
    assert wildcards.expand("__colors__", 1) != "__colors__"  # the bundled list is found

    def run_at(size: int):
        text = unit * (size // len(unit))
        return lambda: wildcards.expand(text, 1)

    assert_linear_growth(run_at, 2_000, 16_000)


@pytest.mark.parametrize("unit", ["a, ", "{", "{prompt", "{prompt}" + "x" * 60])
def test_styles_grow_linearly(unit):
    def run_at(size: int):
        style = StyleSpec("s", unit * (size // len(unit)), unit * (size // len(unit)))
        prompt = "x" * 8
        return lambda: apply_styles(prompt, prompt, [style])

    assert_linear_growth(run_at, 5_000, 40_000)


@pytest.mark.parametrize("unit", ['"', 'a,"b', '"""', "a,b,c\n"])
def test_styles_csv_reading_grows_linearly(tmp_path, unit):
    def run_at(size: int):
        path = tmp_path / f"styles-{size}.csv"
        path.write_text("name,prompt,negative_prompt\n" + unit * (size // len(unit)), encoding="utf-8")
        return lambda: load_styles_csv(path)

    assert_linear_growth(run_at, 10_000, 80_000)


def test_a_style_that_multiplies_the_prompt_is_refused_before_it_is_built():
    """5,000 placeholders times a 40,000-character prompt would be 200 MB (and chained styles multiply)."""
    style = StyleSpec("bomb", "{prompt}" * 5_000, "")
    with pytest.raises(InvalidParams, match="styles make the prompt 200,000,000 characters") as err:
        apply_styles("x" * 40_000, "", [style, style])
    assert err.value.field == "styles"
    assert apply_styles("cat", "", [style])[0] == "cat" * 5_000  # within the limit it is A1111's rule
