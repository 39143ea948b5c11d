"""API routes, UI specs and lifecycle hooks."""
from fastapi import APIRouter

from modules.plugins import api

STARTED: list = []
SAVED: list = []


@api.hookimpl
def register_api_routes():
    router = APIRouter()

    @router.get("/hello")
    def hello() -> dict:
        return {"hello": "web-ext"}

    return [router]


@api.hookimpl
def register_ui_sections(tab):
    return [api.UISectionSpec("web-ext", "Web extension", tabs=("txt2img",),
                              options=(api.OptionSpec("level", "Level", 3, "slider", 0, 10, 1),))]


@api.hookimpl
def register_ui_tabs():
    return [api.UITabSpec("web-ext-tab", "Web ext", build=lambda context: None)]


@api.hookimpl
def on_app_started(app):
    STARTED.append(app)


@api.hookimpl
def on_image_saved(path, params, infotext):
    SAVED.append((path, infotext))
