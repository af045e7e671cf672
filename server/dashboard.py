"""`fedlora dashboard RUN_DIR [RUN_DIR ...]`: a page a coordinator leaves open during a run.

The page (server/dashboard_page/) asks `api/state` every two seconds and redraws what changed:
each run's status (with its error), round n of N and an ETA, the sites of the last round, the
report's plots (drawn by Plotly in the page, from the numbers server/report.py computes for its
PNGs) and tables, and the config; several runs side by side, their headline metric in one plot.

It only reads the run directories it was given, by their fixed file names: no request names a
file. Everything the page loads (Plotly included) is served from memory by this process, so it
works offline. On 127.0.0.1 (the default) requests must name a loopback host (no DNS
rebinding); on any other address every request needs the access token printed at start (a
`?token=` link sets a cookie, scripts may send `Authorization: Bearer`), else 401; with
--tls-cert/--tls-key it speaks HTTPS. A path with `..`, `//` or a backslash, or a query value
that is a path, is a 404 whatever it asks for.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import ipaddress
import math
import secrets
import socket
import threading
from pathlib import Path
from urllib.parse import parse_qsl, unquote

from common.errors import FedLoraError
from server.outputs import lock_held
from server.report import (
    CSS,
    Run,
    build_plots,
    client_names,
    config_section,
    fmt,
    header_section,
    html_table,
    personal_section,
    read_run,
    rounds_section,
    sites_section,
    summary_section,
)
from server.round_record import number

PAGE_DIR = Path(__file__).with_name("dashboard_page")
TOKEN_COOKIE = "fedlora-dashboard-token"
DEFAULT_PORT = 8765
LOOPBACK_NAMES = ("localhost",)
PAGE_CSP = ("default-src 'none'; script-src 'self'; connect-src 'self'; img-src 'self' data:; "
            "style-src 'self' 'unsafe-inline'; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")


# -- what the page shows ---------------------------------------------------------------------


def check_run_dirs(paths: list[str | Path]) -> list[Path]:
    """The run directories to show; FedLoraError naming the first that is not one."""
    if not paths:
        raise FedLoraError("dashboard: name at least one run directory")
    runs = []
    for path in paths:
        read_run(path, command="dashboard", wait_for_rounds=True)
        runs.append(Path(path).resolve())
    if len(set(runs)) < len(runs):
        raise FedLoraError("dashboard: a run directory is named twice")
    return runs


def run_state(path: Path) -> dict:
    """One run as the page draws it; a run that cannot be read now (a file being replaced by
    hand, a folder deleted) is shown with the reason instead."""
    try:
        run = read_run(path, command="dashboard", wait_for_rounds=True)
    except (FedLoraError, OSError) as err:
        return {"name": path.name, "path": str(path), "status": "unreadable",
                "unreadable": str(err)}
    clients = client_names(run.rounds)
    last = run.rounds[-1]["round"] if run.rounds else None
    status = run.status
    server = run.rounds[-1].get("server") if run.rounds else None
    return {
        "name": path.name, "path": str(path), "status": status,
        "error": run.summary.get("error") if status == "failed" else None,
        "strategy": run.config.get("strategy"),
        "round": last, "rounds": run.config.get("num-rounds"),
        "finish-estimate": finish_estimate(run) if status == "running" else None,
        "quality": run.quality,
        "latest": number(server.get(run.quality)) if isinstance(server, dict) else None,
        "plots": [dataclasses.asdict(plot) for plot in build_plots(run, clients)],
        "sections": {"header": header_section(run, clients), "summary": summary_section(run),
                     "sites": sites_section(run, clients), "rounds": rounds_section(run, clients),
                     "personal": personal_section(run), "config": config_section(run)},
    }


def finish_estimate(run: Run) -> float | None:
    """When the run should end (seconds since the epoch): the rounds left at the mean wall time
    of its training rounds so far, counted from when the last one was recorded."""
    total = number(run.config.get("num-rounds"))
    seconds = [s for r in run.rounds if r["round"] > 0
               and (s := number(r.get("seconds"))) is not None]
    if not run.rounds or total is None or not seconds:
        return None
    left = max(0.0, total - run.rounds[-1]["round"])
    try:
        recorded = run.path.joinpath("metrics.jsonl").stat().st_mtime
    except OSError:  # replaced or removed since it was read
        return None
    return recorded + left * sum(seconds) / len(seconds)


def compare_section(states: list[dict]) -> str:
    """The runs in one table: strategy, status, round and the latest headline metric."""
    rows = [[state["name"], fmt(state.get("strategy")), state["status"],
             f"{fmt(state.get('round'))} of {fmt(state.get('rounds'))}",
             f"{state.get('quality', '')} {fmt(state.get('latest'))}".strip()]
            for state in states]
    return html_table(["run", "strategy", "status", "round", "latest server metric"], rows)


def dashboard_state(paths: list[Path]) -> dict:
    states = [run_state(path) for path in paths]
    return _finite({"runs": states, "compare": compare_section(states)})


def _finite(value):
    """NaN and infinity as null: the page's JSON.parse takes no other."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def files_signature(paths: list[Path]) -> str:
    """Changes whenever a file the page reads changes: the ETag of api/state."""
    parts = []
    for path in paths:
        for name in ("config.json", "summary.json", "metrics.jsonl", "labels.json",
                     "local_only.json"):
            try:
                stat = (path / name).stat()
                parts.append(f"{path}/{name}:{stat.st_mtime_ns}:{stat.st_size}")
            except OSError:
                parts.append(f"{path}/{name}:-")
        # A killed run changes no file: whether its process still holds the lock does.
        parts.append(f"{path}:lock:{lock_held(path)}")
    return '"' + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32] + '"'


# -- who may ask what ------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_path_probe(raw_path: str, query: str) -> bool:
    """A request that tries to name a file: `..`, `//` or a backslash in its path (however
    often percent-encoded), or a query value that is a path."""
    path = raw_path
    for _ in range(4):  # %252e%252e is `..` after two decodings
        path = unquote(path)
    if ".." in path or "//" in path or "\\" in path or "\0" in path:
        return True
    for key, value in parse_qsl(query, keep_blank_values=True):
        for text in (key, value):
            for _ in range(4):
                text = unquote(text)
            if ".." in text or text.startswith(("/", "~", "\\")) or "\0" in text:
                return True
    return False


def _host_name(host_header: str) -> str:
    if host_header.startswith("["):  # [::1]:8765
        return host_header[1:host_header.find("]")]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def make_app(paths: list[Path], token: str | None, secure: bool = False):
    """The ASGI app. `token`: required of every request when not None; `secure`: served over
    HTTPS (the token's cookie is then never sent over plain HTTP)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.gzip import GZipMiddleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
    from starlette.routing import Route

    assets = _assets()

    def refuse(status: int, text: str) -> Response:
        return PlainTextResponse(text + "\n", status_code=status,
                                 headers={"Cache-Control": "no-store"})

    class Guard:
        """Every request passes here first: path probes, then the host, then the token."""

        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.app(scope, receive, send)
            request = Request(scope)
            raw_path = scope.get("raw_path", b"").decode("latin-1") or scope["path"]
            if is_path_probe(raw_path, scope.get("query_string", b"").decode("latin-1")):
                return await refuse(404, "404: not found")(scope, receive, send)
            if token is None and not is_loopback(_host_name(request.headers.get("host", ""))):
                # A page of another site that resolves its name to 127.0.0.1 (DNS rebinding).
                return await refuse(400, "400: this dashboard answers to 127.0.0.1 or "
                                         "localhost only")(scope, receive, send)
            if token is not None and not _has_token(request, token):
                return await refuse(401, "401: this dashboard needs the access token that "
                                         "`fedlora dashboard` printed at start")(
                    scope, receive, send)
            await self.app(scope, receive, send)

    async def page(request: Request) -> Response:
        if token is not None and "token" in request.query_params:
            # The token leaves the address bar (and the history) for a cookie.
            response = RedirectResponse("./", status_code=303)
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict",
                                secure=secure)
            return response
        return Response(assets["index.html"], media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-store",
                                 "Referrer-Policy": "no-referrer"})

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in assets or name == "index.html":
            return refuse(404, "404: not found")
        kind = {"js": "text/javascript", "css": "text/css"}[name.rsplit(".", 1)[1]]
        return Response(assets[name], media_type=f"{kind}; charset=utf-8",
                        headers={"Cache-Control": "no-cache"})

    def state(request: Request) -> Response:  # sync: Starlette runs it on a worker thread
        signature = files_signature(paths)
        if request.headers.get("if-none-match") == signature:
            return Response(status_code=304, headers={"ETag": signature})
        return JSONResponse(dashboard_state(paths),
                            headers={"ETag": signature, "Cache-Control": "no-cache"})

    async def not_found(request: Request, exc) -> Response:
        return refuse(404, "404: not found")

    routes = [Route("/", page), Route("/static/{name}", static), Route("/api/state", state)]
    return Starlette(routes=routes, middleware=[Middleware(GZipMiddleware, minimum_size=1024),
                                                Middleware(Guard)],
                     exception_handlers={404: not_found, 405: not_found})


def _has_token(request, token: str) -> bool:
    bearer = request.headers.get("authorization", "")
    supplied = [bearer.removeprefix("Bearer ").strip() if bearer.startswith("Bearer ") else "",
                request.cookies.get(TOKEN_COOKIE, ""), request.query_params.get("token", "")]
    return any(secrets.compare_digest(s.encode(), token.encode()) for s in supplied if s)


def _assets() -> dict[str, bytes]:
    """The page's files, read once: a request never opens a file."""
    import plotly.offline

    assets = {path.name: path.read_bytes() for path in PAGE_DIR.iterdir() if path.is_file()}
    assets["dashboard.css"] = CSS.encode() + assets["dashboard.css"]  # the report's look first
    assets["plotly.min.js"] = plotly.offline.get_plotlyjs().encode()
    return assets


# -- serving ---------------------------------------------------------------------------------


class Dashboard:
    """The dashboard on its socket: bound at construction (a port in use is a FedLoraError),
    then `serve()` in the foreground or `start()` / `stop()` on a thread."""

    def __init__(self, run_dirs: list[str | Path], host: str = "127.0.0.1",
                 port: int = DEFAULT_PORT, tls_cert: str | Path | None = None,
                 tls_key: str | Path | None = None) -> None:
        self.paths = check_run_dirs(run_dirs)
        self.host = host
        self.token = None if is_loopback(host) else secrets.token_urlsafe(24)
        self.tls = check_tls(tls_cert, tls_key)
        self.socket = _bind(host, port)
        self.port = self.socket.getsockname()[1]
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The page's address, with the token; on every address (0.0.0.0), by this machine's
        name, which a browser elsewhere can reach."""
        host = socket.gethostname() if self.host in ("0.0.0.0", "::", "") else self.host
        host = f"[{host}]" if ":" in host else host
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{host}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    def _uvicorn(self):
        import uvicorn

        cert, key = self.tls or (None, None)
        config = uvicorn.Config(make_app(self.paths, self.token, secure=bool(self.tls)),
                                log_level="warning", access_log=False, lifespan="off",
                                server_header=False, ssl_certfile=cert, ssl_keyfile=key)
        self._server = uvicorn.Server(config)
        return self._server

    def serve(self) -> None:
        """Serve until interrupted (Ctrl-C)."""
        self._uvicorn().run(sockets=[self.socket])

    def start(self) -> None:
        server = self._uvicorn()
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [self.socket]},
                                        daemon=True, name="fedlora-dashboard")
        self._thread.start()
        while not server.started and self._thread.is_alive():
            self._thread.join(0.02)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self.socket.close()


def check_tls(cert: str | Path | None, key: str | Path | None) -> tuple[str, str] | None:
    """The certificate and key to serve HTTPS with (both, or neither); FedLoraError naming
    what is wrong with them."""
    import ssl

    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise FedLoraError("dashboard: --tls-cert and --tls-key go together (a PEM certificate "
                           "and its private key, e.g. server.crt and server.key of fedlora certs)")
    for option, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not Path(path).is_file():
            raise FedLoraError(f"dashboard: {option} {path} is not a file")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (ssl.SSLError, ValueError) as err:
        raise FedLoraError(f"dashboard: --tls-cert {cert} and --tls-key {key} are not a PEM "
                           f"certificate and its key ({getattr(err, 'reason', None) or err})"
                           ) from None
    return str(cert), str(key)


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise FedLoraError(f"dashboard: --host {host!r} is not an address of this machine "
                           f"({err.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise FedLoraError(f"dashboard: port {port} on {host} is in use (choose another "
                               f"with --port, or --port 0 for any free one)") from None
        raise FedLoraError(f"dashboard: cannot listen on {host} port {port} "
                           f"({err.strerror})") from None
    sock.setblocking(False)
    return sock

