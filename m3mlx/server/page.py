"""The web chat page at `/`: static files shipped in the package (`static/`), no build step.

The page is an ordinary client of the API (`/v1/models`, streamed `/v1/chat/completions`);
nothing here is special to it but serving its files. They are public (the page asks for the
API key itself) and come with a content security policy that allows scripts, styles and
connections from this server only, so even a rendering bug cannot run what a model wrote.
"""

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # a new m3mlx version's page is picked up at once
}


class _Files(StaticFiles):
    async def get_response(self, path, scope):
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        return response


def add_page(app: FastAPI):
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers=HEADERS)

    app.mount("/static", _Files(directory=STATIC), name="static")
