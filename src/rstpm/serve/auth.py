"""Access: an API key as a bearer token, compared in constant time; loopback by default.

With a key (``--api-key`` or the environment variable ``RSTPM_API_KEY``) every route but
``/healthz`` needs ``Authorization: Bearer <key>``; anything else is 401. Without a key the
server is open to whoever reaches its port, which is why it binds 127.0.0.1 unless told
otherwise, and warns when told otherwise.
"""

from __future__ import annotations

import hmac
import ipaddress
import os

API_KEY_ENV = "RSTPM_API_KEY"
OPEN_PATHS = frozenset({"/healthz"})
"""Paths answered without the key (liveness probes carry no credentials)."""


def resolve_api_key(flag: str | None) -> str | None:
    """The key from ``--api-key``, else ``$RSTPM_API_KEY``, else None (no key).

    Raises:
        ValueError: a key that is empty or blank.
    """
    key = flag if flag is not None else os.environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        raise ValueError(f"the API key (--api-key or {API_KEY_ENV}) is empty; give a real key")
    return key


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (None: absent or another
    scheme)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def key_matches(authorization: str | None, key: str) -> bool:
    """Whether the header carries ``key``, compared in constant time."""
    token = bearer_token(authorization)
    return token is not None and hmac.compare_digest(token.encode(), key.encode())


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, key: str | None) -> str | None:
    """A one-line warning when the server listens beyond this machine without a key."""
    if key is not None or is_loopback(host):
        return None
    return (
        f"rstpm serve: warning: listening on {host} without an API key: anyone who can reach "
        f"this port can use it; set --api-key or {API_KEY_ENV}"
    )
