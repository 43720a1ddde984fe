"""The HTTP side of `lmrc app`: the page (lmrc/app/static) and a small JSON API, on the standard library's server.

Each browser tab asks for a session (POST /api/session) and passes its id with every call, so two tabs never
share objects or results. A session ends, and its cached frames are deleted, when its tab closes (a beacon to
/api/close), after `idle_seconds` without a call, or when the server stops.

API (JSON in and out; errors are {"error": message} with status 400, or 410 for an ended session):
    POST /api/session                      -> status of a new session (opens the server's VIDEO if one was given)
    POST /api/close     {sid}
    GET  /api/status    ?sid               -> video, objects, prompt / masked frames, the running job
    POST /api/open      {sid, path}        a video file or folder of frames on the server's disk
    POST /api/upload    ?sid&name&folder=0|1  raw body: a video (opened at once) or one frame of a folder
    POST /api/open_upload {sid}            opens the uploaded folder of frames
    GET  /api/frame     ?sid&i             JPEG;  /api/mask ?sid&i: palette PNG, background transparent (204: none)
    GET  /api/reliability ?sid&i&name      the comparator's H map as a colour PNG (204: none)
    POST /api/object    {sid}              -> {id}: a new object
    POST /api/prompt    {sid, frame, object, box | point | stroke}
    POST /api/clear     {sid, frame, object}
    POST /api/propagate {sid};  /api/cancel {sid};  /api/export {sid, kind: masks | overlay | cutout}
    GET  /api/download  ?sid&name          a finished export
"""
from __future__ import annotations

import io
import json
import mimetypes
import secrets
import sys
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
from PIL import Image

from lmrc.app.engine import Engine
from lmrc.app.session import Limits, Session
from lmrc.data.masks import davis_palette
from lmrc.utils.errors import LmrcError

STATIC = Path(__file__).parent / "static"


class SessionEnded(Exception):
    pass


class App:
    """All sessions of one server, the shared engine, and the rules they run under."""

    def __init__(self, engine: Engine, limits: Limits = Limits(), *, video: str | Path | None = None,
                 idle_seconds: float = 1800, cache_root: str | Path | None = None) -> None:
        self.engine = engine
        self.limits = limits
        self.video = video
        self.idle_seconds = idle_seconds
        self.cache_root = cache_root
        self.sessions: dict[str, Session] = {}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="lmrc-app-reaper", daemon=True)
        self._reaper.start()

    def new_session(self) -> Session:
        session = Session(secrets.token_hex(16), self.limits, self.cache_root)
        with self.lock:
            self.sessions[session.id] = session
        return session

    def session(self, sid: str | None) -> Session:
        with self.lock:
            session = self.sessions.get(sid or "")
        if session is None:
            raise SessionEnded("this page's session has ended (tab closed, idle too long or server restarted); "
                               "reload the page to start again")
        session.touch()
        return session

    def close(self, sid: str) -> bool:
        with self.lock:
            session = self.sessions.pop(sid, None)
        if session is not None:
            session.close()
        return session is not None

    def reap(self) -> list[str]:
        """End the sessions idle for longer than `idle_seconds` (a running job counts as activity)."""
        now = time.monotonic()
        with self.lock:
            idle = [s.id for s in self.sessions.values() if now - s.last_seen > self.idle_seconds
                    and not (s.job is not None and s.job.state == "running")]
        for sid in idle:
            self.close(sid)
        return idle

    def _reap_loop(self) -> None:
        while not self._stop.wait(min(30.0, max(0.5, self.idle_seconds / 4))):
            self.reap()

    def shutdown(self) -> None:
        self._stop.set()
        with self.lock:
            sids = list(self.sessions)
        for sid in sids:
            self.close(sid)


class Handler(BaseHTTPRequestHandler):
    server_version = "lmrc-app"
    protocol_version = "HTTP/1.1"

    @property
    def app(self) -> App:
        return self.server.app  # type: ignore[attr-defined]

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)

    # --- plumbing ------------------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlparse(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            if method == "GET" and (url.path == "/" or url.path.startswith("/static/")):
                return self._static(url.path)
            route = getattr(self, f"{method.lower()}_{url.path.removeprefix('/api/')}", None)
            if not url.path.startswith("/api/") or route is None:
                return self._json({"error": f"no such page: {url.path}"}, HTTPStatus.NOT_FOUND)
            route()
        except SessionEnded as exc:
            self._json({"error": str(exc)}, HTTPStatus.GONE)
        except LmrcError as exc:
            self._json({"error": str(exc)}, HTTPStatus.BAD_REQUEST)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # a bug: say so in the page, log it, keep serving
            traceback.print_exc(file=sys.stderr)
            self._json({"error": f"internal error ({type(exc).__name__}: {exc}); see the server's log"},
                       HTTPStatus.INTERNAL_SERVER_ERROR)

    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return {}
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LmrcError("the request body is not JSON") from None
        if not isinstance(body, dict):
            raise LmrcError("the request body must be a JSON object")
        return body

    def _send(self, data: bytes, content_type: str, status: HTTPStatus = HTTPStatus.OK,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _json(self, payload: dict, status: HTTPStatus = HTTPStatus.OK) -> None:
        self._send(json.dumps(payload).encode(), "application/json", status)

    def _png(self, image: Image.Image | None) -> None:
        if image is None:
            return self._send(b"", "image/png", HTTPStatus.NO_CONTENT)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", **({"transparency": 0} if image.mode == "P" else {}))
        self._send(buffer.getvalue(), "image/png")

    def _static(self, path: str) -> None:
        name = "index.html" if path == "/" else path.removeprefix("/static/")
        file = (STATIC / name).resolve()
        if STATIC.resolve() not in file.parents or not file.is_file():
            return self._json({"error": f"no such file: {path}"}, HTTPStatus.NOT_FOUND)
        content_type = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        self._send(file.read_bytes(), content_type)

    def _int(self, body: dict, key: str) -> int:
        try:
            return int(body[key])
        except (KeyError, TypeError, ValueError):
            raise LmrcError(f"{key} must be a whole number") from None

    def _session(self, body: dict | None = None) -> Session:
        return self.app.session((body or {}).get("sid") or self.query.get("sid"))

    # --- sessions ----------------------------------------------------------------------------------------------------

    def post_session(self) -> None:
        session = self.app.new_session()
        status = {}
        if self.app.video is not None:
            try:
                session.open(self.app.video)
            except LmrcError as exc:
                status["error"] = str(exc)
        self._json({**session.status(), **status})

    def post_close(self) -> None:
        body = self._body()
        self._json({"closed": self.app.close(str(body.get("sid", "")))})

    def get_status(self) -> None:
        self._json(self._session().status())

    # --- opening -------------------------------------------------------------------------------------------------------

    def post_open(self) -> None:
        body = self._body()
        session = self._session(body)
        path = str(body.get("path") or "").strip()
        if not path:
            raise LmrcError("type the path of a video file or a folder of frames, or upload one")
        session.open(path)
        self._json(session.status())

    def post_upload(self) -> None:
        session = self._session()
        folder = self.query.get("folder") == "1"
        length = int(self.headers.get("Content-Length") or 0)
        if length > session.limits.max_upload_bytes:
            self.rfile.read(length)  # drain, so the browser sees the answer
            raise LmrcError(f"the upload is {length / 2**20:.0f} MB; this server takes at most "
                            f"{session.limits.max_upload_bytes / 2**20:.0f} MB")
        if self.query.get("first") == "1":
            session.clear_uploads()
        target = session.upload_path(self.query.get("name", ""), folder)
        with open(target, "wb") as out:
            remaining = length
            while remaining:
                chunk = self.rfile.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                out.write(chunk)
                remaining -= len(chunk)
        if not folder:
            session.open(target)
        self._json(session.status())

    def post_open_upload(self) -> None:
        session = self._session(self._body())
        session.open(session.dir / "upload" / "frames")
        self._json(session.status())

    # --- images ------------------------------------------------------------------------------------------------------

    def get_frame(self) -> None:
        session = self._session()
        path = session.frame_path(session._frame_index(self._int(self.query, "i")))
        self._send(path.read_bytes(), "image/jpeg")

    def get_mask(self) -> None:
        session = self._session()
        ids = session.ids(self._int(self.query, "i"))
        if ids is None:
            return self._png(None)
        image = Image.fromarray(ids, "P")
        image.putpalette(davis_palette().reshape(-1).tolist())
        self._png(image)

    def get_reliability(self) -> None:
        session = self._session()
        index = session._frame_index(self._int(self.query, "i"))
        path = session.reliability_path(index)
        if not path.exists():
            return self._png(None)
        with np.load(path) as maps:
            name = self.query.get("name") or "mean"
            if name == "mean":
                weight = np.mean([maps[k].astype(np.float32) for k in maps.files], 0).round().astype(np.uint8)
            elif name in maps.files:
                weight = maps[name]
            else:
                raise LmrcError(f"no reliability map {name!r}; this model has {', '.join(maps.files)} or mean")
        self._png(heat_map(weight))

    # --- objects, prompts, jobs ------------------------------------------------------------------------------------------

    def post_object(self) -> None:
        session = self._session(self._body())
        object_id = session.add_object()
        self._json({"id": object_id, **session.status()})

    def post_prompt(self) -> None:
        body = self._body()
        session = self._session(body)
        frame, object_id = self._int(body, "frame"), self._int(body, "object")
        box, point, stroke = body.get("box"), body.get("point"), body.get("stroke")
        if box is not None and (not isinstance(box, list) or len(box) != 4):
            raise LmrcError("a box is four numbers x0,y0,x1,y1 (pixels of the frame)")
        if point is not None and (not isinstance(point, list) or len(point) != 3):
            raise LmrcError("a click is x, y and whether it is positive")
        if stroke is not None:
            try:
                stroke = ([(float(x), float(y)) for x, y in stroke["path"]], float(stroke["radius"]),
                          bool(stroke["positive"]))
            except (KeyError, TypeError, ValueError):
                raise LmrcError("a stroke is {path: [[x, y], ...], radius, positive}") from None
        if box is None and point is None and stroke is None:
            raise LmrcError("no prompt given: draw a box, click, or paint")
        session.prompt(frame, object_id, box=box, point=point, stroke=stroke)
        self._json(session.status())

    def post_clear(self) -> None:
        body = self._body()
        session = self._session(body)
        session.clear(self._int(body, "frame"), self._int(body, "object"))
        self._json(session.status())

    def post_propagate(self) -> None:
        session = self._session(self._body())
        session.propagate(self.app.engine.propagate)
        self._json(session.status())

    def post_cancel(self) -> None:
        session = self._session(self._body())
        session.cancel()
        self._json(session.status())

    def post_export(self) -> None:
        body = self._body()
        session = self._session(body)
        session.export(str(body.get("kind", "")))
        self._json(session.status())

    def get_download(self) -> None:
        session = self._session()
        path = session.export_file(self.query.get("name", ""))
        content_type = "video/mp4" if path.suffix == ".mp4" else "application/zip"
        self._send(path.read_bytes(), content_type,
                   headers={"Content-Disposition": f'attachment; filename="{path.name}"'})


def heat_map(weight: np.ndarray) -> Image.Image:
    """H (uint8, 255 = fully trusted local read) -> RGBA: blue where the model distrusts its local reads, red where
    it trusts them (OpenCV's jet colour map), semi-transparent to show the frame below."""
    import cv2

    rgb = cv2.applyColorMap(weight, cv2.COLORMAP_JET)[..., ::-1]
    alpha = np.full(weight.shape + (1,), 170, np.uint8)
    return Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA")


def make_server(app: App, host: str = "127.0.0.1", port: int = 7860, verbose: bool = False) -> ThreadingHTTPServer:
    """A server bound to host:port (port 0: a free one, see `server.server_address`); call `serve_forever()`."""
    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        raise LmrcError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pass another --port") from None
    server.daemon_threads = True
    server.app = app  # type: ignore[attr-defined]
    server.verbose = verbose  # type: ignore[attr-defined]
    return server
