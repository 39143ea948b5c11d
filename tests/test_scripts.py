"""Scripts without HTTP: the grid builder, X/Y/Z value parsing, positional `script_args` in A1111 1.10's
`ui()` order for every built-in script, and the `register_scripts` / `register_xyz_axes` hooks end to end."""
from __future__ import annotations

import dataclasses
import importlib
import math

import numpy as np
import pytest
from PIL import Image, ImageFont

from modules import infotext
from modules.errors import InvalidParams
from modules.jobs.local import local_jobs
from modules.jobs.model import Caller
from modules.jobs.submit import Submission
from modules.plugins import api, grids
from modules.plugins.scripts import find_script, script_args
from tests.plugin_helpers import BUNDLED, ext_app

# The names of the values each A1111 1.10 script's ui() returns, in order (scripts/*.py in
# AUTOMATIC1111/stable-diffusion-webui): positional script_args follow this order.
A1111_UI_ORDER = {
    "X/Y/Z plot": ["x_type", "x_values", "x_values_dropdown", "y_type", "y_values", "y_values_dropdown", "z_type",
                   "z_values", "z_values_dropdown", "draw_legend", "include_lone_images", "include_sub_grids",
                   "no_fixed_seeds", "margin_size", "csv_mode", "raw_mode"],
    "Prompt matrix": ["put_at_start", "different_seeds", "prompt_type", "variations_delimiter", "margin_size"],
    "Prompts from file or textbox": ["checkbox_iterate", "checkbox_iterate_batch", "prompt_position", "prompt_txt"],
    "SD upscale": ["info", "overlap", "upscaler_index", "scale_factor"],
    "Loopback": ["loops", "final_denoising_strength", "denoising_curve", "append_interrogation"],
    "Outpainting mk2": ["info", "pixels", "mask_blur", "direction", "noise_q", "color_variation"],
}
# Atelier's options after A1111's (positional only past A1111's count, or by name)
ATELIER_EXTRA_OPTIONS = {"X/Y/Z plot": ["vary_seeds_x", "vary_seeds_y", "vary_seeds_z"]}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return ext_app(tmp_path_factory.mktemp("scripts"), dirs=(BUNDLED,))


@pytest.fixture(scope="module")
def xyz_values(app):
    return importlib.import_module("atelier_ext_xyz_grid.values")  # loaded by the app's extension loader


# -- the grid builder --------------------------------------------------------------------------------
@pytest.mark.parametrize("count, batch, n_rows, empty, rows", [
    (4, 1, -1, False, 2), (6, 1, -1, False, 2), (5, 1, -1, True, 1), (6, 1, -1, True, 2), (8, 1, -1, False, 3),
    (6, 3, 0, False, 3), (6, 1, 4, False, 4), (3, 1, 5, False, 3), (1, 1, -1, False, 1),
])
def test_grid_rows_follow_a1111(count, batch, n_rows, empty, rows):
    assert grids.grid_rows(count, batch, n_rows, empty) == rows


def _solid(value: int, size=(8, 6)) -> Image.Image:
    return Image.new("RGB", size, (value, value, value))


def test_image_grid_places_images_row_by_row():
    grid = api.image_grid([_solid(10 * (i + 1)) for i in range(5)], rows=2)
    assert grid.size == (3 * 8, 2 * 6)
    pixels = np.asarray(grid)
    assert [pixels[3, 4 + 8 * c, 0] for c in range(3)] == [10, 20, 30]
    assert [pixels[9, 4 + 8 * c, 0] for c in range(3)] == [40, 50, 0]  # the empty spot stays black


def test_annotations_pad_only_the_labelled_sides_and_add_margins():
    grid = api.image_grid([_solid(100, (64, 64))] * 4, rows=2)
    top_only = api.annotate_grid(grid, 64, 64, [[api.GridAnnotation("a")], [api.GridAnnotation("b")]],
                                 [[api.GridAnnotation()], [api.GridAnnotation()]])
    assert top_only.width == 128 and top_only.height > 128
    both = api.annotate_grid(grid, 64, 64, [[api.GridAnnotation("a")]] * 2, [[api.GridAnnotation("r")]] * 2,
                             margin=10)
    assert both.width == 64 * 3 // 4 + 128 + 10 and both.height == top_only.height + 10
    none = api.annotate_grid(grid, 64, 64, [[api.GridAnnotation()]] * 2, [[api.GridAnnotation()]] * 2)
    assert none.size == grid.size


def test_long_labels_wrap_to_the_cell_width_with_the_bundled_font():
    assert grids.FONT_PATH.is_file() and (grids.FONT_PATH.parent / "LICENSE-DejaVu.txt").is_file()
    font = ImageFont.truetype(str(grids.FONT_PATH), 20)
    lines = grids.wrap_text("a rather long label that cannot fit in one narrow cell", font, 120)
    assert len(lines) > 2 and all(font.getlength(line) <= 120 for line in lines if " " in line)
    grid = api.image_grid([_solid(100, (64, 64))] * 2, rows=1)
    short = api.annotate_grid(grid, 64, 64, [[api.GridAnnotation("x")]] * 2, [[api.GridAnnotation()]])
    long = api.annotate_grid(grid, 64, 64, [[api.GridAnnotation("many words in this label")]] * 2,
                             [[api.GridAnnotation()]])
    assert long.height > short.height  # wrapped onto more lines


def test_inactive_annotations_are_grey():
    grid = api.image_grid([_solid(255, (64, 64))], rows=1)
    off = np.asarray(api.annotate_grid(grid, 64, 64, [[api.GridAnnotation("WWW", is_active=False)]],
                                       [[api.GridAnnotation()]]))
    on = np.asarray(api.annotate_grid(grid, 64, 64, [[api.GridAnnotation("WWW")]], [[api.GridAnnotation()]]))
    assert on.min() < 60 and off.min() >= 100


def test_split_grid_covers_the_image_with_overlapping_tiles():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (128, 160, 3), dtype=np.uint8))
    layout = api.split_grid(image, 64, 64, 16)
    xs = [t.x for t in layout.rows[0]]
    ys = [row[0].y for row in layout.rows]
    assert len(xs) == math.ceil((160 - 16) / 48) and xs[0] == 0 and xs[-1] == 160 - 64
    assert ys == [0, 32, 64]
    assert all(b - a <= 64 - 16 for a, b in zip(xs, xs[1:], strict=False))  # at least the overlap
    restored = np.asarray(api.combine_grid(layout), dtype=int)
    assert np.abs(restored - np.asarray(image, dtype=int)).max() <= 1  # unchanged tiles reassemble exactly


def test_combine_grid_blends_across_the_overlap():
    layout = api.split_grid(Image.new("RGB", (112, 64)), 64, 64, 16)
    layout.rows[0][0].image, layout.rows[0][1].image = _solid(0, (64, 64)), _solid(200, (64, 64))
    row = np.asarray(api.combine_grid(layout))[10, :, 0].astype(int)
    assert row[47] == 0 and row[64] == 200 and 0 < row[55] < 200 and np.all(np.diff(row) >= 0)


def test_split_grid_refuses_an_image_smaller_than_a_tile():
    with pytest.raises(ValueError, match="smaller than one 64x64 tile"):
        api.split_grid(Image.new("RGB", (32, 80)), 64, 64, 8)


# -- X/Y/Z values --------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("1-5", [1, 2, 3, 4, 5]), ("1-5 (+2)", [1, 3, 5]), ("5-1 (-2)", [5, 3, 1]), ("1-10 [4]", [1, 4, 7, 10]),
    ("1, 3, 7-8", [1, 3, 7, 8]), ("-1, 4", [-1, 4]),
])
def test_integer_ranges(xyz_values, text, expected):
    assert xyz_values.int_values(xyz_values.split_values(text), "X") == expected


@pytest.mark.parametrize("text, expected", [
    ("0.5-1.5 (+0.5)", [0.5, 1.0, 1.5]), ("0-1 [5]", [0.0, 0.25, 0.5, 0.75, 1.0]), ("7, 2.5", [7.0, 2.5]),
    ("1-2", [1.0, 2.0]),
])
def test_float_ranges(xyz_values, text, expected):
    assert xyz_values.float_values(xyz_values.split_values(text), "X") == pytest.approx(expected)


def test_csv_lists_keep_quoted_commas_and_raw_lines(xyz_values):
    assert xyz_values.split_values('"a, b", c ,  d') == ["a, b", "c", "d"]
    assert xyz_values.split_values("one, two\nthree", raw_lines=True) == ["one, two", "three"]
    assert xyz_values.join_values(["a, b", "c"]) == '"a, b",c'
    assert xyz_values.permutation_values(["a", "b", "c"], "X")[1] == ("a", "c", "b")


@pytest.mark.parametrize("text, words", [("1-3 (+0)", "step of 0"), ("x", "'x'"), ("1-100000", "at most")])
def test_bad_ranges_name_the_value(xyz_values, text, words):
    with pytest.raises(InvalidParams, match=words.replace("(", r"\(").replace("+", r"\+")):
        xyz_values.int_values(xyz_values.split_values(text), "X axis")


# -- positional script_args ------------------------------------------------------------------------------
@pytest.mark.parametrize("title", list(A1111_UI_ORDER))
def test_options_follow_a1111_ui_order(app, title):
    spec = app.registries.scripts.get(title)
    names = [o.name for o in spec.options]
    assert names[:len(A1111_UI_ORDER[title])] == A1111_UI_ORDER[title]
    assert names[len(A1111_UI_ORDER[title]):] == ATELIER_EXTRA_OPTIONS.get(title, [])


def test_xyz_takes_forge_18_argument_order_and_its_own_19(app):
    """Forge / A1111 dev send vary_seeds_x/y/z after no_fixed_seeds and no raw_mode (18 values)."""
    xyz = app.registries.scripts.get("X/Y/Z plot")
    head = [4, "1-3", [], 0, "", [], 0, "", [], True, False, False, False]
    forge = script_args(xyz, [*head, True, False, True, 6, True])
    assert (forge["vary_seeds_x"], forge["vary_seeds_y"], forge["vary_seeds_z"]) == (True, False, True)
    assert forge["margin_size"] == 6 and forge["csv_mode"] is True and forge["raw_mode"] is False
    own = script_args(xyz, [*head, 6, True, False, False, True, False])
    assert own["margin_size"] == 6 and own["csv_mode"] is True and own["vary_seeds_y"] is True
    assert own["vary_seeds_x"] is False and own["vary_seeds_z"] is False
    with pytest.raises(InvalidParams, match="at most 19"):
        script_args(xyz, [*head, 6, True, False, False, True, False, True])


def test_positional_args_map_by_position_with_a1111_value_shapes(app):
    xyz = app.registries.scripts.get("x/y/z plot")
    args = script_args(xyz, [4, "1-3", [], 9, "Euler", [], 0, "", [], "True", "False", "False", "True", 8])
    assert args["x_type"] == 4 and args["y_values"] == "Euler" and args["draw_legend"] is True
    assert args["no_fixed_seeds"] is True and args["margin_size"] == 8 and args["raw_mode"] is False
    upscale = script_args(app.registries.scripts.get("SD upscale"), ["<p>info</p>", "32", 2, 2.5])
    assert upscale == {"info": None, "overlap": 32, "upscaler_index": 2, "scale_factor": 2.5}
    named = script_args(app.registries.scripts.get("Loopback"), {"loops": 2})
    assert named == {"loops": 2, "final_denoising_strength": 0.5, "denoising_curve": "Linear",
                     "append_interrogation": "None"}


@pytest.mark.parametrize("title, args, words", [
    ("Loopback", {"loopz": 2}, "unknown script_args loopz"),
    ("Loopback", [2, 0.5, "Linear", "None", 1], "at most 4"),
    ("Loopback", [99], "between 1 and 32"),
    ("Prompt matrix", ["maybe"], "true or false"),
    ("Loopback", "2", "must be a list"),
])
def test_bad_script_args_are_refused_naming_the_option(app, title, args, words):
    with pytest.raises(InvalidParams, match=words) as err:
        script_args(app.registries.scripts.get(title), args)
    assert err.value.field == "script_args"


def test_scripts_show_only_in_their_tabs(app):
    assert find_script(app.registries.scripts, "sd upscale", "img2img").name == "SD upscale"
    with pytest.raises(InvalidParams, match="not found for txt2img"):
        find_script(app.registries.scripts, "SD upscale", "txt2img")


# -- the hooks, end to end -----------------------------------------------------------------------------------
class SweepPlugin:
    """A script and an X/Y/Z axis of a test extension, through the public API only."""

    @api.hookimpl
    def register_scripts(self):
        def check(ctx):
            if ctx.args["count"] > 3:
                raise api.InvalidParams(f"CFG sweep: count {ctx.args['count']} is more than 3")

        def run(ctx):
            count = int(ctx.args["count"])
            ctx.begin(count)
            out = api.Result()
            for i in range(count):
                api.extend_result(out, ctx.process(dataclasses.replace(ctx.params, cfg_scale=2.0 + i)))
            grid = api.image_grid(out.images, rows=1)
            out.images.insert(0, grid)
            out.infotexts.insert(0, api.with_infotext_fields(out.infotexts[0], {"Script": "CFG sweep"}))
            for name in ("seeds", "subseeds", "prompts", "negative_prompts"):
                getattr(out, name).insert(0, getattr(out, name)[0])
            out.paths = []
            return out

        options = (api.OptionSpec("count", "Count", 2, "slider", 1, 10, 1),)
        return [api.ScriptSpec("CFG sweep", run, options, tabs=("txt2img",), check=check)]

    @api.hookimpl
    def register_xyz_axes(self):
        def apply(params, value, values):
            return dataclasses.replace(params, prompt=f"{params.prompt}, {value} of {len(values)}")

        return [api.AxisSpec("Prompt suffix", apply)]


@pytest.fixture(scope="module")
def sweep_app(tmp_path_factory, tiny_sd1):
    from modules.app import build_app
    from tests.plugin_helpers import ext_settings

    settings = ext_settings(tmp_path_factory.mktemp("sweep"), dirs=(BUNDLED,), ckpt=tiny_sd1)
    return build_app(settings, extra_plugins=(SweepPlugin(),))


SMALL = dict(prompt="fox", width=64, height=64, steps=1, sampler_name="Euler", seed=3)


def _run(app, kind, values, script):
    with local_jobs(app) as (jobs, submitter):
        job = submitter.submit(Caller("tester"), Submission(kind, values, script=script, source="cli"))
        return jobs.wait(job.id, timeout=300)


def test_hook_register_scripts(sweep_app):
    job = _run(sweep_app, "txt2img", SMALL, {"name": "cfg sweep", "args": [3]})
    assert job.state == "done", job.error
    texts = job.result.infotexts
    assert len(job.result.images) == 4 and infotext.parse(texts[0])["Script"] == "CFG sweep"
    assert [infotext.parse(t)["CFG scale"] for t in texts[1:]] == ["2", "3", "4"]
    assert Image.open(job.result.images[0]).size == (3 * 64, 64)
    with local_jobs(sweep_app) as (jobs, submitter):
        with pytest.raises(InvalidParams, match="count 5 is more than 3"):
            submitter.submit(Caller("tester"), Submission("txt2img", SMALL, script={"name": "CFG sweep",
                                                                                     "args": {"count": 5}}))
        assert jobs.list(Caller("tester")) == []


def test_hook_register_xyz_axes(sweep_app):
    from_a1111 = len(importlib.import_module("atelier_ext_xyz_grid.axes").A1111_AXES["txt2img"])
    for axis in ("Prompt suffix", from_a1111):  # by label, and by index after A1111's list
        job = _run(sweep_app, "txt2img", SMALL, {"name": "X/Y/Z plot", "args": {
            "x_type": axis, "x_values": "red, blue", "include_lone_images": True}})
        assert job.state == "done", job.error
        prompts = [infotext.parse(t)["Prompt"] for t in job.result.infotexts[1:]]
        assert prompts == ["fox, red of 2", "fox, blue of 2"]
        assert infotext.parse(job.result.infotexts[0])["X Type"] == "Prompt suffix"


def test_the_payload_keeps_the_checked_script_through_json():
    from modules.jobs.payload import JobPayload
    from modules.pipeline.params import Txt2ImgParams

    script = {"name": "X/Y/Z plot", "args": {"x_type": "Steps", "x_values": "1-3", "x_values_dropdown": [],
                                             "draw_legend": True, "margin_size": 4}}
    payload = JobPayload("txt2img", Txt2ImgParams(prompt="p"), "ca", script=script)
    back = JobPayload.from_json(payload.to_json())
    assert back.script == script and back.params == payload.params
    assert "script" not in JobPayload("txt2img", Txt2ImgParams(), "ca").to_json()  # plain jobs unchanged


def test_grid_options_follow_a1111_option_names():
    options = grids.grid_options({"n_rows": 3, "grid_format": "WEBP", "grid_save": False})
    assert (options.n_rows, options.format, options.save, options.infotext) == (3, "webp", False, True)
    assert options.rows(12) == 3 and grids.grid_options({}).rows(12) == 3 and grids.grid_options({}).rows(2) == 1
    assert grids.grid_options({"grid_prevent_empty_spots": True}).rows(5) == 1
    assert grids.grid_options({"n_rows": 0}).rows(6, batch_size=2) == 2
    for bad in ({"grid_format": "gif"}, {"n_rows": -3}, {"grid_save": "yes"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            grids.grid_options(bad)


def test_outpainting_noise_keeps_the_picture_and_follows_its_colours(app):
    mk2 = importlib.import_module("atelier_ext_outpainting_mk2")
    rng = np.random.default_rng(2)
    image = np.clip(0.7 + 0.05 * rng.standard_normal((32, 48, 3)), 0, 1)
    image[..., 2] = 0.2  # a warm, flat picture
    mask = np.zeros((32, 48))
    mask[:, 32:] = 1.0
    out = mk2.matched_noise(image, mask, seed=5, noise_q=1.0, color_variation=0.05)
    assert np.array_equal(out[:, :32], image[:, :32])
    new = out[:, 32:]
    assert abs(new[..., 0].mean() - 0.7) < 0.05 and abs(new[..., 2].mean() - 0.2) < 0.05 and new.std() > 0.005
    assert np.array_equal(out, mk2.matched_noise(image, mask, seed=5, noise_q=1.0, color_variation=0.05))
    assert mk2.side_pixels((64, 64), 64, ["right"]) == {"left": 0, "right": 64, "up": 0, "down": 0}
    assert mk2.side_pixels((100, 64), 50, ["left", "right", "down"]) == {"left": 76, "right": 80, "up": 0,
                                                                         "down": 64}


def test_axis_indexes_are_a1111_1_10s_per_tab(app):
    plot = importlib.import_module("atelier_ext_xyz_grid.plot")
    registry = app.registries.xyz_axes
    names = {tab: plot.axis_names(tab, registry) for tab in ("txt2img", "img2img")}
    assert [names["txt2img"][i] for i in (4, 5, 9, 11, 23, 26, 28, 37)] == [
        "Steps", "Hires steps", "Sampler", "Checkpoint name", "Denoising", "Hires upscaler", "Styles", "RNG source"]
    assert [names["img2img"][i] for i in (5, 6, 9, 10, 22, 23, 25)] == [
        "CFG Scale", "Image CFG Scale", "Sampler", "Checkpoint name", "Denoising", "Initial noise multiplier",
        "Cond. Image Mask Weight"]
    assert names["txt2img"][38:] == ["Size", "Distilled CFG Scale"]  # Atelier's own axes follow A1111's list
    assert plot.resolve_axis("11", "txt2img", registry, "x").name == "Checkpoint name"
