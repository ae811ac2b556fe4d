"""`kvgraph serve EXPORT`: the OpenAI-compatible server (runtime/serving/app.py) on 127.0.0.1, over the serving engine;
with --ray, the same app as a Ray Serve deployment of N replicas (runtime/serving/ray_deployment.py)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from kvgraph.runtime.core.session import WEIGHT_POLICIES

HELP = "serve an export over HTTP with the OpenAI API (continuous batching on static-cache exports)"  # registered in pyproject.toml


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="an export; decoder-only static-cache exports get continuous batching (kvgraph export --cache static)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--max-batch", type=int, default=8, help="requests decoded at once per engine (default 8)")
    parser.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a row; beyond, 429 (default 64)")
    parser.add_argument("--prefill-chunk", type=int, default=256,
                        help="continuous batching: prompt tokens prefilled between two decode steps of the running streams "
                             "(default 256; 0: each prompt at once)")
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds a request may take, waiting for a row included; 0: no limit (default 600)")
    parser.add_argument("--grace", type=float, default=30.0,
                        help="on Ctrl-C or SIGTERM: stop accepting, let running requests finish for up to this many seconds (default 30)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (per replica)")
    parser.add_argument("--weights", choices=WEIGHT_POLICIES, default="auto",
                        help="how sessions hold the weights: one-session (one prepacked copy; the default for decoder-only "
                             "exports), mapped (one mapped copy read unpacked: the least memory, slower prefill)")
    parser.add_argument("--model-name", default=None, help="the model id clients send (default: the export directory's name)")
    ray = parser.add_argument_group("scale-out on Ray Serve")
    ray.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment (pip install 'kvgraph[ray]')")
    ray.add_argument("--replicas", type=int, default=1, help="replicas, each with its own engine (the minimum with --max-replicas)")
    ray.add_argument("--max-replicas", type=int, default=None,
                     help="autoscale between --replicas and this many, aiming at --max-batch running requests per replica")
    ray.add_argument("--ray-address", default=None,
                     help="join this Ray cluster (e.g. auto, or HEAD:6379); default: start a local Ray instance on 127.0.0.1")
    ray.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves for each replica (default 1)")


def check(args: argparse.Namespace) -> str:
    """The first bad option, as a one-line reason ("" when all are fine)."""
    path = Path(args.directory)
    for name, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0), ("--replicas", args.replicas, 1),
                             ("--prefill-chunk", args.prefill_chunk, 0),
                             ("--request-timeout", args.request_timeout, 0), ("--grace", args.grace, 0), ("--port", args.port, 0)):
        if value < low:
            return f"{name} must be >= {low}, got {value}"
    if args.max_replicas is not None and args.max_replicas < args.replicas:
        return f"--max-replicas ({args.max_replicas}) must be >= --replicas ({args.replicas})"
    if (args.max_replicas is not None or args.ray_address or args.replicas != 1) and not args.ray:
        return "--replicas, --max-replicas and --ray-address need --ray"
    if not (path / "kvgraph.json").is_file():
        return f"{path}: not a kvgraph export (no kvgraph.json)"
    return ""


def run(args: argparse.Namespace) -> int:
    from kvgraph.graphs import KvgraphError

    problem = check(args)
    if problem:
        raise KvgraphError(problem)
    try:
        import fastapi  # noqa: F401
        import uvicorn
        if args.ray:
            import ray.serve  # noqa: F401
    except ImportError as exc:
        extra = "ray" if args.ray else "serve"
        print(f"kvgraph serve{' --ray' if args.ray else ''} needs the {extra} extra (pip install 'kvgraph[{extra}]'): {exc}", file=sys.stderr)
        return 2
    settings = dict(directory=str(Path(args.directory).resolve()), max_batch=args.max_batch, max_queue=args.max_queue,
                    timeout=args.request_timeout or None, threads=args.threads, prefill_chunk=args.prefill_chunk or None,
                    weights=args.weights,
                    model=args.model_name or Path(args.directory).resolve().name)
    if args.ray:
        from kvgraph.runtime.serving.ray_deployment import serve_on_ray

        return serve_on_ray(settings, host=args.host, port=args.port, replicas=args.replicas, max_replicas=args.max_replicas,
                            address=args.ray_address, cpus=args.replica_cpus, grace=args.grace)
    from kvgraph.runtime.serving.app import build_app

    app, engine = build_app(**settings, log=lambda line: print(line, file=sys.stderr))
    # Ctrl-C or SIGTERM: uvicorn stops accepting and lets running requests finish (up to --grace seconds), then
    # raises the signal again under the handlers it found: these, so the engine is closed and the exit is clean
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda number, frame: None)
    try:
        print(f"kvgraph serve: http://{args.host}:{args.port}/v1 (Ctrl-C or SIGTERM drains and stops)", file=sys.stderr, flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=args.grace)
    finally:
        engine.close()
    print("kvgraph serve: stopped", file=sys.stderr)
    return 0
