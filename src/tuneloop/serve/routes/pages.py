"""The chat page (the assistant's, shipped in `assistant/web/`) and the admin page (the server's, in
`serve/web/`): static files, their scripts and styles mounted by the app at /assistant-assets and /assets."""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from tuneloop.serve.deps import Chat

router = APIRouter(include_in_schema=False)
SERVER_WEB = resources.files("tuneloop.serve") / "web"
ASSISTANT_WEB = resources.files("tuneloop.assistant") / "web"


# The pages load only their own scripts, styles and API (no inline code), so nothing injected into them runs,
# and no other site may frame them (clickjacking the admin page's buttons).
PAGE_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def page(folder: Traversable, name: str) -> HTMLResponse:
    return HTMLResponse(
        folder.joinpath(name).read_text(encoding="utf-8"), headers={"Content-Security-Policy": PAGE_POLICY}
    )


@router.get("/")
async def chat_page(_: Chat) -> HTMLResponse:
    return page(ASSISTANT_WEB, "chat.html")


@router.get("/admin")
async def admin_page() -> HTMLResponse:
    return page(SERVER_WEB, "admin.html")
