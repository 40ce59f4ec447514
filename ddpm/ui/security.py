"""What a request must be to be served, as trusted local web UIs (Jupyter's, for one) check it.

- **Host** (against DNS rebinding: a page of evil.example whose name the attacker points at 127.0.0.1
  reaches this server with ``Host: evil.example``): an IP address, ``localhost``, or a name the server
  was told (``--listen``'s address and this machine's names).
- **Origin** (against cross-site requests, CSRF): when a browser sends one it must be this page's own,
  ``http://`` + the Host; a request that changes anything (not GET or HEAD) from a browser always has one.
- **Fetch metadata**: a browser's ``Sec-Fetch-Site: cross-site`` or ``same-site`` is refused, except the
  navigation that opens the page itself (a link from elsewhere may open it, not drive it).

Every answer carries a Content-Security-Policy that allows only this server's own scripts, styles
and images (and ``data:`` images, which the samples arrive as), and no framing. :class:`LocalOnly`
is plain ASGI middleware, so it needs no web framework.
"""

from __future__ import annotations

import collections
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
           (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer"),
           (b"cross-origin-resource-policy", b"same-origin")]
SAFE_METHODS = ("GET", "HEAD")
log = logging.getLogger("ddpm.ui")


def host_name(host: str) -> str:
    """The name or address of a Host header, without its port (``[::1]:8765`` gives ``::1``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def refusal(method: str, path: str, headers: Mapping[str, str], names: Iterable[str]) -> str | None:
    """Why a request is refused (one line), or ``None`` to serve it. ``headers`` are lower-case names."""
    host = headers.get("host", "")
    name = host_name(host)
    if not host or not (is_ip(name) or name in {"localhost", *names}):
        return f"Host {host!r} is not this server's address (a DNS-rebinding page?); open it at its own address"
    origin = headers.get("origin")
    if origin is not None and origin != f"http://{host.strip().lower()}":
        return f"cross-origin request from {origin} refused"
    site = headers.get("sec-fetch-site")
    navigation = method in SAFE_METHODS and headers.get("sec-fetch-mode") == "navigate" and path == "/"
    if site in ("cross-site", "same-site") and not navigation:
        return f"{site} request refused: only this server's own page may use it"
    return None


ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[dict[str, Any]]],
                    Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[None]]


class LocalOnly:
    """ASGI middleware: refuses with 403 and a one-line JSON error what :func:`refusal` refuses (logged, and
    the latest kept in ``refused`` as ``(method, path, reason)``), and adds the security headers to every answer."""

    def __init__(self, app: ASGIApp, names: Iterable[str] = ()) -> None:
        self.app, self.names = app, frozenset(n.lower() for n in names)
        self.refused: collections.deque[tuple[str, str, str]] = collections.deque(maxlen=100)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        reason = refusal(scope["method"], scope["path"], headers, self.names)
        if reason is not None:
            self.refused.append((scope["method"], scope["path"], reason))
            log.warning("ddpm ui: refused %s %s: %s", scope["method"], scope["path"], reason)
            body = json.dumps({"error": reason}).encode()
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()), *HEADERS]})
            return await send({"type": "http.response.body", "body": body})

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *HEADERS]}
            await send(message)

        return await self.app(scope, receive, send_with_headers)
