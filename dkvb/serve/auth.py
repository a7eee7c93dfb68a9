"""Who may change the served model: a bearer token, compared in constant time, and where it comes from.

The token is read from ``--token-file`` (the file's text, trailing newline stripped) or the
``DKVB_SERVE_TOKEN`` environment variable. Without one the server starts only on a loopback
address and only when told ``--insecure-local``: then every endpoint is open to local processes.
"""
from __future__ import annotations

import hmac
import ipaddress
import os
from pathlib import Path

TOKEN_ENV = "DKVB_SERVE_TOKEN"
MIN_TOKEN_CHARS = 16


def load_token(token_file: str | os.PathLike | None = None) -> str | None:
    """The token from ``token_file``, else from ``$DKVB_SERVE_TOKEN``; ``None`` when neither is given.

    Raises ``ValueError`` for an unreadable, empty or short token (under :data:`MIN_TOKEN_CHARS`).
    """
    if token_file is not None:
        try:
            token = Path(token_file).read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--token-file {token_file}: cannot read the token ({e})") from None
        where = f"--token-file {token_file}"
    else:
        token = os.environ.get(TOKEN_ENV)
        if token is None:
            return None
        where = TOKEN_ENV
    if len(token) < MIN_TOKEN_CHARS or token != token.strip():
        raise ValueError(f"{where}: the token must be at least {MIN_TOKEN_CHARS} characters without surrounding "
                         f"spaces, got {len(token)} characters")
    return token


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None, insecure_local: bool) -> None:
    """Refuse to serve without a token unless bound to loopback and told ``insecure_local``."""
    if token is not None:
        return
    if not insecure_local:
        raise ValueError(f"no token: set {TOKEN_ENV} or pass --token-file (or, on a loopback address only, "
                         "--insecure-local to serve every endpoint without authentication)")
    if not is_loopback(host):
        raise ValueError(f"--insecure-local serves without authentication and is allowed on a loopback address "
                         f"only (127.0.0.1, ::1, localhost), got --host {host}")


def token_matches(given: str, token: str) -> bool:
    """Constant-time comparison of a presented token with the server's."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), token.encode("utf-8"))


__all__ = ["TOKEN_ENV", "MIN_TOKEN_CHARS", "load_token", "is_loopback", "check_bind", "token_matches"]
