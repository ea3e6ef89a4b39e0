"""`sie-server ray`: deploy the Serve application on a Ray cluster (or a local one).

Takes the same model, catalog, batching and limit flags as `sie-server serve` (they fill the
Settings every replica builds its Engine from), plus the Serve deployment's options.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading

from ..flags import add_engine_flags, settings_from_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("ray", help="serve the HTTP API from Ray Serve replicas")
    r.add_argument("--address", help="Ray cluster to join ('auto', 'ray://HOST:10001'); "
                   "default: start a local one on 127.0.0.1")
    r.add_argument("--host", default="127.0.0.1", help="Serve's HTTP proxy address "
                   "(default 127.0.0.1; 0.0.0.0 to serve the network)")
    r.add_argument("--port", type=int, default=8000, help="Serve's HTTP port (default 8000)")
    r.add_argument("--name", default="sie", help="the Serve application's name (default sie)")
    r.add_argument("--route-prefix", default="/",
                   help="where the application's routes start (default /; e.g. /small)")
    add_engine_flags(r)
    r.add_argument("--num-replicas", type=int, default=1)
    r.add_argument("--autoscaling-config", type=json.loads, metavar="JSON",
                   help='Serve autoscaling, e.g. \'{"min_replicas": 1, "max_replicas": 4}\' '
                   "(instead of --num-replicas)")
    r.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    r.add_argument("--num-gpus", type=float, default=0.0,
                   help="GPUs per replica (fractions share one GPU)")
    r.add_argument("--max-ongoing-requests", type=int, default=64,
                   help="requests one replica handles at once (Serve queues the rest)")
    r.add_argument("--max-queued-requests", type=int, default=1024,
                   help="requests Serve queues for the deployment, then 503 QUEUE_FULL")
    r.add_argument("--max-models-per-replica", type=int, default=-1,
                   help="Serve's multiplexing LRU per replica (-1: the memory budget decides)")
    r.add_argument("--metrics-port", type=int,
                   help="each replica also serves /metrics on this port + its rank on the node")
    r.add_argument("--num-local-cpus", type=float, help="CPUs of a local cluster")
    r.add_argument("--switch-interval-ms", type=float, default=0.5,
                   help="the GIL switch interval in every replica (as for serve)")
    r.add_argument("--log-level", default="info")


def run(args: argparse.Namespace) -> None:
    """Deploy, print the URL, and keep the application up until SIGINT/SIGTERM."""
    from .. import logs
    from .cluster import connect, start_http

    logs.configure(args.log_level)
    connect(args.address, num_cpus=args.num_local_cpus)  # before ray is imported
    stop = threading.Event()  # after ray.init: Ray installs its own SIGTERM handler there
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    from ray import serve

    from .serve import GatewayOptions, ReplicaOptions, build_app

    start_http(args.host, args.port)
    deployment = {"ray_actor_options": {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
                  "max_ongoing_requests": args.max_ongoing_requests,
                  "max_queued_requests": args.max_queued_requests}
    if args.autoscaling_config:
        deployment["autoscaling_config"] = args.autoscaling_config
    else:
        deployment["num_replicas"] = args.num_replicas
    replica = ReplicaOptions(switch_interval_ms=args.switch_interval_ms,
                             max_models_per_replica=args.max_models_per_replica,
                             metrics_port=args.metrics_port)
    app = build_app(settings_from_args(args), replica, GatewayOptions(), **deployment)
    serve.run(app, name=args.name, route_prefix=args.route_prefix)
    print(f"serving on http://{args.host}:{args.port}{args.route_prefix.rstrip('/')}", flush=True)
    while not stop.wait(1.0):
        pass
    serve.delete(args.name)  # replicas drain: each engine finishes what it accepted
    if args.address is None:
        serve.shutdown()
