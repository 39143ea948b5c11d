"""Prompt-area events: token counters, "read parameters" (↙), apply and save styles."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from modules import infotext
from modules import styles as style_files
from modules.errors import AtelierError, InvalidParams
from modules.plugins.specs import StyleSpec
from modules.ui import components as ui_components
from modules.ui.bindings import Fields, values_from_infotext
from modules.ui.context import UIContext
from modules.ui.tokens import counter_text


def checkpoint_for(ui: UIContext, parsed: dict[str, Any]) -> str | None:
    """The title of the checkpoint an infotext names (by name, then by hash), if it is here."""
    server = ui.server
    name, short = parsed.get("Model"), parsed.get("Model hash")
    if name:
        info = server.find_checkpoint(str(name))
        if info is not None:
            return server.title(info)
    if short:
        for info in server.checkpoints():
            description = server.describe(info)
            if description.get("hash") and str(description["hash"]).startswith(str(short)[:10]):
                return description["title"]
    return None


def wire_prompt_area(ui: UIContext, tab: str, prompts, fields: Fields, defaults: dict,
                     checkpoint: gr.Dropdown) -> None:
    tokenizer = ui.app.engine.tokenizer

    def count(text: str, steps: float) -> str:
        return f"<span class='atelier-tokens'>{counter_text(tokenizer(), text or '', int(steps or 20))}</span>"

    for box, counter in ((prompts.prompt, prompts.prompt_tokens), (prompts.negative, prompts.negative_tokens)):
        box.change(count, inputs=[box, fields["steps"]], outputs=counter, queue=False, show_progress="hidden",
                   trigger_mode="always_last")

    def read_parameters(text: str) -> dict:
        return apply_infotext(ui, fields, defaults, checkpoint, text)

    prompts.read_params.click(read_parameters, inputs=prompts.prompt,
                              outputs=[*fields.values(), checkpoint, *component_widgets(ui)], queue=False)

    def apply_styles(prompt: str, negative: str, chosen: list[str]) -> tuple:
        try:
            specs = [ui.app.registries.styles.get(name) for name in chosen or []]
            prompt, negative = style_files.apply_styles(prompt or "", negative or "", specs)
        except InvalidParams as err:  # a toast, and the boxes keep what the user typed
            gr.Warning(str(err))
            return prompt, negative, chosen
        return prompt, negative, []

    prompts.apply_styles.click(apply_styles, inputs=[prompts.prompt, prompts.negative, prompts.styles],
                               outputs=[prompts.prompt, prompts.negative, prompts.styles])

    def save_style(name: str, prompt: str, negative: str) -> tuple:
        return save_prompt_style(ui, name, prompt, negative)

    prompts.save_style.click(save_style, inputs=[prompts.style_name, prompts.prompt, prompts.negative],
                             outputs=[prompts.styles, prompts.style_name])
    # both queued: Gradio 6 shows gr.Warning/gr.Error toasts only from queued events, never from queue=False


def infotext_values(text: str, defaults: dict) -> dict[str, Any]:
    """Parsed infotext -> {field name: value} for a generation tab (None hires choices -> 'same')."""
    values = values_from_infotext(infotext.parse(text), defaults)
    if "hr_sampler_name" in defaults:
        values.setdefault("hr_sampler_name", None)
        values.setdefault("hr_scheduler", None)
        if values["hr_sampler_name"] is None:
            values["hr_sampler_name"] = ui_components.SAME
        if values["hr_scheduler"] is None:
            values["hr_scheduler"] = ui_components.SAME_SCHEDULE
    return values


def apply_infotext(ui: UIContext, fields: Fields, defaults: dict, checkpoint: gr.Dropdown, text: str) -> dict:
    """Fill a tab's fields from infotext; switch the checkpoint when the named one is here."""
    if not (text or "").strip():
        return {}
    values = infotext_values(text, defaults)
    updates = fields.updates(values)
    parsed = infotext.parse(text)
    title = checkpoint_for(ui, parsed)
    if title is not None:
        updates[checkpoint] = title
    if "refiner_checkpoint" in fields:
        updates.update(fields.updates(refiner_values(ui, values)))
    updates.update(component_updates(ui, parsed))
    return updates


def component_widgets(ui: UIContext) -> list:
    """The top bar's SD VAE and VAE / Text Encoder widgets (those the quicksettings list shows)."""
    return [ui.quicksettings[key] for key in ("sd_vae", "forge_additional_modules") if key in ui.quicksettings]


def component_updates(ui: UIContext, parsed: dict[str, Any]) -> dict:
    """Forge's `Module N` lines restore the VAE / Text Encoder picker; else A1111's `VAE` restores SD VAE.
    Files that are not here are left out, with a warning."""
    from modules.ui.options_ui import module_choices, sd_vae_choices

    numbered = {int(k[7:]): str(v) for k, v in parsed.items() if str(k).startswith("Module ") and k[7:].isdigit()}
    wanted = [numbered[n] for n in sorted(numbered)]
    widget, updates = ui.quicksettings.get("forge_additional_modules"), {}
    if wanted and widget is not None:
        files = module_choices(ui)
        found = [next((f for f in files if Path(f).stem == name or f == name), None) for name in wanted]
        missing = [name for name, f in zip(wanted, found, strict=True) if f is None]
        if missing:
            gr.Warning(f"Not in models/VAE or models/text_encoder: {', '.join(missing)}")
        updates[widget] = [f for f in found if f is not None]
    elif parsed.get("VAE") and "sd_vae" in ui.quicksettings:
        name = str(parsed["VAE"])
        if name in sd_vae_choices(ui):
            updates[ui.quicksettings["sd_vae"]] = name
    return updates


def refiner_values(ui: UIContext, values: dict[str, Any]) -> dict[str, Any]:
    """The refiner an infotext names, as the dropdown lists it; none named: no refiner (as A1111 pastes)."""
    name = values.get("refiner_checkpoint")
    if not name:
        return {"refiner_checkpoint": ui_components.NO_REFINER}
    info = ui.server.find_checkpoint(str(name))
    chosen: dict[str, Any] = {"refiner_checkpoint": ui.server.title(info) if info is not None else name}
    try:
        chosen["refiner_switch_at"] = float(values.get("refiner_switch_at", 0.8))
    except (TypeError, ValueError):
        pass
    return chosen


def save_prompt_style(ui: UIContext, name: str, prompt: str, negative: str) -> tuple:
    """Add or replace a style in the styles file (A1111's styles.csv) and in the dropdowns."""
    name = (name or "").strip()
    if not name:
        gr.Warning("Give the new style a name first (type it in \"New style name\").", title="Style not saved")
        return gr.skip(), gr.skip()
    store = ui.app.registries.styles  # this app's styles only
    try:
        path = store.save(StyleSpec(name, prompt or "", negative or "", "styles.csv"))
    except AtelierError as err:
        gr.Warning(str(err), title="Style not saved")
        return gr.skip(), gr.skip()
    gr.Info(f"Saved style {name!r} to {path.name}.")
    return gr.update(choices=store.names()), ""
