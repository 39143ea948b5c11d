"""Scripts over real HTTP: X/Y/Z plot, prompt matrix, prompts from file, SD upscale and loopback through
/sdapi/v1 with A1111 1.10's positional `script_args` (and the webuiapi client), the script lists, and
bad input refused before anything is queued."""
from __future__ import annotations

import base64
import io
import json
import logging
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from modules import infotext
from tests.api_server import start_server

webuiapi = pytest.importorskip("webuiapi")
SMALL = dict(width=64, height=64, steps=1, sampler_name="Euler", seed=42, cfg_scale=5.0)
LEGEND_LEFT = 64 * 3 // 4  # the row legend column of 64-pixel cells


def xyz_args(x_type, x_values, y_type=0, y_values="", z_type=0, z_values="", draw_legend=True,
             include_lone_images=True, include_sub_grids=False, no_fixed_seeds=False, margin_size=0):
    """A1111 1.10's X/Y/Z ui() order: x_type, x_values, x_values_dropdown, y_..., z_..., draw_legend,
    include_lone_images, include_sub_grids, no_fixed_seeds, margin_size, csv_mode, raw_mode."""
    return [x_type, x_values, [], y_type, y_values, [], z_type, z_values, [], draw_legend, include_lone_images,
            include_sub_grids, no_fixed_seeds, margin_size, False, False]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoints):
    srv = start_server(tmp_path_factory.mktemp("scripts"), {"ca": tiny_checkpoints["sd1"],
                                                            "cb": tiny_checkpoints["sd1"]})
    yield srv
    srv.stop()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=300) as client:
        yield client


def images_of(response) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB") for b in response["images"]]


def post(http, kind: str, **payload) -> tuple[list[Image.Image], dict]:
    response = http.post(f"/sdapi/v1/{kind}", json={**SMALL, **payload})
    assert response.status_code == 200, response.text
    data = response.json()
    return images_of(data), json.loads(data["info"])


def fields_of(texts: list[str]) -> list[dict]:
    """Parsed infotexts with numbers as numbers."""
    def number(value):
        try:
            return float(value) if "." in str(value) else int(value)
        except (TypeError, ValueError):
            return value

    return [{k: number(v) for k, v in infotext.parse(t).items()} for t in texts]


class ProgressTexts:
    """Records the progress lines ("cell 3/12") of the server's job events."""

    def __init__(self, server):
        self.texts, self.jobs = [], server.context.jobs

    def __enter__(self):
        self.jobs.add_listener(self)
        return self

    def __call__(self, event) -> None:
        if event.type == "progress" and event.job is not None and event.job.progress.text:
            self.texts.append(event.job.progress.text)  # (a worker event before the first step has none)

    def __exit__(self, *exc):
        self.jobs.remove_listener(self)


def job_count(http) -> int:
    return len(http.get("/api/v1/jobs", params={"limit": 500}).json()["jobs"])


def init_image(size=64) -> str:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def test_xyz_2x2_through_webuiapi_grid_size_labels_and_cells(server):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    # txt2img axis indexes of A1111 1.10: 4 = Steps, 6 = CFG Scale
    result = api.txt2img(prompt="a red fox", script_name="X/Y/Z plot",
                         script_args=xyz_args(4, "1-2", 6, "3, 6.5"), **SMALL)
    grid, cells = result.images[0].convert("RGB"), [im.convert("RGB") for im in result.images[1:]]
    assert len(cells) == 4 and all(c.size == (64, 64) for c in cells)
    assert grid.width == LEGEND_LEFT + 2 * 64 and grid.height > 2 * 64  # column legends on top
    top = grid.height - 2 * 64
    for i, cell in enumerate(cells):  # cells in grid order: x fastest, then y
        x, y = LEGEND_LEFT + (i % 2) * 64, top + (i // 2) * 64
        assert np.array_equal(np.asarray(grid.crop((x, y, x + 64, y + 64))), np.asarray(cell)), i
    legend = np.asarray(grid.crop((0, 0, grid.width, top)))
    assert (legend < 128).any() and (legend == 255).mean() > 0.5  # dark text on white
    texts = result.info["infotexts"]
    grid_fields = fields_of(texts[:1])[0]
    assert grid_fields["Script"] == "X/Y/Z plot" and grid_fields["X Type"] == "Steps"
    assert grid_fields["X Values"] == "1-2" and grid_fields["Y Type"] == "CFG Scale"
    cell_fields = fields_of(texts[1:])
    assert [(f["Steps"], f["CFG scale"]) for f in cell_fields] == [(1, 3.0), (2, 3.0), (1, 6.5), (2, 6.5)]
    assert all("Script" not in f and f["Seed"] == 42 for f in cell_fields)
    assert not np.array_equal(np.asarray(cells[0]), np.asarray(cells[3]))


def test_xyz_2x2x2_with_sub_grids_margins_and_progress(http, server):
    args = xyz_args(4, "1, 2", 1, "5, 6", 6, "2-4 [2]", include_sub_grids=True, margin_size=4)
    with ProgressTexts(server) as progress:
        images, info = post(http, "txt2img", prompt="a fox", script_name="x/y/z plot", script_args=args)
    assert len(images) == 1 + 2 + 8
    sub = images[1]
    assert sub.size == images[2].size
    assert sub.width == LEGEND_LEFT + 2 * 64 + 4 and sub.height > 2 * 64 + 4
    grid = images[0]
    assert grid.width == 2 * sub.width and grid.height > sub.height  # Z titles above the sub-grids
    fields = fields_of(info["infotexts"][3:])
    assert [(f["Steps"], f["Seed"], f["CFG scale"]) for f in fields][:4] == [
        (1, 5, 2.0), (2, 5, 2.0), (1, 6, 2.0), (2, 6, 2.0)]
    assert {f["CFG scale"] for f in fields[4:]} == {4.0}
    assert sorted(set(progress.texts), key=lambda t: int(t.split()[1].split("/")[0])) == [
        f"cell {n}/8" for n in range(1, 9)]
    zfields = fields_of(info["infotexts"][:1])[0]
    assert zfields["Z Type"] == "CFG Scale" and zfields["Fixed Y Values"] == "5, 6"


def test_xyz_checkpoint_axis_loads_each_model_once(http, caplog):
    assert http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "ca"}).status_code == 200
    caplog.set_level(logging.INFO, logger="modules.jobs.executor")
    caplog.clear()
    # checkpoints on X (innermost by position), seeds on Y: the costly axis is moved outermost
    args = xyz_args("Checkpoint name", "cb, ca", "Seed", "1, 2, 3")
    images, info = post(http, "txt2img", prompt="a fox", script_name="X/Y/Z plot", script_args=args)
    loads = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loading checkpoint")]
    assert loads == ["loading checkpoint cb", "loading checkpoint ca"]
    models = [f["Model"] for f in fields_of(info["infotexts"][1:])]
    assert models == ["cb", "ca"] * 3
    assert len(images) == 7


def test_xyz_named_args_keep_minus_one_and_dropdown_values(http):
    args = {"x_type": "Sampler", "x_values_dropdown": ["Euler", "Euler a"], "no_fixed_seeds": True,
            "include_lone_images": True}
    images, info = post(http, "txt2img", prompt="fox", seed=-1, script_name="X/Y/Z plot", script_args=args)
    samplers = [f["Sampler"] for f in fields_of(info["infotexts"][1:])]
    assert samplers == ["Euler", "Euler a"] and len(images) == 3


def test_xyz_vary_seeds_adds_each_cell_position_to_the_seed(http):
    """Forge's 18-value order with "Vary seeds for X" and "for Y": x counts by 1, y by the x count."""
    forge = [4, "1, 2, 1", [], 6, "5, 7", [], 0, "", [], True, True, False, False, True, True, False, 0, False]
    images, info = post(http, "txt2img", prompt="a fox", seed=100, script_name="X/Y/Z plot", script_args=forge)
    cells = fields_of(info["infotexts"][1:])
    assert [f["Seed"] for f in cells] == [100, 101, 102, 103, 104, 105]
    assert [(f["Steps"], f["CFG scale"]) for f in cells] == [(1, 5), (2, 5), (1, 5), (1, 7), (2, 7), (1, 7)]
    assert len(images) == 7
    # the same x value at a different x position gives a different image; without varying it is the same
    assert not np.array_equal(np.asarray(images[1]), np.asarray(images[3]))
    plain, _ = post(http, "txt2img", prompt="a fox", seed=100, script_name="X/Y/Z plot",
                    script_args=xyz_args("Steps", "1, 2, 1"))
    assert np.array_equal(np.asarray(plain[1]), np.asarray(plain[3]))
    assert np.array_equal(np.asarray(plain[1]), np.asarray(images[1]))


@pytest.mark.parametrize("args, words", [
    (xyz_args(9, "Euler, Nope"), ["'Nope'", "sampler"]),  # 9 = Sampler
    (xyz_args("Sampler", "Euler", "Schedule type", "Karras, Wobbly"), ["'Wobbly'"]),
    (xyz_args("Checkpoint name", "ca, missing-model"), ["missing-model"]),
    (xyz_args("Steps", "1, lots"), ["'lots'", "Steps"]),
    (xyz_args("Steps", "0-2"), ["Steps", "value 0"]),
    (xyz_args("Prompt S/R", "zebra, horse"), ["'zebra'"]),
    (xyz_args("Token merging ratio", "0.5"), ["'Token merging ratio'", "not available"]),
    (xyz_args(99, "1"), ["index 99"]),
    (xyz_args("Styles", "No such style"), ["'No such style'"]),
    ([0] * 20, ["at most 19"]),
])
def test_bad_xyz_input_is_a_422_naming_the_value_and_nothing_is_queued(http, args, words):
    before = job_count(http)
    response = http.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": "a fox", "script_name": "X/Y/Z plot",
                                                    "script_args": args})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"][0]
    assert detail["loc"] == ["body", "script_args"]
    assert all(w in detail["msg"] for w in words), detail["msg"]
    assert job_count(http) == before


def test_unknown_script_and_tab_mismatch_are_422(http):
    for kind, name in (("txt2img", "No such script"), ("txt2img", "SD upscale")):
        response = http.post(f"/sdapi/v1/{kind}", json={**SMALL, "script_name": name})
        assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "script_name"]
        assert name in response.json()["detail"][0]["msg"]


def test_prompt_matrix_image_counts_and_grid(http):
    # A1111 1.10 ui() order: put_at_start, different_seeds, prompt_type, variations_delimiter, margin_size
    images, info = post(http, "txt2img", prompt="a fox|in snow|at night", script_name="Prompt matrix",
                        script_args=[False, True, "positive", "comma", 0])
    assert len(images) == 1 + 4
    grid = images[0]
    assert grid.width == LEGEND_LEFT + 2 * 64 and grid.height > 2 * 64  # 2 x 2 with legends
    assert info["all_prompts"][1:] == ["a fox", "a fox, in snow", "a fox, at night", "a fox, in snow, at night"]
    assert info["all_seeds"][1:] == [42, 43, 44, 45]
    images, info = post(http, "txt2img", prompt="cat|a|b|c", script_name="Prompt matrix",
                        script_args=[True, False, "positive", "space", 0])
    assert len(images) == 1 + 8 and info["all_prompts"][-1] == "a b c cat" and set(info["all_seeds"]) == {42}


def test_prompts_from_file_with_per_line_flags(http):
    lines = ('--prompt "a blue bird" --negative_prompt "blurry" --steps 2 --seed 7 --sampler_name "Euler a" '
             '--width 128 --cfg_scale 4.5\n\nplain words here\n--prompt owl --n_iter 2 --sd_model cb')
    # A1111 1.10 ui() order: checkbox_iterate, checkbox_iterate_batch, prompt_position, prompt_txt
    images, info = post(http, "txt2img", prompt="", script_name="Prompts from file or textbox",
                        script_args=[False, False, "start", lines])
    assert [im.size for im in images] == [(128, 64), (64, 64), (64, 64), (64, 64)]
    fields = fields_of(info["infotexts"])
    assert (fields[0]["Steps"], fields[0]["Seed"], fields[0]["Sampler"], fields[0]["CFG scale"]) == (2, 7, "Euler a",
                                                                                                    4.5)
    assert fields[0]["Prompt"] == "a blue bird" and fields[0]["Negative prompt"] == "blurry"
    assert fields[1]["Prompt"] == "plain words here" and fields[1]["Steps"] == 1 and fields[1]["Seed"] == 42
    assert [f["Model"] for f in fields[2:]] == ["cb", "cb"] and fields[3]["Seed"] == 43


def test_prompts_from_file_position_and_iterated_seeds(http):
    images, info = post(http, "txt2img", prompt="base", script_name="Prompts from file or textbox",
                        script_args={"checkbox_iterate": True, "prompt_position": "end", "prompt_txt": "one\ntwo"})
    assert info["all_prompts"] == ["base one", "base two"] and info["all_seeds"] == [42, 43]


@pytest.mark.parametrize("text, words", [
    ("--prompt x --steps many", ["--steps", "'many'"]),
    ("--prompt x --outpath_samples /etc", ["--outpath_samples", "not allowed"]),
    ("--prompt x --frobnicate 1", ["--frobnicate"]),
    ('--prompt x --sampler_name "Nope"', ["'Nope'"]),
    ("--prompt x --sd_model nothing-here", ["nothing-here"]),
    ("--prompt x --steps 0", ["steps"]),
])
def test_bad_prompts_from_file_lines_are_422(http, text, words):
    before = job_count(http)
    response = http.post("/sdapi/v1/txt2img", json={**SMALL, "script_name": "Prompts from file or textbox",
                                                    "script_args": [False, False, "start", f"fine\n{text}"]})
    assert response.status_code == 422, response.text
    message = response.json()["detail"][0]["msg"]
    assert all(w in message for w in words), message
    assert job_count(http) == before


def test_sd_upscale_size_and_tiling(http, server):
    # A1111 1.10 ui() order: info, overlap, upscaler_index, scale_factor; upscaler 1 = Lanczos
    with ProgressTexts(server) as progress:
        images, info = post(http, "img2img", init_images=[init_image(64)], denoising_strength=0.3,
                            script_name="SD upscale", script_args=[None, 16, 1, 2])
    assert len(images) == 1 and images[0].size == (128, 128)
    fields = fields_of(info["infotexts"][:1])[0]
    assert fields["SD upscale overlap"] == 16 and fields["SD upscale upscaler"] == "Lanczos"
    assert progress.texts[-1] == "tile 9/9"  # (128 - 16) / (64 - 16) -> 3 x 3 tiles
    with ProgressTexts(server) as progress:
        images, info = post(http, "img2img", init_images=[init_image(64)], denoising_strength=0.3, batch_size=4,
                            script_name="SD upscale", script_args={"overlap": 0, "upscaler_index": "Nearest",
                                                                   "scale_factor": 2})
    assert images[0].size == (128, 128)
    assert set(progress.texts) == {"tile 1/1"}  # 2 x 2 tiles in one batch of 4


def test_sd_upscale_refuses_tiles_larger_than_the_result(http):
    response = http.post("/sdapi/v1/img2img", json={**SMALL, "width": 256, "height": 256,
                                                    "init_images": [init_image(64)], "script_name": "SD upscale",
                                                    "script_args": [None, 16, "Lanczos", 2]})
    assert response.status_code == 422 and "smaller than one 256x256 tile" in response.json()["detail"][0]["msg"]


def test_loopback_feeds_each_result_back(http):
    images, info = post(http, "img2img", init_images=[init_image(64)], denoising_strength=0.5,
                        script_name="Loopback", script_args=[3, 0.2, "Linear", "None"])
    assert len(images) == 1 + 3 and images[0].size == (3 * 64, 64)
    assert info["all_seeds"] == [42, 42, 43, 44]
    strengths = [f["Denoising strength"] for f in fields_of(info["infotexts"][1:])]
    assert strengths == pytest.approx([0.5, 0.35, 0.2])
    response = http.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [init_image(64)],
                                                    "script_name": "Loopback", "script_args": [2, 0.5, "Linear",
                                                                                               "CLIP"]})
    assert response.status_code == 422 and "CLIP" in response.json()["detail"][0]["msg"]


def test_scripts_and_script_info_lists(http):
    scripts = http.get("/sdapi/v1/scripts").json()
    assert scripts["txt2img"] == ["x/y/z plot", "prompt matrix", "prompts from file or textbox"]
    assert scripts["img2img"] == [*scripts["txt2img"], "sd upscale", "loopback", "outpainting mk2"]
    info = http.get("/sdapi/v1/script-info").json()
    xyz = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])
    assert [a["label"] for a in xyz["args"]][:4] == ["X type", "X values", "X values (list)", "Y type"]
    assert len(xyz["args"]) == 19 and "Sampler" in xyz["args"][0]["choices"]  # A1111's 16, then vary seeds x/y/z
    assert [a["label"] for a in xyz["args"]][16:] == ["Vary seeds for X", "Vary seeds for Y", "Vary seeds for Z"]
    upscale = next(s for s in info if s["name"] == "sd upscale")
    assert upscale["is_img2img"] and upscale["args"][2]["choices"][:3] == ["None", "Lanczos", "Nearest"]
    assert not any(s["name"] == "sd upscale" and not s["is_img2img"] for s in info)


def test_a_script_run_is_one_job_that_interrupt_stops_between_cells(http):
    """Queued through the jobs API: the X/Y/Z run is one job; interrupting it keeps the cells done so far."""
    params = {**SMALL, "prompt": "slow fox", "steps": 30, "script_name": "X/Y/Z plot",
              "script_args": xyz_args("Seed", "1-6", include_lone_images=True)}
    created = http.post("/api/v1/jobs", json={"kind": "txt2img", "params": params})
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        progress = http.get(f"/api/v1/jobs/{job_id}").json()["progress"]
        if progress["text"].startswith("cell 2/"):
            break
        time.sleep(0.02)
    assert progress["text"].startswith("cell 2/6") and progress["job_count"] == 6
    http.post("/sdapi/v1/interrupt")
    while (job := http.get(f"/api/v1/jobs/{job_id}").json())["state"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert job["state"] == "done" and job["result"]["interrupted"] is True
    assert 1 + 1 <= len(job["result"]["images"]) < 1 + 6  # the grid and the cells finished before the interrupt


def test_grid_save_options_format_infotext_and_off(http, server):
    from modules import images as image_files

    grids = server.context.app.settings.outputs_dir / "txt2img-grids"
    before = set(grids.rglob("*.*")) if grids.exists() else set()
    assert http.post("/sdapi/v1/options", json={"grid_format": "gif"}).status_code == 422
    try:
        assert http.post("/sdapi/v1/options", json={"grid_format": "jpg", "enable_pnginfo": False}).status_code == 200
        post(http, "txt2img", prompt="owl|moon", save_images=True, script_name="Prompt matrix")
        new = set(grids.rglob("*.*")) - before
        assert len(new) == 1 and next(iter(new)).suffix == ".jpg"
        assert image_files.read_infotext(next(iter(new))) is None
        assert http.post("/sdapi/v1/options", json={"grid_save": False, "grid_format": "png",
                                                    "enable_pnginfo": True}).status_code == 200
        post(http, "txt2img", prompt="owl|moon", save_images=True, script_name="Prompt matrix")
        assert set(grids.rglob("*.*")) - before == new  # no grid saved
        assert http.post("/sdapi/v1/options", json={"grid_save": True}).status_code == 200
        post(http, "txt2img", prompt="owl|moon", save_images=True, script_name="Prompt matrix")
        latest = set(grids.rglob("*.png")) - before
        assert len(latest) == 1 and "Script: Prompt matrix" in image_files.read_infotext(next(iter(latest)))
    finally:
        http.post("/sdapi/v1/options", json={"grid_save": True, "grid_format": "png", "enable_pnginfo": True})


def test_outpainting_mk2_grows_each_side_in_its_own_pass(http, server):
    # A1111 1.10 ui() order: info, pixels, mask_blur, direction, noise_q, color_variation
    with ProgressTexts(server) as progress:
        images, info = post(http, "img2img", init_images=[init_image(64)], denoising_strength=0.8,
                            script_name="Outpainting mk2", script_args=[None, 64, 4, ["left", "up"], 1.0, 0.05])
    assert len(images) == 1 and images[0].size == (128, 128)
    assert set(progress.texts) == {"side 1/2", "side 2/2"}
    assert fields_of(info["infotexts"])[0]["Script"] == "Outpainting mk2"
    response = http.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [init_image(64)],
                                                    "script_name": "Outpainting mk2",
                                                    "script_args": [None, 64, 4, ["sideways"], 1.0, 0.05]})
    assert response.status_code == 422 and "sideways" in response.json()["detail"][0]["msg"]


def test_xyz_in_img2img_varies_denoising_on_the_init_image(http):
    # img2img axis indexes of A1111 1.10: 22 = Denoising
    images, info = post(http, "img2img", init_images=[init_image(64)], prompt="fox", script_name="X/Y/Z plot",
                        script_args=xyz_args(22, "0.25, 0.75"))
    assert len(images) == 3 and images[0].width == 2 * 64 and images[0].height > 64  # no Y axis: no row legends
    assert [f["Denoising strength"] for f in fields_of(info["infotexts"][1:])] == [0.25, 0.75]
    response = http.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [init_image(64)],
                                                    "script_name": "X/Y/Z plot",
                                                    "script_args": xyz_args("Hires steps", "1, 2")})
    assert response.status_code == 422 and "'Hires steps' is not available" in response.json()["detail"][0]["msg"]
