"""Running the app on uvicorn: bind the socket first, say where it listens, then serve."""
from __future__ import annotations

import os
import socket
import sys
from typing import TextIO

import uvicorn

from ..data import EmbeddingSet
from .app import create_app
from .auth import check_bind
from .limits import Limits


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port`` 0: one the system picks)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    sock.listen(2048)
    return sock


def serve(store: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          insecure_local: bool = False, limits: Limits = Limits(), data: EmbeddingSet | None = None,
          out: TextIO = sys.stdout) -> None:
    """Serve the store until interrupted. Refuses to start without a token unless bound to loopback
    with ``insecure_local`` (:func:`dkvb.serve.auth.check_bind`); the store is verified before the
    socket opens. Prints one line with the address once connections are accepted."""
    check_bind(host, token, insecure_local)
    app = create_app(store, token=token, limits=limits, data=data)
    sock = listen(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"dkvb serve: {store} (version {app.state.live.current.version}) on http://{shown}:{bound} "
          f"({'token required for writes and the audit log' if token else 'no authentication, loopback only'})",
          file=out, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                           timeout_graceful_shutdown=5))
    server.run(sockets=[sock])


__all__ = ["serve", "listen"]
