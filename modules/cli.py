"""Command line: `webui.py generate ...` makes images; `webui.py` alone starts the app."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from modules.benchmark import add_benchmark_arguments
from modules.cli_img2img import add_image_arguments, hires_kwargs, img2img_values
from modules.errors import AtelierError
from modules.server.config import add_server_arguments
from modules.settings import add_settings_arguments, settings_from_args

SD_DEFAULTS = {"steps": 20, "sampler_name": "DPM++ 2M", "scheduler": "Automatic", "cfg_scale": 7.0,
               "distilled_cfg_scale": 3.5}


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", default="")
    parser.add_argument("--negative-prompt", default="")
    family = "; on FLUX.1 / SD3.5 the model family's"
    parser.add_argument("--steps", type=int, help=f"default {SD_DEFAULTS['steps']}{family}")
    parser.add_argument("--sampler", help=f"default {SD_DEFAULTS['sampler_name']}{family}")
    parser.add_argument("--scheduler", help=f"default {SD_DEFAULTS['scheduler']}{family}")
    parser.add_argument("--cfg-scale", type=float, help=f"default {SD_DEFAULTS['cfg_scale']}{family}")
    parser.add_argument("--distilled-cfg-scale", type=float,
                        help=f"FLUX.1-dev's guidance embedding (Forge's Distilled CFG Scale), default 3.5{family}")
    parser.add_argument("--shift", type=float, help="flow models' time shift (default: the family's)")
    parser.add_argument("--seed", type=int, default=-1)
    parser.add_argument("--subseed", type=int, default=-1)
    parser.add_argument("--subseed-strength", type=float, default=0.0)
    parser.add_argument("--width", type=int, help="default 512, or the init image's size")
    parser.add_argument("--height", type=int, help="default 512, or the init image's size")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--n-iter", type=int, default=1)
    parser.add_argument("--eta", type=float)
    parser.add_argument("--out", type=Path, help="output folder (default outputs/txt2img-images or img2img-images)")
    add_image_arguments(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="webui.py", description="Atelier: Stable Diffusion, local-first.")
    add_settings_arguments(parser)
    add_server_arguments(parser)
    add_benchmark_arguments(parser)
    commands = parser.add_subparsers(dest="command")
    generate = commands.add_parser("generate", help="generate images from the command line")
    add_settings_arguments(generate)
    for action in generate._actions:  # settings may come before or after the command
        if action.dest != "help":
            action.default = argparse.SUPPRESS
    add_generate_arguments(generate)
    return parser


def common_values(args: argparse.Namespace, flow_model: bool = False) -> dict:
    """The params fields every task shares (width and height may be None: the task's default). Generation
    fields left unset take SD's defaults, or on FLUX.1 / SD3.5 (`flow_model`) the family's (params field
    `model_defaults`, set as the API sets it)."""
    given = {"steps": args.steps, "sampler_name": args.sampler, "scheduler": args.scheduler,
             "cfg_scale": args.cfg_scale, "distilled_cfg_scale": args.distilled_cfg_scale}
    unset = tuple(name for name, value in given.items() if value is None)
    return dict(
        prompt=args.prompt, negative_prompt=args.negative_prompt,
        **{name: SD_DEFAULTS[name] if value is None else value for name, value in given.items()},
        seed=args.seed, subseed=args.subseed, subseed_strength=args.subseed_strength, width=args.width,
        height=args.height, batch_size=args.batch_size, n_iter=args.n_iter, eta=args.eta, shift=args.shift,
        model_defaults=unset if flow_model else ())


def submission(args: argparse.Namespace, flow_model: bool = False):
    """The `generate` flags as a job submission (txt2img, or img2img with --init-image) for a checkpoint that
    is FLUX.1 / SD3.5 (`flow_model`) or not."""
    from modules.jobs.submit import Submission

    common = common_values(args, flow_model)
    hires = hires_kwargs(args)  # refuses the hires flags with --init-image
    if args.init_image:
        values, images = img2img_values(args, common)
        return Submission("img2img", values, images, source="cli")
    common.update(width=args.width or 512, height=args.height or 512)
    return Submission("txt2img", {**common, **hires}, source="cli")


def run_generate(args: argparse.Namespace) -> int:
    """Generate through the same submit service and job queue as the server, on an in-memory history."""
    from modules.app import build_app
    from modules.checkpoints.mmdit import is_flow_file
    from modules.jobs.local import local_jobs
    from modules.jobs.model import DONE, Caller

    app = build_app(settings_from_args(args))
    checkpoint = app.engine.default_checkpoint()
    flow_model = checkpoint is not None and is_flow_file(checkpoint.path)
    with local_jobs(app, outdir=args.out, on_event=_print_progress) as (jobs, submitter):
        job = jobs.wait(submitter.submit(Caller("cli"), submission(args, flow_model)).id)
    if job.state != DONE:
        raise AtelierError(job.error or f"the job ended {job.state}")
    for warning in job.result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for path in job.result.images:
        print(path)
    return 0


def _print_progress(event) -> None:
    if event.type != "progress" or event.job is None:
        return
    p = event.job.progress
    print(f"\rbatch {p.job_no + 1}/{p.job_count} step {p.step}/{p.steps}",
          end="\n" if p.step == p.steps else "", file=sys.stderr, flush=True)


def run_app(args: argparse.Namespace) -> int:
    """Start the server: the jobs API always, /sdapi/v1 with --api or --nowebui, the web UI unless --nowebui."""
    import dataclasses

    from modules.app import build_app
    from modules.server.app import serve
    from modules.server.config import server_config_from_args
    from modules.server.context import build_context

    config = server_config_from_args(args)
    config.check_startup()  # before loading anything: refuse --listen without auth at once
    limits = {name: getattr(args, name) for name in ("max_size", "max_batch_size", "max_n_iter", "max_steps")}
    settings = dataclasses.replace(settings_from_args(args), **limits)
    app = build_app(settings)
    mount_ui = None
    if not config.nowebui:
        from modules.ui.mount import mount_webui as mount_ui
    serve(build_context(app, config), mount_ui)
    return 0


def run_benchmark_command(args: argparse.Namespace) -> int:
    """--benchmark: time a short generation with this machine's settings and default model."""
    from modules.app import build_app
    from modules.benchmark import run_benchmark

    app = build_app(settings_from_args(args))
    result = run_benchmark(app.engine, size=args.benchmark_size, steps=args.benchmark_steps)
    print(result.table())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return run_generate(args)
        if args.benchmark:
            return run_benchmark_command(args)
        return run_app(args)
    except AtelierError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
