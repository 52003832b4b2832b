"""The browser pages: the chat page at ``/`` and the read-only live view at ``/watch/<id>``.

Both are small templates (``relay/web/templates/``) that load plain ES modules from
``relay/web/static/`` (no build step); Markdown is rendered with the vendored ``marked`` and
sanitized with ``DOMPurify`` (``deploy/vendor.sh``). The pages run under a strict
Content-Security-Policy: no inline script or style, and with Trusted Types, HTML reaches the
DOM only through DOMPurify's policy.
"""

from __future__ import annotations

from flask import Blueprint, Response, render_template, request

pages = Blueprint("pages", __name__, static_folder="static", static_url_path="/static")

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        # Only DOMPurify's own policy may create HTML for innerHTML and friends.
        "require-trusted-types-for 'script'",
        "trusted-types dompurify",
    ]
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _page(template: str, **context: str) -> Response:
    response = Response(render_template(template, **context), mimetype="text/html")
    response.headers.update(PAGE_HEADERS)
    return response


@pages.get("/")
def chat():
    return _page("chat.html")


@pages.get("/watch/<job_id>")
def watch(job_id: str):
    # The page itself works out whether the job exists (it may not have started yet).
    return _page("watch.html", job_id=job_id)


@pages.after_app_request
def _static_headers(response: Response) -> Response:
    """Scripts and styles are served with nosniff (``/static`` is the app's or this blueprint's)."""
    if request.endpoint in ("static", "pages.static"):
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
    return response
