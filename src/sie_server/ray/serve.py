"""The Ray Serve application: replicas that each build an Engine and host our HTTP app.

Two deployments. `SIEDeployment` replicas each build an Engine and run every request through
`create_app(engine)`, so every route, error, limit and metric of `sie-server serve` comes
along; each response names its replica (`X-SIE-Replica`, and a `sie_replica` gauge in
`/metrics`). `Gateway`, the HTTP ingress (`@serve.ingress()` with `__serve_build_asgi_app__`),
is a thin forwarder: it routes each request by the model it is for (`routed_model`: in the path
for SIE's routes, in the JSON body's `model` or the --embed-model / --rerank-model default for
the other protocols) through Serve's model multiplexing, sends a request whose replica died to
another one, and answers Serve's queue limit (`max_queued_requests`) with a 503 QUEUE_FULL in
the envelope of the route's protocol (api/envelopes.py).
See docs/RAY.md for why there are two.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import sys
from pathlib import Path
from typing import Any, Mapping

import anyio
from prometheus_client import Gauge, start_http_server
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request

from ..api import create_app
from ..api.infinity import DEFAULT as INFINITY_DEFAULT
from ..api.openapi import PREFIX_HEADER as _PREFIX
from ..api.envelopes import renderer
from ..config import Settings
from ..engine import Engine
from ..engine.profiles import split_ref
from ..errors import ModelLoading, Overloaded, SIEError

log = logging.getLogger("ray.serve")  # into Serve's replica logs, with request ids

REPLICA_HEADER = b"x-sie-replica"
PREFIX_HEADER = _PREFIX.encode()  # the application's route prefix, for the app's links
# Serve options of the SIE deployment; the other arguments of an app are Settings fields
# and ReplicaOptions / GatewayOptions fields.
DEPLOYMENT_KEYS = ("num_replicas", "autoscaling_config", "ray_actor_options",
                   "max_ongoing_requests", "max_queued_requests", "health_check_period_s",
                   "graceful_shutdown_timeout_s")
_PATH_FIELDS = {"catalog_files", "adapter_roots"}


@dataclasses.dataclass(frozen=True)
class ReplicaOptions:
    switch_interval_ms: float = 0.5  # as `sie-server serve --switch-interval-ms`
    max_models_per_replica: int = -1  # Serve's multiplexing LRU; -1: the engine's budget alone
    metrics_port: int | None = None  # each replica also serves /metrics on port + local rank


@dataclasses.dataclass(frozen=True)
class GatewayOptions:
    retries: int = 3  # a request whose replica died is sent again this many times
    gateway_replicas: int = 1
    gateway_cpus: float = 0.1


# Where the routes of api/app.py's operation table name their model (tests/test_ray.py checks
# every POST route of the app against these): SIE's in the path after one of PATH_ROUTES (and
# adapters at /v1/models/{model}/adapters/{id}); the other protocols' in the JSON body's
# `model`, else the role's default flag. Other routes name none: any replica answers.
PATH_ROUTES = ("/v1/encode/", "/v1/score/", "/v1/extract/", "/v1/tokens/")
BODY_ROUTES = {**dict.fromkeys(("/v1/embeddings", "/embeddings", "/embed", "/embed_sparse",
                                "/embed_all", "/similarity", "/tokenize", "/decode", "/"),
                               "embed"),
               **dict.fromkeys(("/v1/rerank", "/v2/rerank", "/rerank", "/predict"), "rerank")}
_PARSE_INLINE_BYTES = 1 << 16  # larger bodies are parsed for their `model` off the event loop


def routed_model(method: str, path: str, body: bytes, settings: Settings) -> str | None:
    """The model a request is for, as the replica's app will resolve it (a profile suffix
    `model:profile` routes as its model); None: any replica will do (every replica loads
    the default models, which is what a body without `model` gets when no default flag is
    set)."""
    for route in PATH_ROUTES:
        if path.startswith(route) and len(path) > len(route):
            return split_ref(path[len(route):], {})[0]
    if path.startswith("/v1/models/") and method in ("POST", "DELETE"):
        model, sep, _ = path[len("/v1/models/"):].partition("/adapters/")
        return model if sep and model else None
    prefix = settings.infinity_prefix.rstrip("/")
    if prefix and path.startswith(prefix + "/"):
        path = path[len(prefix):]
    role = BODY_ROUTES.get(path) if method == "POST" else None
    if role is None:
        return None
    named = _body_model(body)
    if named and named != INFINITY_DEFAULT:
        return split_ref(named, {})[0]
    return settings.embed_model if role == "embed" else settings.rerank_model


def _body_model(body: bytes) -> str | None:
    """A JSON body's top-level `model` string, if it has one (a bad body is the replica's
    to refuse)."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    model = value.get("model") if isinstance(value, dict) else None
    return model if isinstance(model, str) else None


class _Held:
    """What Serve's multiplexer keeps per model: the name only. The engine's memory budget,
    not Serve, decides what stays loaded; this tells Serve's router where a model lives."""

    def __init__(self, model: str) -> None:
        self.model = model


async def _hold(model: str) -> _Held:
    return _Held(model)


@serve.deployment(name="sie")
class SIEDeployment:
    """One replica: an Engine with its default models loaded before Serve routes to it, and
    `create_app(engine)` answering the requests the Gateway forwards."""

    async def __init__(self, settings: Settings, options: ReplicaOptions = ReplicaOptions()
                       ) -> None:
        sys.setswitchinterval(options.switch_interval_ms / 1000)  # actors keep Python's 5 ms
        self.engine = Engine(settings)
        await anyio.to_thread.run_sync(self.engine.start)
        context = serve.get_replica_context()
        self.replica = context.replica_tag
        Gauge("sie_replica", "the Ray Serve replica answering this scrape (value 1)",
              ["replica", "deployment"], registry=self.engine.metrics.registry
              ).labels(self.replica, context.deployment).set(1)
        if options.metrics_port is not None:
            port = options.metrics_port + context.rank.local_rank
            start_http_server(port, registry=self.engine.metrics.registry)
            log.info("replica %s serves /metrics on port %d", self.replica, port)
        self.known = {h.spec.name for h in self.engine.registry.handles()}
        self.hold = serve.multiplexed(max_num_models_per_replica=options.max_models_per_replica)(
            _hold)
        for name in self.engine.registry.defaults:
            await self.hold(name)
        self.http = ReplicaApp(create_app(self.engine, load_defaults=False), self)
        self.lifespan = Lifespan(self.http)
        await self.lifespan.start()

    async def forward(self, request: dict[str, Any]) -> dict[str, Any]:
        """One HTTP exchange from the Gateway, through the same app: {method, path, query,
        headers, body} -> {status, headers, body}."""
        return await call_asgi(self.http, request)

    async def __del__(self) -> None:
        """Serve calls this at replica shutdown: finish queued work, stop the workers."""
        await self.lifespan.stop()

    async def check_health(self) -> None:
        """Serve replaces a replica whose /healthz fails (a model worker died)."""
        response = await call_asgi(self.http, {"method": "GET", "path": "/healthz", "query": b"",
                                               "headers": [], "body": b""})
        if response["status"] != 200:
            raise RuntimeError(f"unhealthy: {response['body'].decode(errors='replace')}")


class ReplicaApp:
    """ASGI wrapper: tells Serve which model this replica serves now, stamps responses with
    the replica id."""

    def __init__(self, app: Any, replica: SIEDeployment) -> None:
        self.app, self.replica = app, replica
        self.tag = replica.replica.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        model = serve.get_multiplexed_model_id()  # the Gateway's routed_model
        if model in self.replica.known:
            await self.replica.hold(model)

        async def stamped(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REPLICA_HEADER, self.tag)]
            await send(message)

        await self.app(scope, receive, stamped)


class Lifespan:
    """Drives an ASGI app's lifespan: start-up before serving, shutdown (the engine drains
    and closes) when the replica stops."""

    def __init__(self, app: Any) -> None:
        self.app, self.inbox = app, asyncio.Queue()
        self.started, self.stopped = asyncio.Event(), asyncio.Event()

    async def _send(self, message: dict) -> None:
        kind = message["type"]
        if kind.endswith(".failed"):
            raise RuntimeError(f"{kind}: {message.get('message')}")
        (self.started if kind == "lifespan.startup.complete" else self.stopped).set()

    async def start(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self.task = asyncio.ensure_future(self.app(scope, self.inbox.get, self._send))
        await self.inbox.put({"type": "lifespan.startup"})
        await self.started.wait()

    async def stop(self) -> None:
        await self.inbox.put({"type": "lifespan.shutdown"})
        await self.stopped.wait()


async def call_asgi(app: Any, request: dict[str, Any]) -> dict[str, Any]:
    """Run one buffered HTTP request through an ASGI app in-process."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": request["method"], "scheme": "http", "path": request["path"],
             "raw_path": request["path"].encode(), "query_string": request["query"],
             "root_path": "", "headers": request["headers"], "client": request.get("client"),
             "server": None}
    sent, gone = False, asyncio.Event()
    out: dict[str, Any] = {"status": 500, "headers": [], "body": []}

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": request["body"], "more_body": False}
        await gone.wait()  # the app watches for a disconnect; the Gateway cancels us instead
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            out["status"], out["headers"] = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            out["body"].append(message.get("body", b""))

    await app(scope, receive, send)
    out["body"] = b"".join(out["body"])
    return out


@serve.deployment(name="gateway", max_ongoing_requests=1024)
@serve.ingress()
class Gateway:
    """The HTTP entry: forwards each request to an SIE replica that holds its model."""

    def __init__(self, sie: DeploymentHandle, settings: Settings,
                 options: GatewayOptions = GatewayOptions()) -> None:
        self.sie, self.settings, self.retries = sie, settings, options.retries

    def __serve_build_asgi_app__(self):
        return GatewayApp(self)

    async def relay(self, handle: DeploymentHandle, request: dict[str, Any]) -> dict[str, Any]:
        for attempt in range(self.retries + 1):
            try:
                return await handle.forward.remote(request)
            except BackPressureError as err:
                raise Overloaded(f"every replica is busy: {err.message}", retry_after=1) from None
            except DeploymentUnavailableError as err:
                raise ModelLoading(f"no replica can serve: {err.message}",
                                   retry_after=1) from None
            except RayActorError as err:  # the replica died with the request; try another
                log.warning("replica died during a request (attempt %d): %s", attempt + 1, err)
        raise ModelLoading(f"replicas died {self.retries + 1} times during this request",
                           retry_after=1)


class GatewayApp:
    """The Gateway's ASGI app: buffer the body, forward, answer."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":  # nothing to start or stop
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            return await send({"type": "lifespan.shutdown.complete"})
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):  # an application with a route_prefix
            path = path[len(root):]
        headers = [(k, v) for k, v in scope["headers"] if k != PREFIX_HEADER]
        if root:  # the app's own links and its OpenAPI `servers` (api/openapi.py)
            headers.append((PREFIX_HEADER, root.encode()))
        body = b"".join(chunks)
        request = {"method": scope["method"], "path": path,
                   "query": scope.get("query_string", b""), "headers": headers,
                   "body": body, "client": scope.get("client")}
        find = functools.partial(routed_model, scope["method"], path, body,
                                 self.gateway.settings)
        model = find() if len(body) <= _PARSE_INLINE_BYTES else await anyio.to_thread.run_sync(find)
        sie = self.gateway.sie
        handle = sie.options(multiplexed_model_id=model) if model else sie
        try:
            response = await self.gateway.relay(handle, request)
        except SIEError as err:  # in the envelope of the route's protocol, as a replica's
            render = renderer(path, self.gateway.settings.infinity_prefix)
            refusal = render(Request({**scope, "path": path, "root_path": ""}), err)
            return await refusal(scope, receive, send)
        await send({"type": "http.response.start", "status": response["status"],
                    "headers": response["headers"]})
        await send({"type": "http.response.body", "body": response["body"]})


def _value(raw: Any) -> Any:
    """`serve run ... key=value` passes strings: JSON ones ('2', '{"a": "b"}') are parsed."""
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw


def split_args(args: Mapping[str, Any]
               ) -> tuple[Settings, ReplicaOptions, GatewayOptions, dict[str, Any]]:
    """An app's arguments -> (Settings, ReplicaOptions, GatewayOptions, SIE deployment's
    Serve options)."""
    groups: dict[str, dict[str, Any]] = {"settings": {}, "replica": {}, "gateway": {},
                                         "deployment": {}}
    owners = {**{f.name: "settings" for f in dataclasses.fields(Settings)},
              **{f.name: "replica" for f in dataclasses.fields(ReplicaOptions)},
              **{f.name: "gateway" for f in dataclasses.fields(GatewayOptions)},
              **{k: "deployment" for k in DEPLOYMENT_KEYS}}
    for key, raw in args.items():
        if key not in owners:
            raise ValueError(f"unknown argument {key!r} for sie_server.ray:app "
                             f"(known: {', '.join(sorted(owners))})")
        value = _value(raw)
        groups[owners[key]][key] = [Path(p) for p in value] if key in _PATH_FIELDS else value
    return (Settings.from_env(**groups["settings"]), ReplicaOptions(**groups["replica"]),
            GatewayOptions(**groups["gateway"]), groups["deployment"])


def build_app(settings: Settings, replica: ReplicaOptions = ReplicaOptions(),
              gateway: GatewayOptions = GatewayOptions(), **deployment: Any) -> serve.Application:
    """The Serve application; `deployment` takes the SIE deployment's Serve options
    (num_replicas, autoscaling_config, ray_actor_options, max_ongoing_requests, ...)."""
    sie = SIEDeployment.options(**deployment).bind(settings, replica)
    front = Gateway.options(num_replicas=gateway.gateway_replicas,
                            ray_actor_options={"num_cpus": gateway.gateway_cpus})
    return front.bind(sie, settings, gateway)


def app(args: dict[str, Any]) -> serve.Application:
    """Serve's app builder: `serve run sie_server.ray:app key=value ...`, or a config file's
    `import_path: sie_server.ray:app` with `args:` (see docs/RAY.md)."""
    settings, replica, gateway, deployment = split_args(args)
    return build_app(settings, replica, gateway, **deployment)
