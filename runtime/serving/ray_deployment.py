"""`kvgraph serve EXPORT --ray --replicas N`: the same HTTP app as a Ray Serve deployment (the `ray` extra).

Each replica is a Ray actor (its own process) that loads the export and owns its engine; Ray Serve's
proxy listens on --host/--port and routes every request, streams included, to a replica. Without
--ray-address a local Ray instance is started on 127.0.0.1 and stopped on exit; with one (auto, or
HEAD:6379) the deployment joins that cluster and its replicas are placed on any of its nodes, each of
which must have kvgraph installed and the export at the same path.

Each replica admits at most max_batch + max_queue requests; past that its app answers 429 itself
(Ray's router is told the same limit, so it spreads the load before that).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from kvgraph.runtime.serving.app import build_app


def deployment(settings: dict, replicas: int, max_replicas: int | None, cpus: float, grace: float):
    """The bound Ray Serve application: `replicas` copies (or autoscaling up to max_replicas) of the app."""
    from ray import serve

    def build():  # runs in each replica: its own engine over its own sessions
        return build_app(**settings)[0]

    options = dict(name="kvgraph", ray_actor_options={"num_cpus": cpus},
                   max_ongoing_requests=settings["max_batch"] + settings["max_queue"], graceful_shutdown_timeout_s=grace)
    if max_replicas is None:
        options["num_replicas"] = replicas
    else:
        options["autoscaling_config"] = {"min_replicas": replicas, "max_replicas": max_replicas,
                                         "target_ongoing_requests": settings["max_batch"]}
    return serve.deployment(serve.ingress(build)(), **options).bind()


def serve_on_ray(settings: dict, host: str, port: int, replicas: int, max_replicas: int | None, address: str | None,
                 cpus: float, grace: float) -> int:
    """Start (or join) Ray, deploy, serve until Ctrl-C or SIGTERM, then shut the deployment down."""
    import ray
    from ray import serve

    if address:
        ray.init(address=address, logging_level="WARNING")
    else:
        ray.init(num_cpus=max(2, int(replicas * cpus + 0.999)), include_dashboard=False, _node_ip_address="127.0.0.1",
                 object_store_memory=100 * 2**20, logging_level="WARNING")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(deployment(settings, replicas, max_replicas, cpus, grace), name="kvgraph", route_prefix="/",
                  logging_config={"log_level": "WARNING", "enable_access_log": False})
        count = f"{replicas}..{max_replicas} replicas (autoscaling)" if max_replicas else f"{replicas} replicas"
        print(f"kvgraph serve: {settings['model']} on http://{host}:{port}/v1 over Ray Serve, {count}", file=sys.stderr, flush=True)
        stop.wait()
        print(f"kvgraph serve: shutting down (running requests have {grace:g} s to finish)", file=sys.stderr, flush=True)
    finally:
        watchdog = threading.Timer(grace + 60, lambda: os._exit(1))  # a Ray that cannot shut down (its raylet killed) must not hang us
        watchdog.daemon = True
        watchdog.start()
        serve.shutdown()
        ray.shutdown()
    return 0
