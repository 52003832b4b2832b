"""The browser pages: the chat page at ``/`` and the read-only live view at ``/watch/<id>``."""

from __future__ import annotations

from flask import Blueprint

pages = Blueprint("pages", __name__, static_folder="static", static_url_path="/static")
