"""The typed job payload: lossless JSON round trips (hypothesis), field-named errors, one submit path."""
from __future__ import annotations

import ast
import dataclasses
import json
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from modules.errors import InvalidParams
from modules.jobs.model import Job
from modules.jobs.payload import JobPayload, build_params, encode_params, field_names, params_class
from modules.jobs.store import JobStore
from modules.settings import Limits

ROOT = Path(__file__).resolve().parent.parent
SIZES = st.integers(8, 128).map(lambda n: n * 8)
RANGES = {
    "width": SIZES, "height": SIZES, "steps": st.integers(1, 150), "batch_size": st.integers(1, 8),
    "n_iter": st.integers(1, 4), "clip_skip": st.integers(1, 12), "seed": st.integers(-1, 2**32 - 1),
    "subseed": st.integers(-1, 2**32 - 1), "seed_resize_from_w": st.sampled_from([0, 64, 512]),
    "seed_resize_from_h": st.sampled_from([0, 64, 512]), "cfg_scale": st.floats(0, 30),
    "subseed_strength": st.floats(0, 1), "denoising_strength": st.floats(0, 1), "hr_scale": st.floats(1, 4),
    "hr_second_pass_steps": st.integers(0, 50), "hr_resize_x": st.sampled_from([0, 128, 1024]),
    "hr_resize_y": st.sampled_from([0, 128, 1024]), "resize_mode": st.integers(0, 2),
    "mask_blur": st.integers(0, 64), "inpainting_fill": st.integers(0, 3), "inpainting_mask_invert": st.integers(0, 1),
    "inpaint_full_res_padding": st.integers(0, 256), "initial_noise_multiplier": st.floats(0, 10),
    "outpaint": st.none(), "image_cfg_scale": st.none() | st.floats(0, 100),
    "refiner_switch_at": st.none() | st.floats(0, 1), "uni_pc_order": st.none() | st.integers(1, 3),
    "img2img_extra_noise": st.floats(0, 1),
}
JSON_LEAF = st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.floats(allow_nan=False, allow_infinity=False) | st.text()
JSON = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                    max_leaves=8)


def _strategy(tp):
    """A strategy for a params field's declared type."""
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, __import__("types").UnionType) else (tp,)
    parts = [st.none() if o is type(None) else _one(o) for o in options]
    return st.one_of(*parts)


def _one(tp):
    origin = typing.get_origin(tp) or tp
    simple = {bool: st.booleans(), int: st.integers(0, 1000), float: st.floats(-1e6, 1e6, allow_nan=False),
              str: st.text(max_size=40), Path: st.text(min_size=1, max_size=10).map(Path)}
    if origin in simple:
        return simple[origin]
    if origin is tuple:
        return st.lists(st.text(max_size=10), max_size=3).map(tuple)
    return st.dictionaries(st.text(max_size=8), st.dictionaries(st.text(max_size=8), JSON, max_size=3), max_size=2)


def params_strategy(kind: str):
    cls = params_class(kind)
    hints = typing.get_type_hints(cls)
    fields = {name: RANGES.get(name, _strategy(hints[name])) for name in field_names(cls)}
    return st.fixed_dictionaries(fields).map(lambda values: cls(**values))


def _valid(params) -> bool:
    image = Image.new("RGB", (8, 8))
    probe = dataclasses.replace(params, init_images=(image,)) if hasattr(params, "init_images") else params
    try:
        probe.validate(Limits())
    except InvalidParams:
        return False
    return True


def _typed(value):
    """Value with the type of every element, so that 1 == 1.0 or a list == tuple cannot pass."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_typed(v) for v in value])
    if isinstance(value, dict):
        return ("dict", {k: _typed(v) for k, v in value.items()})
    return (type(value).__name__, value)


payloads = st.sampled_from(["txt2img", "img2img"]).flatmap(lambda kind: st.builds(
    JobPayload, kind=st.just(kind), params=params_strategy(kind), checkpoint=st.text(max_size=20),
    inputs=st.just({"init_images": ["/data/job-inputs/x/init_images-0.png"]} if kind == "img2img" else {}),
    request=st.dictionaries(st.text(max_size=10), JSON, max_size=4), warnings=st.lists(st.text()).map(tuple),
    source=st.sampled_from(["api", "ui", "jobs-api", "cli"])))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads)
def test_payload_round_trips_through_json_with_types(payload):
    assume(_valid(payload.params))
    text = json.dumps(payload.to_json())
    back = JobPayload.from_json(json.loads(text))
    assert back == payload
    for f in dataclasses.fields(payload.params):
        assert _typed(getattr(back.params, f.name)) == _typed(getattr(payload.params, f.name)), f.name
    assert json.dumps(back.to_json()) == text


def test_payload_survives_the_history_store(tmp_path):
    params = build_params(params_class("txt2img"), {"prompt": "a fox", "styles": ["a", "b"], "cfg_scale": 7,
                                                     "extension_args": {"x": {"on": True, "w": 0.5}}})
    payload = JobPayload("txt2img", params, "tiny", request={"prompt": "a fox"})
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.add(Job(id="a" * 32, owner="me", kind="txt2img", params=payload.to_json()))
    back = JobPayload.from_json(store.get("a" * 32).params)
    assert back == payload and back.params.styles == ("a", "b") and type(back.params.cfg_scale) is float


@pytest.mark.parametrize("values, field", [
    ({"steps": "20"}, "steps"), ({"cfg_scale": True}, "cfg_scale"), ({"styles": "noir"}, "styles"),
    ({"eta": float("nan")}, "eta"), ({"wdth": 64}, "wdth"), ({"extension_args": {"x": {1, 2}}}, "extension_args"),
])
def test_wrong_types_name_the_field(values, field):
    with pytest.raises(InvalidParams) as err:
        build_params(params_class("txt2img"), values)
    assert err.value.field == field and field in str(err.value)


def test_legacy_history_rows_still_read():
    """Rows from before payloads had a version (max_size was a field then)."""
    row = {"checkpoint": "tiny", "params": {"prompt": "old", "max_size": 4096, "steps": 3}, "inputs": {},
           "warnings": [], "request": {"prompt": "old"}, "source": "ui"}
    payload = JobPayload.from_json(row, kind="txt2img")
    assert payload.params.prompt == "old" and payload.params.steps == 3 and payload.source == "ui"


def test_server_only_fields_are_not_client_fields():
    for kind in ("txt2img", "img2img"):
        names = field_names(params_class(kind))
        assert not names & {"outdir", "init_images", "mask", "max_size"}
        assert "max_size" not in {f.name for f in dataclasses.fields(params_class(kind))}
    assert "outdir" not in encode_params(params_class("txt2img")(outdir=Path("/tmp/x")))


def _calls_of_manager_submit(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and node.func.attr == "submit"
            and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "jobs"]


def test_one_submit_function_calls_the_job_manager():
    """Only SubmitService.submit calls JobManager.submit (as `self.jobs.submit` / `ctx.jobs.submit`)."""
    callers = {str(p.relative_to(ROOT)): lines for p in sorted((ROOT / "modules").rglob("*.py"))
               if (lines := _calls_of_manager_submit(p))}
    assert list(callers) == ["modules/jobs/submit.py"] and len(callers["modules/jobs/submit.py"]) == 1


def test_api_ui_and_cli_requests_make_the_same_payload(tmp_path, tiny_sd1):
    """The three front ends describe one job three ways; the submit service makes one payload of them."""
    from modules.app import build_app
    from modules.cli import build_parser
    from modules.cli import submission as cli_submission
    from modules.jobs.local import local_jobs
    from modules.jobs.submit import Submission
    from modules.server.config import ServerConfig
    from modules.server.context import build_context
    from modules.server.convert import submission as api_submission
    from modules.server.schemas import Txt2ImgRequest
    from modules.settings import Settings
    from tests.api_server import models_dir_with

    settings = Settings(models_dir=models_dir_with(tmp_path, {"tiny": tiny_sd1}), data_dir=tmp_path / "data",
                        outputs_dir=tmp_path / "out", device="cpu", precision="fp32")
    app = build_app(settings)
    ctx = build_context(app, ServerConfig())
    job = dict(prompt="a fox", negative_prompt="rain", steps=7, cfg_scale=5, seed=3, width=64, height=128)
    api = ctx.submitter.prepare(api_submission(ctx, "txt2img", Txt2ImgRequest(
        **job, sampler_name="Euler", override_settings={"sd_model_checkpoint": "tiny"})))
    ui = ctx.submitter.prepare(Submission("txt2img", {**job, "sampler_name": "Euler", "save_images": False},
                                                checkpoint="tiny"))
    args = build_parser().parse_args(["generate", "--prompt", "a fox", "--negative-prompt", "rain", "--steps", "7",
                                      "--cfg-scale", "5", "--seed", "3", "--width", "64", "--height", "128",
                                      "--sampler", "Euler"])
    with local_jobs(app) as (_, submitter):
        cli = submitter.prepare(cli_submission(args))
    cli_params = dataclasses.replace(cli.params, save_images=False)
    assert api.params == ui.params == cli_params
    assert _typed(encode_params(api.params)) == _typed(encode_params(cli_params))
