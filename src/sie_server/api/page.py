"""The web page at `/` (status and playground): static files shipped in the package
(`sie_server/page/`), served as they are, with no network use beyond this server.

The page only calls routes that exist for every client (`/health`, `/v1/models`, `/status`,
`/v1/encode`, `/v1/score`, `/v1/tokens`), with the API key the user types in its tab.
"""

from __future__ import annotations

from importlib import resources

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

ASSETS = "/ui/"  # the page's files other than index.html
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# Everything the page loads or calls is on this origin; nothing inline, no frames.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self'; connect-src 'self'; form-action 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def load_files() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, media type) of every file of the page."""
    root = resources.files("sie_server") / "page"
    out = {}
    for f in root.iterdir():
        suffix = f.name[f.name.rfind("."):]
        if f.is_file() and suffix in _TYPES:
            out[f.name] = (f.read_bytes(), _TYPES[suffix])
    return out


def routes() -> list[Route]:
    files = load_files()

    def serve(name: str) -> Response:
        if name not in files:
            raise HTTPException(404, f"no file {name[:200]!r} in the page")
        body, media_type = files[name]
        return Response(body, media_type=media_type, headers=HEADERS)

    async def index(request: Request) -> Response:
        return serve("index.html")

    async def asset(request: Request) -> Response:
        return serve(request.path_params["name"])

    return [Route("/", index, methods=["GET"]),
            Route(ASSETS + "{name}", asset, methods=["GET"])]
