"""Stands in for a pip-installed package found through the `atelier.extensions` entry points."""
from modules.plugins import api

EXTENSION = {"api_version": "1.0", "version": "2.3.4", "description": "from an entry point"}


@api.hookimpl
def register_styles():
    return [api.StyleSpec("Entry point style", "{prompt}, via entry point")]
