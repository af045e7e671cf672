"""The coordinator's public door: the sites' calls (Flower's Fleet API) pass to the SuperLink,
nothing else does.

Flower 1.41 serves three APIs on one HTTPS listener: the Fleet API (SuperNodes), the Control API
(the `flwr` CLI: register and unregister sites, list, submit and stop runs) and the runtime API
(the SuperLink's own SuperExec). Open-source Flower authenticates SuperNodes (signed headers)
but not Control API callers, so anyone who reaches that port holding `ca.crt`, which every site
has, could act as the coordinator. The deployment therefore binds the SuperLink to 127.0.0.1 and
puts this gateway on the public address: it forwards `POST /v1/fleet/<call>` unchanged (the
SuperNode's signature headers included) and answers everything else with 403.
"""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

log = logging.getLogger("fedlora.gateway")

# The Fleet API's calls are flat lower-case names; anything else (another prefix, dots,
# percent-escapes, a trailing slash) is not a Fleet call and is refused, not normalised.
FLEET_CALL = re.compile(r"/v1/fleet/[a-z][a-z-]*")
# Headers that describe one connection, not the request (RFC 9110, 7.6.1).
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "te", "trailer", "transfer-encoding", "upgrade", "host"})


def is_fleet_call(method: str, path: str, raw_path: bytes | None) -> bool:
    """Whether a request is one a SuperNode makes: POST to a Fleet API call, its path as sent
    (a raw path that decodes to something else is refused)."""
    return (method == "POST" and FLEET_CALL.fullmatch(path) is not None
            and (raw_path is None or raw_path == path.encode("ascii")))


class FleetGateway:
    """An ASGI app forwarding Fleet API calls to the SuperLink at `upstream` (https://HOST:PORT),
    whose certificate is checked against `ca_file`."""

    def __init__(self, upstream: str, ca_file: Path):
        self.upstream = upstream.rstrip("/")
        self.ca_file = ca_file
        self.client: httpx.AsyncClient | None = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        # websockets are not part of the Fleet API: uvicorn closes what is not answered

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                context = ssl.create_default_context(cafile=str(self.ca_file))
                # Streamed Fleet replies have no read timeout in Flower's own client either.
                self.client = httpx.AsyncClient(
                    verify=context, timeout=httpx.Timeout(10.0, read=None, write=120.0))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope, receive, send) -> None:
        method, path = scope["method"], scope["path"]
        peer = "%s:%s" % tuple(scope.get("client") or ("?", "?"))
        if not is_fleet_call(method, path, scope.get("raw_path")):
            log.warning("refused %s %s from %s: only the Fleet API passes", method, path, peer)
            await _answer(send, 403, b"fedlora gateway: only the Fleet API (POST /v1/fleet/...) "
                                     b"is served here\n")
            return
        assert self.client is not None, "the gateway serves only after its lifespan started"
        headers = [(k, v) for k, v in scope["headers"]
                   if k.decode("latin-1").lower() not in HOP_BY_HOP]
        query = scope.get("query_string", b"")
        url = self.upstream + path + ("?" + query.decode("ascii") if query else "")
        request = self.client.build_request(method, url, headers=headers,
                                            content=_request_body(receive))
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as err:
            log.error("SuperLink at %s did not answer %s: %s", self.upstream, path, err)
            await _answer(send, 502, b"fedlora gateway: the SuperLink did not answer\n")
            return
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(k, v) for k, v in response.headers.raw
                                    if k.decode("latin-1").lower() not in HOP_BY_HOP]})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()


async def _request_body(receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


async def _answer(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def serve(listen: tuple[str, int], superlink: tuple[str, int], certs: Path) -> None:
    """Serve the gateway on `listen` with the coordinator's server certificate until stopped."""
    import uvicorn

    host, port = superlink
    host = f"[{host}]" if ":" in host else host  # an IPv6 literal
    app = FleetGateway(f"https://{host}:{port}", certs / "ca.crt")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    uvicorn.Server(uvicorn.Config(
        app, host=listen[0], port=listen[1], ssl_certfile=str(certs / "server.crt"),
        ssl_keyfile=str(certs / "server.key"), log_level="warning", lifespan="on",
        proxy_headers=False, server_header=False)).run()
