"""The server's OpenAPI document, made from the same table of operations the app's routes are
made from (api/app.py) and the pydantic definitions the wire modules validate with; and the
interactive /docs page, whose Swagger UI assets come from the `swagger-ui-bundle` package
(Apache-2.0; served from this process, nothing from a CDN).

The document is OpenAPI 3.0.3 (what the bundled Swagger UI 4 renders): pydantic's JSON Schema
is rewritten where 3.0 differs (`null` in anyOf -> `nullable`, `const` -> one-value `enum`).
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import TypeAdapter
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response

from .. import __version__

JSON_ONLY = ("application/json",)
BOTH = ("application/json", "application/msgpack")  # request and response encodings
REF = "#/components/schemas/{model}"
MSGPACK = "application/msgpack"
# A msgpack response has the JSON response's fields with arrays as msgpack-numpy maps
# ({nd, type, kind, shape, data}); no JSON Schema describes binary values, so it is open.
MSGPACK_BODY = {"description": "the JSON response's fields; arrays as msgpack-numpy maps"}


@dataclass
class Operation:
    """One route: its handler, how it answers errors, and what it takes and returns."""

    method: str
    path: str
    handler: Callable
    summary: str
    tag: str
    request: Any = None  # a pydantic model or type; None: no body
    responses: dict[int, Any] = field(default_factory=dict)  # status -> type (None: no body)
    content: tuple[str, ...] = JSON_ONLY  # request and response encodings
    path_params: tuple[str, ...] = ()
    response_media: str | None = None  # a non-JSON body (text/plain)


def _openapi30(node: Any) -> Any:
    """pydantic's JSON Schema (2020-12) as OpenAPI 3.0 schema objects."""
    if isinstance(node, list):
        return [_openapi30(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    for key in ("anyOf", "oneOf"):  # `X | None` -> X, nullable (before X is converted)
        options = node.get(key)
        if options and {"type": "null"} in options:
            rest = [o for o in options if o != {"type": "null"}]
            node.pop(key)
            if len(rest) == 1 and "$ref" not in rest[0]:
                node = {**rest[0], **node}
            else:
                node[key] = rest
            node["nullable"] = True
    node = {k: _openapi30(v) for k, v in node.items()}
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if node.get("nullable") and "enum" in node and None not in node["enum"]:
        node["enum"] = [*node["enum"], None]  # OpenAPI 3.0: an enum lists null to allow it
    if node.get("type") == "null":
        node = {"nullable": True, "enum": [None]}
    return node


class Schemas:
    """Component schemas collected from pydantic types."""

    def __init__(self) -> None:
        self.components: dict[str, Any] = {}

    def of(self, kind: Any) -> dict[str, Any]:
        schema = TypeAdapter(kind).json_schema(ref_template=REF, mode="serialization")
        for name, sub in schema.pop("$defs", {}).items():
            self._add(name, _openapi30(sub))
        name = getattr(kind, "__name__", None)
        if name and isinstance(kind, type) and schema.get("type") == "object":
            self._add(name, _openapi30(schema))
            return {"$ref": REF.format(model=name)}
        return _openapi30(schema)

    def _add(self, name: str, schema: dict[str, Any]) -> None:
        if self.components.setdefault(name, schema) != schema:
            raise ValueError(f"two definitions are named {name}")


def document(operations: list[Operation], examples: dict[str, str] | None = None
             ) -> dict[str, Any]:
    """The OpenAPI document of `operations`; `examples`: a path parameter's example value
    (a served model, so that the document's examples reach one)."""
    schemas, paths = Schemas(), {}
    for op in operations:
        entry: dict[str, Any] = {"summary": op.summary, "tags": [op.tag],
                                 "operationId": f"{op.method}_{op.path}".lower()
                                 .replace("/", "_").replace("{", "").replace("}", "")
                                 .replace(":path", "")}
        params = [{"name": p, "in": "path", "required": True,
                   "schema": {"type": "string", "minLength": 1},
                   **({"example": examples[p]} if p in (examples or {}) else {})}
                  for p in op.path_params]
        if params:
            entry["parameters"] = params
        if op.request is not None:
            body = schemas.of(op.request)
            entry["requestBody"] = {"required": True,
                                    "content": {t: {"schema": body} for t in op.content}}
        entry["responses"] = {}
        for status, kind in op.responses.items():
            out: dict[str, Any] = {"description": "OK" if status < 400 else "error"}
            if kind is not None:
                media = (op.response_media,) if op.response_media and status < 400 else \
                    (op.content if status < 400 else JSON_ONLY)
                out["content"] = {t: {"schema": schemas.of(kind) if t != MSGPACK else
                                      MSGPACK_BODY} for t in media}
            entry["responses"][str(status)] = out
        path = op.path.replace(":path", "")
        paths.setdefault(path, {})[op.method.lower()] = entry
    return {"openapi": "3.0.3",
            "info": {"title": "SIE server", "version": __version__,
                     "description": "SIE's protocol, OpenAI embeddings, TEI, Cohere/Jina "
                                    "rerank and infinity over one engine."},
            "paths": paths, "components": {"schemas": schemas.components}}


def _assets() -> Path:
    import swagger_ui_bundle

    return Path(str(swagger_ui_bundle.swagger_ui_path))


def licence() -> str:
    """swagger-ui-bundle's licence text (Apache-2.0), served at /docs/LICENSE."""
    return importlib.metadata.distribution("swagger-ui-bundle").read_text("LICENSE") or \
        "Apache-2.0"


# Links relative to /docs, so that the page works under a route prefix (a Ray Serve
# application's, which the Gateway names in PREFIX_HEADER).
DOCS_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>SIE server API</title>
<link rel="stylesheet" href="docs/swagger-ui.css"></head>
<body><div id="ui"></div>
<script src="docs/swagger-ui-bundle.js"></script>
<script src="docs/init.js"></script>
<p style="font:12px sans-serif">Swagger UI (swagger-ui-bundle, <a href="docs/LICENSE">Apache-2.0
licence</a>)</p></body></html>"""
INIT_JS = 'window.ui = SwaggerUIBundle({url: "openapi.json", dom_id: "#ui"});'
PREFIX_HEADER = "x-forwarded-prefix"  # a path prefix in front of this app: the spec's server
ASSETS = {"swagger-ui.css", "swagger-ui-bundle.js"}


def routes(operations: list[Operation], examples: dict[str, str] | None = None
           ) -> dict[str, Callable]:
    """Handlers of /openapi.json, /docs and /docs/{asset}."""
    spec = document(operations, examples)

    async def openapi_json(request) -> Response:
        prefix = request.headers.get(PREFIX_HEADER, "").rstrip("/")
        return JSONResponse({**spec, "servers": [{"url": prefix}]} if prefix else spec)

    async def docs(request) -> Response:
        return HTMLResponse(DOCS_HTML)

    async def asset(request) -> Response:
        name = request.path_params["name"]
        if name == "init.js":
            return Response(INIT_JS, media_type="application/javascript")
        if name == "LICENSE":
            return Response(licence(), media_type="text/plain")
        path = _assets() / name
        if name not in ASSETS or not path.is_file():
            return JSONResponse({"detail": {"code": "NOT_FOUND",
                                            "message": f"no docs asset {name[:64]}"}}, 404)
        return FileResponse(path)

    return {"openapi": openapi_json, "docs": docs, "asset": asset}
