"""``GET /``: the playground, one static page and its script (package data in ``service/api/static``)."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

router = APIRouter()

_STATIC = resources.files("service.api") / "static"


def _static_file(name: str, media_type: str) -> Response:
    # Read per request: the files are small, and an edited page shows without a restart.
    return Response((_STATIC / name).read_bytes(), media_type=media_type, headers={"Cache-Control": "no-cache"})


@router.get("/", include_in_schema=False)
async def playground_page() -> Response:
    return _static_file("index.html", "text/html; charset=utf-8")


@router.get("/playground.js", include_in_schema=False)
async def playground_script() -> Response:
    return _static_file("playground.js", "text/javascript; charset=utf-8")
