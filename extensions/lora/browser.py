"""The extra-networks browser: card data for LoRA, Textual Inversion and Checkpoints, filtering,
an HTML card grid, and the Gradio section under the prompt (`register_ui_sections`).

Cards are plain HTML in one `gr.HTML` per tab (1,000 cards render as one string; images load
lazily from `/ext/lora/preview`). A click appends the card's tag to the tab's prompt box
(`#<tab>-prompt textarea`) and fires an `input` event so Gradio sees the change.
"""
from __future__ import annotations

import html
import json
from typing import Any
from urllib.parse import quote

from modules.plugins import api

from .library import LoraLibrary, preview, sidecar, walk_files
from .ti import EmbeddingLibrary

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
_CLICK = ("(function(c){var t=document.querySelector('#'+c.dataset.tab+'-prompt textarea');if(!t)return;"
          "var v=t.value.trim();t.value=(v?v+' ':'')+c.dataset.prompt;"
          "t.dispatchEvent(new Event('input',{bubbles:true}));})(this)")


def _weight(meta: dict[str, Any]) -> float | None:
    try:
        value = float(meta.get("preferred weight", 0) or 0)
    except (TypeError, ValueError):
        return None
    return value or None


def _format_weight(weight: float | None) -> str:
    return f"{weight if weight is not None else 1.0:g}"


def lora_items(library: LoraLibrary) -> list[api.ExtraNetworkItem]:
    items = []
    for lora in library.all():
        meta = sidecar(lora.path)
        weight = _weight(meta)
        activation = str(meta.get("activation text", "") or "")
        prompt = f"<lora:{lora.name}:{_format_weight(weight)}>" + (f" {activation}" if activation else "")
        items.append(api.ExtraNetworkItem(
            name=lora.name, path=str(lora.path), folder=lora.folder, prompt=prompt, alias=lora.stem,
            preview=preview(lora.path), description=str(meta.get("description", "") or ""),
            activation_text=activation, preferred_weight=weight, search_terms=(lora.name, lora.path.name),
            metadata=lora.metadata))
    return items


def embedding_items(library: EmbeddingLibrary) -> list[api.ExtraNetworkItem]:
    items = []
    for path in library.files():
        meta = sidecar(path)
        root = next((r for r in library.roots if path.is_relative_to(r)), path.parent)
        rel = path.relative_to(root).with_suffix("").as_posix()
        items.append(api.ExtraNetworkItem(
            name=path.stem, path=str(path), folder=rel.rsplit("/", 1)[0] if "/" in rel else "", prompt=path.stem,
            preview=preview(path), description=str(meta.get("description", "") or ""),
            search_terms=(rel, path.name)))
    return items


def checkpoint_items(settings: Any) -> list[api.ExtraNetworkItem]:
    roots = list(getattr(settings, "checkpoint_dirs", ()))
    items = []
    for root, path in walk_files(roots, CHECKPOINT_SUFFIXES):
        rel = path.relative_to(root).with_suffix("").as_posix()
        items.append(api.ExtraNetworkItem(
            name=rel, path=str(path), folder=rel.rsplit("/", 1)[0] if "/" in rel else "",
            preview=preview(path), description=str(sidecar(path).get("description", "") or ""),
            search_terms=(rel,)))
    return items


def folders(items: list[api.ExtraNetworkItem]) -> list[str]:
    return sorted({i.folder for i in items if i.folder})


def filter_items(items: list[api.ExtraNetworkItem], search: str = "", folder: str = "") -> list[api.ExtraNetworkItem]:
    """Case-insensitive search over name, terms and description; `folder` keeps that subtree."""
    words = (search or "").lower().split()
    keep = []
    for item in items:
        if folder and not (item.folder == folder or item.folder.startswith(folder + "/")):
            continue
        text = " ".join((item.name, item.description, *item.search_terms)).lower()
        if all(w in text for w in words):
            keep.append(item)
    return keep


def render_cards(items: list[api.ExtraNetworkItem], tab: str, kind: str) -> str:
    """The card grid as one HTML string (all text escaped)."""
    cards = []
    for item in items:
        image = ""
        if item.preview:
            url = f"/ext/lora/preview?kind={quote(kind)}&name={quote(item.name)}"
            image = f'<img src="{url}" loading="lazy" alt="">'
        click = f' onclick="{_CLICK}"' if item.prompt else ""
        cards.append(
            f'<div class="atelier-card" data-tab="{html.escape(tab)}" data-prompt="{html.escape(item.prompt)}"'
            f' title="{html.escape(item.description or item.name)}"{click}>{image}'
            f'<span class="atelier-card-name">{html.escape(item.name)}</span></div>')
    if not cards:
        return '<div class="atelier-cards-empty">Nothing here. Put files in the folder and press Refresh.</div>'
    return f'<div class="atelier-cards" style="{_GRID}">{"".join(cards)}</div>'


_GRID = "display:grid;grid-template-columns:repeat(auto-fill,minmax(128px,1fr));gap:6px;max-height:480px;overflow:auto"
# Scoped to the grid's gr.HTML: a card looks clickable and a preview fills its width.
CARD_CSS = """
.atelier-card { display: flex; flex-direction: column; justify-content: flex-end; gap: 4px; min-height: 48px;
  padding: 6px; border: 1px solid var(--border-color-primary); border-radius: 6px; overflow: hidden;
  background: var(--block-background-fill); }
.atelier-card[onclick] { cursor: pointer; }
.atelier-card[onclick]:hover { border-color: var(--color-accent); }
.atelier-card img { width: 100%; aspect-ratio: 1; object-fit: cover; border-radius: 4px; }
.atelier-card-name { font-size: 12px; overflow-wrap: anywhere; }
"""


def find_item(specs: list[api.ExtraNetworkSpec], name: str) -> api.ExtraNetworkItem | None:
    for spec in specs:
        item = next((i for i in (spec.items() if spec.items else []) if i.name == name), None)
        if item is not None:
            return item
    return None


def api_router(specs: dict[str, list[api.ExtraNetworkSpec]]) -> Any:
    """GET /ext/lora/preview and /ext/lora/metadata: only files of listed cards are served."""
    from fastapi import APIRouter, HTTPException
    from fastapi.responses import FileResponse

    router = APIRouter()

    @router.get("/preview", response_class=FileResponse, response_model=None)
    def card_preview(kind: str, name: str):
        item = find_item(specs.get(kind, []), name)
        if item is None or not item.preview:
            raise HTTPException(404, "no preview")
        return FileResponse(item.preview)

    @router.get("/metadata")
    def card_metadata(kind: str, name: str) -> dict[str, Any]:
        item = find_item(specs.get(kind, []), name)
        if item is None:
            raise HTTPException(404, f"no {kind} named {name!r}")
        return decoded_metadata(item)

    return router


def decoded_metadata(item: api.ExtraNetworkItem) -> dict[str, Any]:
    """Training metadata with kohya's JSON-in-string values decoded."""
    if item.metadata is None:
        return {}
    meta = {}
    for key, value in dict(item.metadata()).items():
        try:
            meta[key] = json.loads(value) if isinstance(value, str) and value[:1] in "{[" else value
        except ValueError:
            meta[key] = value
    return meta


def build_tab(spec: api.ExtraNetworkSpec, tab: str, registry: Any) -> None:
    """One network kind's cards with search, folder filter, refresh and (LoRA) metadata on demand."""
    import gradio as gr

    items = spec.items() if spec.items else []
    with gr.Row():
        search = gr.Textbox(show_label=False, placeholder="Search", scale=3, elem_id=f"{tab}-en-{spec.name}-search")
        folder = gr.Dropdown(["", *folders(items)], value="", label="Folder", scale=1)
        refresh = gr.Button("Refresh", size="sm", scale=0)
    grid = gr.HTML(render_cards(items, tab, spec.name), css_template=CARD_CSS)

    def update(text: str, where: str) -> str:
        return render_cards(filter_items(spec.items() if spec.items else [], text, where), tab, spec.name)

    def rescan(text: str, where: str):
        if spec.refresh is not None:
            spec.refresh()
        listed = spec.items() if spec.items else []
        return render_cards(filter_items(listed, text, where), tab, spec.name), gr.update(choices=["", *folders(listed)])

    search.change(update, [search, folder], grid, queue=False)
    folder.change(update, [search, folder], grid, queue=False)
    refresh.click(rescan, [search, folder], [grid, folder], queue=False)
    if spec.name == "lora":
        with gr.Accordion("Training metadata", open=False):
            chosen = gr.Dropdown([i.name for i in items], label="LoRA")
            shown = gr.JSON()
            def show(name: str) -> dict[str, Any]:
                item = find_item([spec], name or "")
                return decoded_metadata(item) if item is not None else {}

            chosen.change(show, chosen, shown, queue=False)


def browser_section(tab: str) -> api.UISectionSpec:
    def build(context: Any) -> dict:
        import gradio as gr

        registry = context.app.registries.extra_networks
        with gr.Tabs():
            for spec in sorted(registry, key=lambda s: s.order):
                with gr.Tab(spec.title):
                    build_tab(spec, tab, registry)
        return {}  # nothing goes to extension_args

    return api.UISectionSpec("extra-networks", "Extra networks", tabs=(tab,), build=build, order=0)
