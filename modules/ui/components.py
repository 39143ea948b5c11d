"""Shared widgets of the generation tabs, each registered in a `Fields` under its params field name."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from modules.pipeline.params import MIN_SIZE
from modules.ui.bindings import Fields

AUTOMATIC = "Automatic"
SAME = "Use same sampler"
SAME_SCHEDULE = "Use same scheduler"


@dataclass
class PromptArea:
    prompt: gr.Textbox
    negative: gr.Textbox
    prompt_tokens: gr.HTML
    negative_tokens: gr.HTML
    read_params: gr.Button
    styles: gr.Dropdown
    apply_styles: gr.Button
    style_name: gr.Textbox
    save_style: gr.Button


@dataclass
class ActionButtons:
    generate: gr.Button
    interrupt: gr.Button
    skip: gr.Button


@dataclass
class SeedRow:
    random: gr.Button
    reuse: gr.Button


@dataclass
class ParamsPanel:
    """Everything a generation tab binds: `fields` by params name, plus the buttons around them."""

    fields: Fields
    prompts: PromptArea
    actions: ActionButtons
    seed: SeedRow
    swap_size: gr.Button
    extras: dict[str, Any] = field(default_factory=dict)


def icon_button(icon: str, elem_id: str) -> gr.Button:
    """A small text-icon button (no emoji: they render as boxes without emoji fonts); modules/ui/hints.py
    gives it its aria-label and tooltip by `elem_id`."""
    return gr.Button(icon, size="sm", scale=0, min_width=36, elem_id=elem_id,
                     elem_classes=["atelier-icon-button"])


def prompt_area(tab: str, style_names: list[str], fields: Fields) -> PromptArea:
    """Prompt boxes and styles, at the top of the controls column (the result column sits beside them,
    with Generate/Interrupt/Skip above the results, so both are in view at 1280x720)."""
    prompt = gr.Textbox("", label="Prompt", lines=2, max_lines=8, elem_id=f"{tab}-prompt",
                        placeholder="Prompt (Ctrl+Enter to generate; paste infotext and press the "
                                    "read-parameters button to read it)")
    prompt_tokens = gr.HTML("<span class='atelier-tokens'>0/75</span>", elem_id=f"{tab}-token-counter",
                            elem_classes=["atelier-token-counter"])
    negative = gr.Textbox("", label="Negative prompt", lines=1, max_lines=6, elem_id=f"{tab}-negative-prompt")
    negative_tokens = gr.HTML("<span class='atelier-tokens'>0/75</span>",
                              elem_id=f"{tab}-negative-token-counter", elem_classes=["atelier-token-counter"])
    with gr.Row(equal_height=True):
        styles = gr.Dropdown(style_names, value=[], multiselect=True, label="Styles", scale=4,
                             elem_id=f"{tab}-styles")
        read_params = icon_button("\u2199", f"{tab}-read-params")
        apply_styles = icon_button("\u2398", f"{tab}-apply-styles")
    with gr.Accordion("Save as style", open=False, elem_id=f"{tab}-save-style-box"):
        with gr.Row(equal_height=True):
            style_name = gr.Textbox(label="New style name", max_lines=1, elem_id=f"{tab}-style-name", scale=4)
            save_style = gr.Button("Save", size="sm", scale=1, elem_id=f"{tab}-save-style")
    fields.update(prompt=prompt, negative_prompt=negative, styles=styles)
    return PromptArea(prompt, negative, prompt_tokens, negative_tokens, read_params, styles, apply_styles,
                      style_name, save_style)


def action_buttons(tab: str) -> ActionButtons:
    with gr.Row(equal_height=True, elem_classes=["atelier-actions"]):
        generate = gr.Button("Generate", variant="primary", elem_id=f"{tab}-generate", scale=3)
        interrupt = gr.Button("Interrupt", elem_id=f"{tab}-interrupt", scale=1, min_width=80)
        skip = gr.Button("Skip", elem_id=f"{tab}-skip", scale=1, min_width=60)
    return ActionButtons(generate, interrupt, skip)


def sampler_row(tab: str, samplers: list[str], schedules: list[str], defaults: dict, fields: Fields) -> None:
    with gr.Row():
        fields["sampler_name"] = gr.Dropdown(samplers, value=defaults["sampler_name"], label="Sampling method",
                                             elem_id=f"{tab}-sampler")
        fields["scheduler"] = gr.Dropdown([AUTOMATIC, *schedules], value=defaults["scheduler"],
                                          label="Schedule type", elem_id=f"{tab}-scheduler")
        fields["steps"] = gr.Slider(1, 150, value=defaults["steps"], step=1, label="Sampling steps",
                                    elem_id=f"{tab}-steps")


def size_rows(tab: str, defaults: dict, fields: Fields, max_size: int) -> gr.Button:
    with gr.Row():
        with gr.Column(scale=4):
            fields["width"] = gr.Slider(MIN_SIZE, max_size, value=defaults["width"], step=8, label="Width",
                                        elem_id=f"{tab}-width")
            fields["height"] = gr.Slider(MIN_SIZE, max_size, value=defaults["height"], step=8, label="Height",
                                         elem_id=f"{tab}-height")
        swap = icon_button("\u21c5", f"{tab}-swap-size")
        with gr.Column(scale=2):
            fields["n_iter"] = gr.Slider(1, 100, value=1, step=1, label="Batch count", elem_id=f"{tab}-n-iter")
            fields["batch_size"] = gr.Slider(1, 8, value=1, step=1, label="Batch size", elem_id=f"{tab}-batch-size")
    with gr.Row(equal_height=True):
        fields["cfg_scale"] = gr.Slider(1.0, 30.0, value=defaults["cfg_scale"], step=0.5, label="CFG Scale",
                                        elem_id=f"{tab}-cfg-scale", scale=4)
        fields["tiling"] = gr.Checkbox(False, label="Tiling", elem_id=f"{tab}-tiling", scale=1, min_width=90)
        fields["restore_faces"] = gr.Checkbox(False, label="Restore faces", elem_id=f"{tab}-restore-faces", scale=1,
                                              min_width=90)
    with gr.Accordion("FLUX.1 / SD3.5", open=False):  # other models ignore these
        with gr.Row():
            fields["distilled_cfg_scale"] = gr.Slider(0.0, 30.0, value=defaults["distilled_cfg_scale"], step=0.1,
                                                      label="Distilled CFG Scale (FLUX.1-dev)",
                                                      elem_id=f"{tab}-distilled-cfg-scale")
            fields["shift"] = gr.Number(0, label="Shift (0: the model's)", minimum=0, maximum=100,
                                        elem_id=f"{tab}-shift")
    return swap


def seed_row(tab: str, fields: Fields) -> SeedRow:
    with gr.Row():
        fields["seed"] = gr.Number(-1, label="Seed", precision=0, elem_id=f"{tab}-seed", scale=4)
        random = icon_button("\u2684", f"{tab}-random-seed")
        reuse = icon_button("\u21ba", f"{tab}-reuse-seed")
    with gr.Accordion("Variation seed", open=False):
        with gr.Row():
            fields["subseed"] = gr.Number(-1, label="Variation seed", precision=0, elem_id=f"{tab}-subseed")
            fields["subseed_strength"] = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Variation strength",
                                                   elem_id=f"{tab}-subseed-strength")
        with gr.Row():
            fields["seed_resize_from_w"] = gr.Slider(0, 2048, value=0, step=8, label="Resize seed from width",
                                                     elem_id=f"{tab}-seed-resize-w")
            fields["seed_resize_from_h"] = gr.Slider(0, 2048, value=0, step=8, label="Resize seed from height",
                                                     elem_id=f"{tab}-seed-resize-h")
    return SeedRow(random, reuse)


def hires_accordion(tab: str, samplers: list[str], schedules: list[str], upscalers: list[str],
                    fields: Fields) -> None:
    with gr.Accordion("Hires. fix", open=False, elem_id=f"{tab}-hires"):
        fields["enable_hr"] = gr.Checkbox(False, label="Enable hires. fix", elem_id=f"{tab}-enable-hr")
        with gr.Row():
            fields["hr_upscaler"] = gr.Dropdown(upscalers, value=upscalers[0] if upscalers else None,
                                                label="Upscaler", elem_id=f"{tab}-hr-upscaler")
            fields["hr_second_pass_steps"] = gr.Slider(0, 150, value=0, step=1, label="Hires steps",
                                                          elem_id=f"{tab}-hr-steps")
            fields["denoising_strength"] = gr.Slider(0.0, 1.0, value=0.7, step=0.01, label="Denoising strength",
                                                     elem_id=f"{tab}-hr-denoising")
        with gr.Row():
            fields["hr_scale"] = gr.Slider(1.0, 4.0, value=2.0, step=0.05, label="Upscale by",
                                           elem_id=f"{tab}-hr-scale")
            fields["hr_resize_x"] = gr.Slider(0, 4096, value=0, step=8, label="Resize width to")
            fields["hr_resize_y"] = gr.Slider(0, 4096, value=0, step=8, label="Resize height to")
        with gr.Row():
            fields["hr_sampler_name"] = gr.Dropdown([SAME, *samplers], value=SAME, label="Hires sampling method")
            fields["hr_scheduler"] = gr.Dropdown([SAME_SCHEDULE, AUTOMATIC, *schedules], value=SAME_SCHEDULE,
                                                 label="Hires schedule type")
        fields["hr_prompt"] = gr.Textbox("", label="Hires prompt (empty: the same)", lines=1)
        fields["hr_negative_prompt"] = gr.Textbox("", label="Hires negative prompt (empty: the same)",
                                                  lines=1)


NO_REFINER = "None"


def refiner_accordion(tab: str, titles: list[str], fields: Fields) -> gr.Button:
    """A1111 1.10's Refiner: a checkpoint ("None": off) with a refresh button, and the switch point."""
    with gr.Accordion("Refiner", open=False, elem_id=f"{tab}-refiner"):
        with gr.Row():
            fields["refiner_checkpoint"] = gr.Dropdown(
                [NO_REFINER, *titles], value=NO_REFINER, label="Checkpoint", elem_id=f"{tab}-refiner-checkpoint",
                allow_custom_value=True, scale=3)
            refresh = icon_button("\u21bb", f"{tab}-refiner-refresh")
        fields["refiner_switch_at"] = gr.Slider(0.01, 1.0, value=0.8, step=0.01, label="Switch at",
                                                elem_id=f"{tab}-refiner-switch-at")
    return refresh


def same_as_none(values: dict[str, Any]) -> dict[str, Any]:
    """'Use same ...' choices mean None (the first pass's value) in the params."""
    for name, same in (("hr_sampler_name", SAME), ("hr_scheduler", SAME_SCHEDULE)):
        if values.get(name) == same:
            values[name] = None
    return values
