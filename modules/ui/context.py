"""What every tab needs: the server context, who is asking, and a few shared lookups."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from modules.jobs.model import Caller
from modules.server.context import ServerContext
from modules.server.events import EventHub
from modules.ui.session import caller_of_request

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class UIContext:
    server: ServerContext
    hub: EventHub | None = None  # the server's job events (app.state.hub); the UI follows jobs through it
    tabs: dict[str, Any] = field(default_factory=dict)  # tab name -> its handle, filled by create_ui
    quicksettings: dict[str, Any] = field(default_factory=dict)  # option key -> its top-bar widget

    @property
    def app(self):
        return self.server.app

    def caller(self, request: Any) -> Caller:
        return caller_of_request(request, self.server.config.admin_users)

    def events(self) -> EventHub:
        """The job event hub; the UI is served only from the FastAPI app that holds one."""
        if self.hub is None:
            raise RuntimeError("the web UI needs the server's EventHub: mount it with mount_webui")
        return self.hub

    def preview_every(self) -> int:
        if not self.server.options.get("live_previews_enable", True):
            return 0
        try:
            return max(int(self.server.options.get("show_progress_every_n_steps", 1)), 1)
        except (TypeError, ValueError):
            return 1

    @property
    def local_only(self) -> bool:
        return self.server.config.host in LOOPBACK

    def checkpoint_titles(self) -> list[str]:
        return [self.server.title(info) for info in self.server.checkpoints()]

    def checkpoint_choices(self) -> list[tuple[str, str]]:
        """(label, title) per checkpoint: quantized and fp8 files show their format ('... · Q8_0')."""
        choices = []
        for info in self.server.checkpoints():
            title, fmt = self.server.title(info), self.server.weight_format(info)
            packed = fmt is not None and fmt not in ("fp32", "fp16", "bf16")
            choices.append((f"{title} \u00b7 {fmt}" if packed else title, title))
        return choices

    def current_checkpoint(self) -> str | None:
        """The current checkpoint's title as the dropdown lists it (the hash appears once known)."""
        name = self.server.options.get("sd_model_checkpoint")
        info = self.server.find_checkpoint(str(name)) if name else None
        return self.server.title(info) if info is not None else name

    def default(self, name: str, fallback: Any) -> Any:
        """A UI default from the settings (default sampler and schedule)."""
        return self.server.options.get(f"atelier_default_{name}", fallback) or fallback
