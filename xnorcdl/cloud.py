"""``python -m xnorcdl cloud``: serve the cloud half over HTTP (uvicorn, or Ray Serve)

One machine: uvicorn runs the ASGI application of :mod:`xnorcdl.cloud_service` (dynamic
batching, bounded queue, size limit, auth, metrics, graceful shutdown that drains what is in
flight on SIGTERM or Ctrl-C). A cluster: ``--ray`` deploys the same handlers on Ray Serve with
``--replicas N`` copies and Ray Serve's own request batching (:mod:`xnorcdl.cloud_ray`).
It binds to 127.0.0.1 unless ``--host`` says otherwise; ``--port 0`` takes a free port. The
address is printed on stderr as ``listening on http://HOST:PORT`` once requests are accepted.
"""
from __future__ import annotations

import argparse
import socket
import sys
from typing import List, Optional

from . import cli, paths
from .errors import UsageError


def add_arguments(ap: argparse.ArgumentParser) -> None:
    a = ap.add_argument
    cli.add_weights(ap, help="the cloud artifact (DIR/cloud.npz of python -m xnorcdl split)")
    a("--host", default="127.0.0.1", type=nonempty, help="address to bind")
    a("--port", type=cli.integer(0, 65535), default=8765, help="port to bind (0: a free one)")
    a("--max-batch", type=cli.integer(1, cli.MAX_BATCH), default=64,
      help="samples per cloud batch at most")
    a("--max-wait-ms", type=cli.number(0, 1000), default=2.0,
      help="how long a waiting request waits for others to join its batch")
    a("--no-batching", action="store_true", help="run every request alone")
    a("--queue", type=cli.integer(1, 1 << 20), default=256,
      help="requests waiting at most (more get 503)")
    a("--max-request-mb", type=cli.number(0, 1024, lo_open=True), default=8.0,
      help="largest request body (MiB; more get 413)")
    a("--token-file", default=None, type=paths.input_path(),
      help="file holding a bearer token every request must carry")
    a("--backend", default="fast", choices=["fast", "reference"])
    a("--threads", type=cli.integer(1, cli.MAX_THREADS), default=1,
      help="BLAS threads for the cloud layers")
    a("--ray", action="store_true", help="deploy on Ray Serve instead of uvicorn")
    a("--replicas", type=cli.integer(1, 1024), default=1, help="--ray: copies of the deployment")
    a("--address", default=None,
      help="--ray: address of a running Ray cluster (default: start a local Ray instance)")


def nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a host name or address, got an empty string")
    return text


#: largest token file read (bytes)
MAX_TOKEN_BYTES = 4096


def read_token(path: Optional[str]) -> Optional[str]:
    """The bearer token held in ``path`` (a regular file of at most :data:`MAX_TOKEN_BYTES`,
    one printable ASCII token without spaces), or None."""
    from .files import read_bytes
    if path is None:
        return None
    raw = read_bytes(path, MAX_TOKEN_BYTES, UsageError, "token file")
    try:
        token = raw.tobytes().decode("ascii").strip()
    except UnicodeDecodeError:
        token = ""
    if not token or any(c.isspace() for c in token) or not token.isprintable():
        raise UsageError(f"--token-file {path}: expected one token without spaces",
                         where="--token-file")
    return token


def config_from(args):
    from .cloud_service import ServiceConfig
    return ServiceConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                         batching=not args.no_batching, queue_limit=args.queue,
                         max_request_bytes=int(args.max_request_mb * (1 << 20)),
                         token=read_token(args.token_file))


def serve_uvicorn(app, host: str, port: int) -> None:
    import uvicorn
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise UsageError(f"--host {host} --port {port}: cannot bind ({exc.strerror or exc})",
                         where="--port") from None
    sock.listen(2048)
    bound = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=30)
    server = uvicorn.Server(config)

    startup = server.startup

    async def announce(sockets=None):
        await startup(sockets=sockets)
        print(f"listening on http://{host}:{bound}", file=sys.stderr, flush=True)

    server.startup = announce
    server.run(sockets=[sock])


def run(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    with cli.threads(args):
        if args.ray:
            from .cloud_ray import serve_ray
            return serve_ray(args.weights, cfg, args.backend, args.host, args.port,
                             args.replicas, args.address)
        from .cloud_service import create_app
        from .split import load_cloud
        serve_uvicorn(create_app(load_cloud(args.weights), cfg, args.backend), args.host,
                      args.port)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return cli.run(sys.modules[__name__], argv, "python -m xnorcdl cloud")


if __name__ == "__main__":
    sys.exit(main())
