"""Error envelopes: each protocol's own on its routes (SIE's `{detail}`, OpenAI's `{error}`,
TEI's `{error, error_type}`, Cohere's and Jina's rerank bodies), each with X-SIE-Error-Code
and Retry-After, and SIE's status (TEI's routes: TEI's, api/tei.py). `renderer(path)` picks
one by the request's path: for every route's errors (api/app.py) and for those raised outside
a route: the API-key check and an unexpected error (api/middleware.py), an unknown route or
method, and the Ray gateway's own (ray/serve.py). tests/test_dropin.py holds it to the
envelope each route's OpenAPI entry documents."""

from __future__ import annotations

from typing import Callable

from starlette.requests import Request
from starlette.responses import Response

from ..errors import SIEError
from ..logs import request_id
from . import openai, rerank, tei
from .wire import JSON, encode_body, error_body

Render = Callable[[Request, SIEError], Response]
RERANK_PATHS = ("/v1/rerank", "/v2/rerank")


def sie_error(request: Request, err: SIEError) -> Response:
    """SIE's error envelope (always JSON, as SIE sends it), its code in X-SIE-Error-Code."""
    headers = {"X-SIE-Error-Code": err.code}
    if err.retry_after:
        headers["Retry-After"] = str(max(1, round(err.retry_after)))
    rid = request_id.get()  # "-": none (the Ray gateway's own errors)
    return Response(encode_body(error_body(err, None if rid == "-" else rid), False),
                    err.status, media_type=JSON, headers=headers)


def openai_error(request: Request, err: SIEError) -> Response:
    """OpenAI's envelope, which its clients parse."""
    return _with_body(sie_error(request, err), openai.error_body(err))


def rerank_error(request: Request, err: SIEError) -> Response:
    """Cohere v1 / Jina's rerank error body on /v1/rerank, Cohere v2's on /v2/rerank."""
    body = rerank.error_v2(err) if request.url.path.startswith("/v2/") else rerank.error_v1(err)
    return _with_body(sie_error(request, err), body)


def tei_error(request: Request, err: SIEError) -> Response:
    """TEI's body and status (api/tei.py), with X-SIE-Error-Code."""
    response = tei.error_response(request, err)
    response.headers.setdefault("X-SIE-Error-Code", err.code)
    return response


def renderer(path: str, infinity_prefix: str = "") -> Render:
    """The envelope of the route at `path` (a request's path, after any route prefix)."""
    prefix = infinity_prefix.rstrip("/")
    if path in (openai.PATH, "/embeddings") or path.startswith(openai.PATH + "/") or (
            prefix and path in (prefix + "/embeddings", prefix + "/rerank")):
        return openai_error
    if path in RERANK_PATHS:
        return rerank_error
    if path in tei.PATHS:
        return tei_error
    return sie_error


def _with_body(response: Response, body: dict) -> Response:
    """`response` (status and headers kept) with `body` as its JSON."""
    response.body = encode_body(body, False)
    response.headers["content-length"] = str(len(response.body))
    return response
