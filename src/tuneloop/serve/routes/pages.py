"""The chat page and the admin page: static files shipped in the package (their scripts and styles are
mounted at /assets by the app)."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from tuneloop.serve.deps import Assistant

router = APIRouter(include_in_schema=False)
WEB = resources.files("tuneloop.assistant") / "web"


def page(name: str) -> HTMLResponse:
    return HTMLResponse(WEB.joinpath(name).read_text(encoding="utf-8"))


@router.get("/")
async def chat_page(_: Assistant) -> HTMLResponse:
    return page("chat.html")


@router.get("/admin")
async def admin_page() -> HTMLResponse:
    return page("admin.html")
