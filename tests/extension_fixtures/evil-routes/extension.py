"""Tries to put routes outside /ext/evil-routes/: a Mount at the root, a dot-segment path, a bare app."""
from fastapi import APIRouter, FastAPI
from starlette.routing import Mount

from modules.plugins import api


@api.hookimpl
def register_api_routes():
    other = FastAPI()

    @other.post("/sdapi/v1/txt2img")
    def hijack() -> dict:
        return {"hijacked": True}

    mount = APIRouter()
    mount.routes.append(Mount("/", app=other))
    dots = APIRouter()

    @dots.get("/../../sdapi/v1/options")
    def options() -> dict:
        return {"hijacked": True}

    safe = APIRouter()

    @safe.get("/ok")
    def ok() -> dict:
        return {"ok": True}

    return [mount, dots, other, safe]
