"""The viewer's HTTP server: the standard library's threading server, the routes of the page's
API over a :class:`MapService`, and the package's own assets. Read-only, GET only; every bad
request is answered with a status and a one-line JSON error, never a traceback."""

from __future__ import annotations

import base64
import json
import sys
import threading
import time
import traceback
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from ..errors import InvalidInputError, OvstoreError
from .gate import Busy, RequestGate, Superseded
from .render import image_png, label_png, map_png
from .service import MapService

__all__ = ["ViewerServer", "make_app", "serve"]

#: Longest request target accepted (path and query).
MAX_TARGET = 4096
#: Most query parameters in one request.
MAX_FIELDS = 16
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}


class RequestError(Exception):
    """A request answered with ``status`` and a one-line JSON error."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def _assets() -> dict[str, tuple[bytes, str]]:
    """The page's files shipped in the package, by name: the only files served besides the API."""
    folder = resources.files(__package__) / "assets"
    out = {}
    for entry in folder.iterdir():
        suffix = Path(entry.name).suffix
        if entry.is_file() and suffix in _TYPES:
            out[entry.name] = (entry.read_bytes(), _TYPES[suffix])
    return out


class ViewerServer(ThreadingHTTPServer):
    """One thread per connection, at most ``max_connections`` at once (more are answered 503 at
    once); map computations pass a :class:`RequestGate`."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # a burst of connections waits in the kernel instead of being reset

    def __init__(self, address: tuple[str, int], service: MapService, *, max_connections: int = 64,
                 gate: RequestGate | None = None, log: Callable[[str], None] | None = None) -> None:
        self.service = service
        self.gate = gate or RequestGate()
        self.assets = _assets()
        self.max_connections = int(max_connections)
        self.log = log
        self._active = 0
        self._count_lock = threading.Lock()
        self.refused_connections = 0
        super().__init__(address, ViewerHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}/"

    def process_request(self, request, client_address) -> None:
        with self._count_lock:
            full = self._active >= self.max_connections
            if not full:
                self._active += 1
            else:
                self.refused_connections += 1
        if full:  # answered here, without a thread: the server stays responsive under a burst
            try:
                body = json.dumps({"error": "too many connections at once; retry later"}).encode()
                request.settimeout(2)
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
                                + str(len(body)).encode() + b"\r\n\r\n" + body)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            with self._count_lock:
                self._active -= 1
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._count_lock:
                self._active -= 1

    def handle_error(self, request, client_address) -> None:  # a dropped connection: no traceback on stderr
        if self.log is not None:
            self.log(f"connection from {client_address[0]} ended with {sys.exc_info()[0].__name__}")


class ViewerHandler(BaseHTTPRequestHandler):
    server: ViewerServer
    server_version = "ovstore-serve"
    sys_version = ""
    # one request per connection: the connection bound then counts requests in flight, not
    # idle keep-alive sockets a browser holds open (a loopback connect costs ~0.1 ms)
    protocol_version = "HTTP/1.0"
    timeout = 30  # a client that sends nothing for this long is disconnected

    # ------------------------------------------------------------------ plumbing
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        if self.server.log is not None:
            self.server.log(f"{self.address_string()} {format % args}")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (malformed request line, headers too long) as JSON too."""
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":  # else no status line is written
            self.request_version = "HTTP/1.0"
        self.close_connection = True
        try:
            self._send(code, json.dumps({"error": message or HTTPStatus(code).phrase}).encode(), "application/json")
        except OSError:
            pass

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, payload: Any, status: int = 200) -> None:
        self._send(status, json.dumps(payload, separators=(",", ":")).encode(), "application/json")

    def handle(self) -> None:
        # torch operations of this connection's thread run single-threaded (the engine's layer
        # pool parallelises a map computation): a small operation split over cores that other
        # work holds waits for them, tens of times slower than on one
        import torch

        torch.set_num_threads(1)
        super().handle()

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        started = time.perf_counter()
        try:
            if len(self.path) > MAX_TARGET:
                raise RequestError(414, f"request target of {len(self.path)} characters; at most {MAX_TARGET}")
            if int(self.headers.get("Content-Length") or 0) > 0:
                raise RequestError(413, "a GET request carries no body")
            parts = urlsplit(self.path)
            route = ROUTES.get(parts.path)
            if route is None:
                if parts.path.startswith("/assets/"):
                    return self._asset(parts.path[len("/assets/"):])
                raise RequestError(404, f"no such page or API: {parts.path[:80]}; the API is under /api/ "
                                        "(/api/info, /api/maps, /api/map.png, /api/image.png, /api/label, /api/label.png)")
            params = _params(parts.query, route.params)
            route.handler(self, params, started)
        except RequestError as exc:
            self._send(exc.status, json.dumps({"error": str(exc)}).encode(), "application/json", exc.headers)
        except InvalidInputError as exc:
            self._send(400, json.dumps({"error": _line(exc)}).encode(), "application/json")
        except Busy as exc:
            self._send(503, json.dumps({"error": str(exc)}).encode(), "application/json", {"Retry-After": "1"})
        except Superseded as exc:
            self._send(409, json.dumps({"error": str(exc)}).encode(), "application/json")
        except OvstoreError as exc:  # damaged stored data and the like: the store's one-line message
            self._send(500, json.dumps({"error": _line(exc)}).encode(), "application/json")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the page dropped the request (the user typed on)
        except Exception as exc:  # noqa: BLE001 - answered as one line; the traceback goes to the server log
            if self.server.log is not None:
                self.server.log("".join(traceback.format_exception(exc)))
            try:
                self._send(500, json.dumps({"error": f"internal error ({type(exc).__name__}); see the server's "
                                                     "log"}).encode(), "application/json")
            except OSError:
                pass

    def do_POST(self) -> None:  # noqa: N802
        self._send(405, json.dumps({"error": "the viewer is read-only: only GET requests"}).encode(),
                   "application/json", {"Allow": "GET, HEAD"})

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_POST

    def _asset(self, name: str) -> None:
        asset = self.server.assets.get(name)  # a name of the package's asset list, nothing else
        if asset is None:
            raise RequestError(404, f"no such asset: {name[:80]}")
        self._send(200, asset[0], asset[1])


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


# ---------------------------------------------------------------------- parameters
class _Route:
    def __init__(self, handler: Callable, params: dict[str, Callable[[str], Any]]) -> None:
        self.handler = handler
        self.params = params


def _int(name: str, low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise RequestError(400, f"{name}={value[:40]!r} is not an integer") from None
        if (low is not None and number < low) or (high is not None and number > high):
            raise RequestError(400, f"{name}={number} is out of range ({low} to {high})")
        return number
    return parse


def _float(name: str, low: float, high: float) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise RequestError(400, f"{name}={value[:40]!r} is not a number") from None
        if not low <= number <= high:
            raise RequestError(400, f"{name}={number} is out of range ({low} to {high})")
        return number
    return parse


def _choice(name: str, choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value not in choices:
            raise RequestError(400, f"{name}={value[:40]!r} is not one of {', '.join(choices)}")
        return value
    return parse


def _text(name: str, limit: int) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if len(value) > limit:
            raise RequestError(400, f"{name} has {len(value)} characters; at most {limit}")
        return value
    return parse


def _flag(name: str) -> Callable[[str], bool]:
    return lambda value: _choice(name, ("0", "1", "true", "false"))(value) in ("1", "true")


def _image_list(value: str) -> list[int]:
    items = [v for v in value.split(",") if v.strip()]
    if len(items) > 96:
        raise RequestError(400, f"{len(items)} images in one request; at most 96")
    return [_int("images", 0)(v.strip()) for v in items]


def _params(query: str, spec: dict[str, Callable[[str], Any]]) -> dict[str, Any]:
    try:
        raw = parse_qs(query, keep_blank_values=True, strict_parsing=False, max_num_fields=MAX_FIELDS)
    except ValueError:
        raise RequestError(400, f"too many query parameters; at most {MAX_FIELDS}") from None
    out: dict[str, Any] = {}
    for key, values in raw.items():
        if key not in spec:
            known = ", ".join(spec) or "none"
            raise RequestError(400, f"unknown parameter {key[:40]!r}; this API takes: {known}")
        if len(values) > 1:
            raise RequestError(400, f"parameter {key!r} given {len(values)} times; give it once")
        out[key] = spec[key](values[0])
    return out


def _require(params: dict[str, Any], name: str, example: str) -> Any:
    if name not in params:
        raise RequestError(400, f"missing parameter {name}, e.g. {example}")
    return params[name]


# ---------------------------------------------------------------------- routes
def _info(handler: ViewerHandler, params: dict[str, Any], started: float) -> None:
    handler._json(handler.server.service.info())


def _map_images(service: MapService, params: dict[str, Any]) -> list[int]:
    if "images" in params:
        return params["images"]
    if "image" in params:
        return [params["image"]]
    return service.page(params.get("page", 0), params.get("per_page", 24))


def _compute(handler: ViewerHandler, params: dict[str, Any], images: list[int]):
    service = handler.server.service
    text, learned = params.get("text"), params.get("learned") or None
    if not learned and text is None:
        raise RequestError(400, "missing parameter text, e.g. text=a red circle (or learned=NAME)")
    return handler.server.gate.run(lambda: service.maps(text, images, learned=learned),
                                   params.get("view"), params.get("seq"))


def _maps(handler: ViewerHandler, params: dict[str, Any], started: float) -> None:
    """Tokens of the text and every token's map on each image of the page, as base64 float32."""
    service = handler.server.service
    images = _map_images(service, params)
    result = _compute(handler, params, images)
    tokens = [{"index": k, "token": t, "text": t[:-4] if t.endswith("</w>") else t, "kind": kind}
              for k, (t, kind) in enumerate(zip(result.tokens, result.kinds))]
    per_image = []
    for p, image in enumerate(result.images):
        values = np.ascontiguousarray(result.maps[p], dtype="<f4")
        per_image.append({"image": image, "prompt": service.prompt(image),
                          "max": [float(v) for v in values.reshape(len(tokens), -1).max(axis=1)],
                          "maps": base64.b64encode(values.tobytes()).decode("ascii")})
    handler._json({
        "text": result.text, "learned": result.learned, "tokens": tokens, "size": list(result.maps.shape[-2:]),
        "divisor": result.divisor, "share": result.share, "images": per_image,
        "command": service.maps_command(params.get("text"), result.images, learned=result.learned),
        "elapsed_ms": round(1000 * (time.perf_counter() - started), 1),
    })


def _map_png(handler: ViewerHandler, params: dict[str, Any], started: float) -> None:
    service = handler.server.service
    image = _require(params, "image", "image=0")
    result = _compute(handler, params, [image])
    token = params.get("token")
    if token is not None and token >= len(result.tokens):
        raise RequestError(400, f"token={token}: {result.text!r} has {len(result.tokens)} tokens (0 to "
                                f"{len(result.tokens) - 1}, start and end of text included)")
    body = map_png(result, service.image_rgb(image), token=token, all_tokens=params.get("all_tokens", False))
    handler._send(200, body, "image/png")


def _image(handler: ViewerHandler, params: dict[str, Any], started: float) -> None:
    service = handler.server.service
    rgb = service.image_rgb(_require(params, "image", "image=0"))
    handler._send(200, image_png(rgb, min_size=params.get("size", 0)), "image/png",
                  {"Cache-Control": "max-age=3600"})


def _label_setup(handler: ViewerHandler, params: dict[str, Any]):
    service = handler.server.service
    image = _require(params, "image", "image=0")
    classes = params.get("classes", "")
    tokens = [t for t in (params.get("tokens") or "").split(",") if t]
    if not classes.strip() and not tokens:
        raise RequestError(400, "missing parameter classes, e.g. classes=circle,square")
    config = service.label_config(classes, normalize=params.get("normalize"), threshold=params.get("threshold"),
                                  mode=params.get("mode"), prompt_template=params.get("template") or None,
                                  tokens=tokens)
    labels, norm, thresholds, allowed = handler.server.gate.run(lambda: service.label(image, config),
                                                                params.get("view"), params.get("seq"))
    return service, image, config, labels, thresholds, allowed


def _label(handler: ViewerHandler, params: dict[str, Any], started: float) -> None:
    service, image, config, labels, thresholds, allowed = _label_setup(handler, params)
    counts = np.bincount(labels.ravel(), minlength=len(config.classes) + 1)
    handler._json({
        "image": image, "classes": list(config.classes), "thresholds": thresholds, "allowed": allowed,
        "normalize": config.normalize, "mode": config.mode, "prompt_template": config.prompt_template,
        "sources": config.sources, "pixels": {name: int(counts[k]) for k, name in
                                              enumerate(("background", *config.classes))},
        "command": service.label_command(config, [image]),
        "elapsed_ms": round(1000 * (time.perf_counter() - started), 1),
    })


def _label_image(handler: ViewerHandler, params: dict[str, Any], started: float) -> None:
    service, image, config, labels, thresholds, allowed = _label_setup(handler, params)
    title = f"labels of image {image} ({config.normalize}, threshold " + \
        ", ".join(f"{t:.2f}" for t in dict.fromkeys(thresholds)) + ")"
    handler._send(200, label_png(service.image_rgb(image), labels, config.classes, title=title), "image/png")


def _index(handler: ViewerHandler, params: dict[str, Any], started: float) -> None:
    handler._asset("index.html")


_VIEW = {"view": _text("view", 64), "seq": _int("seq", 0)}
_MAP = {"text": _text("text", 2000), "learned": _text("learned", 200), **_VIEW}
_LABEL = {"image": _int("image", 0), "classes": _text("classes", 1000), "tokens": _text("tokens", 1000),
          "normalize": _choice("normalize", ("minmax", "max")), "threshold": _float("threshold", 0.0, 1.0),
          "mode": _choice("mode", ("separate", "compete")), "template": _text("template", 200), **_VIEW}
ROUTES: dict[str, _Route] = {
    "/": _Route(_index, {}),
    "/index.html": _Route(_index, {}),
    "/favicon.ico": _Route(lambda h, p, t: h._asset("favicon.svg"), {}),
    "/api/info": _Route(_info, {}),
    "/api/maps": _Route(_maps, {**_MAP, "page": _int("page", 0), "per_page": _int("per_page", 1, 96),
                                "images": _image_list, "image": _int("image", 0)}),
    "/api/map.png": _Route(_map_png, {**_MAP, "image": _int("image", 0), "token": _int("token", 0),
                                      "all_tokens": _flag("all_tokens")}),
    "/api/image.png": _Route(_image, {"image": _int("image", 0), "size": _int("size", 0, 1024)}),
    "/api/label": _Route(_label, _LABEL),
    "/api/label.png": _Route(_label_image, _LABEL),
}


# ---------------------------------------------------------------------- entry points
def make_app(store: str | Path | MapService, *, host: str = "127.0.0.1", port: int = 8765, device: str = "cpu",
             model: str | None = None, cache_images: int = 96, cache_bytes: int = 2 * 2**30,
             max_connections: int = 64, gate: RequestGate | None = None,
             log: Callable[[str], None] | None = None, space: str = "attention") -> ViewerServer:
    """The viewer's server bound to ``host:port`` (port 0: a free one), not yet serving: call
    ``serve_forever()`` (or :func:`serve`). Loads the store's text encoder and key projections once."""
    service = store if isinstance(store, MapService) else MapService(
        store, device=device, model=model, cache_images=cache_images, cache_bytes=cache_bytes, space=space)
    try:
        return ViewerServer((host, int(port)), service, max_connections=max_connections, gate=gate, log=log)
    except OSError as exc:
        raise InvalidInputError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port "
                                "(or --host)") from None


def serve(store: str | Path, *, host: str = "127.0.0.1", port: int = 8765, device: str = "cpu",
          model: str | None = None, announce: Callable[[str], None] = print,
          ready: Callable[[ViewerServer], None] | None = None, **options: Any) -> None:
    """``ovstore serve``: the viewer of ``store`` until interrupted (Ctrl-C) or shut down. Prints the
    URL, and a warning when ``host`` is not the loopback address: the viewer has no authentication.
    ``ready`` is called with the server once it listens (``server.shutdown()`` stops it)."""
    from ..devices import check_device

    check_device(device)
    server = make_app(store, host=host, port=port, device=device, model=model, **options)
    if host not in ("127.0.0.1", "localhost", "::1"):
        announce(f"warning: listening on {host}: anyone who can reach this address can read the store's "
                 "images and prompts; the viewer has no authentication")
    announce(f"serving {server.service.store.path} ({len(server.service.images)} images) at {server.url} "
             "(Ctrl-C stops)")
    if ready is not None:
        ready(server)
    try:
        server.serve_forever(poll_interval=0.25)
    finally:
        server.server_close()
