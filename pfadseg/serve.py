"""`pfadseg serve`: a `Detector` behind a JSON API and a browser page (FastAPI + uvicorn).

    POST /predict  multipart form, one or more images in the field "file" ->
                   {"results": [{name, score, normalized_score, anomalous, threshold,
                     defect_area, width, height, overlay, mask, anomaly_map}]}
                   overlay, mask and anomaly_map are base64 PNGs: the heat map over
                   the image (no outline), the defect mask at the pixel threshold (both
                   at the image's size, at most 1024 a side), and the normalised map as
                   8-bit grayscale at the model's input size (128 = the pixel threshold)
    GET  /health   {"status": "ok"}
    GET  /model    variant, teacher, thresholds, versions
    GET  /docs     the API's schema page (Swagger UI, whose scripts come from a CDN)
    GET  /         the page: drop images, see overlays and verdicts, move a threshold

The model is loaded once and runs in one thread of its own: requests queue for
it (at most MAX_QUEUED at a time, then 503) and the images of requests waiting
together are run as one batch, while the event loop keeps accepting and
decoding. Bad uploads get a 4xx whose JSON "detail" names the file.
"""
from __future__ import annotations

import asyncio
import base64
import errno
import ipaddress
import logging
import queue
import secrets
import socket
import threading
from importlib.resources import files
from io import BytesIO

from PIL import Image, UnidentifiedImageError

from .detector import Detector, Prediction
from .visualize import mask_image

try:
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.requests import ClientDisconnect
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
except ImportError as exc:  # optional dependency
    raise ImportError("`pfadseg serve` needs FastAPI and uvicorn: pip install 'pfadseg[serve]'") from exc

# /predict reads its form itself (size limits while streaming): the schema page gets the
# form's shape here, so that it offers a file picker
PREDICT_REQUEST = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"], "properties": {"file": {
        "type": "array", "items": {"type": "string", "format": "binary"},
        "description": "one or more images, the field repeated per image"}}}}}}}
# what PIL may decode: the formats train and predict read (PPM: also PGM, PBM), no EPS, PDF or plugins
FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM", "TGA")
MAX_FILES = 16  # images per request
BATCH_SIZE = 8  # images per model call, from one request or several waiting together
MAX_QUEUED = 64  # requests waiting for the model before new ones get 503
DEFAULT_MAX_UPLOAD_MB = 20.0
DEFAULT_MAX_MEGAPIXELS = 40.0
LOCAL_HOSTS = ("localhost",)
log = logging.getLogger(__name__)


class UploadError(HTTPException):
    """A bad upload: the status code and a message naming the file."""


def is_local(host: str) -> bool:
    """Whether binding `host` keeps the server reachable from this machine only."""
    if host in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int, token: str | None) -> socket.socket:
    """The server's listening socket, bound before the model loads (the page's address
    is printed only once it is held; port 0: any free port). Refuses a non-local
    `host` without a token, a token no HTTP header can carry, and a port another
    program holds."""
    if not is_local(host) and not token:
        raise ValueError(f"--host {host} makes the server reachable from other machines: give "
                         "--token T as well (/predict and /model then need it)")
    if token == "":  # served with no check at all, while the command asked for one
        raise ValueError("--token is empty. Fix: give a secret, e.g. --token $(python -c 'import "
                         "secrets; print(secrets.token_urlsafe())'), or leave --token out")
    if token is not None and not (token.isascii() and token.isprintable() and " " not in token):
        raise ValueError("--token must be printable ASCII without spaces (it travels in an HTTP "
                         "header). Fix: e.g. --token $(python -c 'import secrets; print(secrets.token_urlsafe())')")
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        listener.bind((host, port))
        listener.listen()  # held from now: another SO_REUSEADDR socket cannot bind it too
    except OSError as exc:
        listener.close()
        fix = ("choose another --port, or stop the program using it" if exc.errno == errno.EADDRINUSE
               else "check --host: it must name this machine (an address it has, or 0.0.0.0 for all)"
               if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL
               else "choose another --port (below 1024 needs root), or check --host")
        raise ValueError(f"cannot serve on {host}:{port} ({exc.strerror or exc}). Fix: {fix}.") from exc
    return listener


class PixelBudget:
    """The decoded pixels the server holds at once, over all requests: large images
    beyond it get 413 (one request alone is over it) or 503 (busy: retry), so that
    a few small uploads of huge images cannot exhaust the memory."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0
        self.lock = threading.Lock()

    def take(self, name: str, pixels: int, request_holds: int) -> None:
        """Reserve `pixels` for one image of a request already holding `request_holds`."""
        with self.lock:
            if request_holds + pixels > self.limit:
                raise UploadError(413, f"{name}: the request's images hold over {self.limit / 1e6:g} "
                                       "megapixels in all (4x --max-megapixels). Fix: send fewer "
                                       "images per request, or smaller ones.")
            if self.held + pixels > self.limit:
                raise UploadError(503, f"{name}: busy with other large images; retry in a moment",
                                  headers={"Retry-After": "1"})
            self.held += pixels

    def give(self, pixels: int) -> None:
        """Return the pixels of a finished upload to the budget."""
        with self.lock:
            self.held -= pixels


def decode_upload(name: str, data: bytes, max_pixels: int, budget: PixelBudget | None = None,
                  request_holds: int = 0) -> Image.Image:
    """Decode one uploaded file, refusing empty, non-image, corrupt and oversized ones.

    The size is checked from the header, before any pixel is decoded; PIL itself
    refuses anything over twice its MAX_IMAGE_PIXELS (800 megapixels, as pfadseg.data
    sets it) whatever `max_pixels` says. (No warnings filter: that is process-wide, and
    this runs in several threads at once.)"""
    if not data:
        raise UploadError(400, f"{name}: empty file")
    try:
        image = Image.open(BytesIO(data), formats=FORMATS)
        pixels = image.width * image.height
        if pixels > max_pixels:
            raise UploadError(413, f"{name}: {image.width}x{image.height} pixels is over the "
                                   f"limit of {max_pixels / 1e6:g} megapixels (--max-megapixels). "
                                   "Fix: downscale the image.")
        if budget is not None:
            budget.take(name, pixels, request_holds)
        try:
            image.load()
        except BaseException:
            if budget is not None:
                budget.give(pixels)
            raise
    except UnidentifiedImageError:
        raise UploadError(415, f"{name}: not an image of a format this server reads (send PNG, "
                               "JPEG, BMP, TIFF, WebP, GIF, PNM or TGA)") from None
    except Image.DecompressionBombError as exc:
        raise UploadError(413, f"{name}: refused as a decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UploadError(400, f"{name}: corrupt or truncated image ({exc})") from None
    return image


def _png(image: Image.Image) -> str:
    """Base64 PNG at zlib level 1: an overlay encodes several times faster than at
    the default 6, for somewhat more bytes."""
    buf = BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def result_json(p: Prediction, threshold: float) -> dict:
    """One prediction as the API returns it."""
    mask = p.mask_at(p.output_size())
    return {"name": p.name, "score": p.score, "normalized_score": p.normalized_score,
            "anomalous": p.anomalous, "threshold": threshold, "defect_area": float(mask.mean()),
            "width": int(p.image.shape[1]), "height": int(p.image.shape[0]),
            "overlay": _png(p.overlay(outline=False)), "mask": _png(mask_image(mask)),
            "anomaly_map": _png(p.map_image())}


class ModelQueue:
    """The detector, run by one thread of its own. Requests wait in a queue, and
    the images of requests that wait together go through the model as one batch
    (up to `batch_size` images): on a CPU a batch of 8 small images took half the
    time of 8 single ones. A model error fails only the requests of its batch."""

    def __init__(self, detector: Detector, batch_size: int = BATCH_SIZE,
                 max_waiting: int = MAX_QUEUED) -> None:
        self.detector, self.batch_size, self.max_waiting = detector, batch_size, max_waiting
        self.waiting = 0  # requests queued or running; only the event loop's thread changes it
        self._jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._work, name="pfadseg-model", daemon=True).start()

    async def predict(self, images: list[Image.Image], names: list[str]) -> list[Prediction]:
        """The images' predictions, once the model thread gets to them; 503 when too many wait."""
        if self.waiting >= self.max_waiting:
            raise HTTPException(503, "busy: too many requests waiting for the model; retry shortly",
                                headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.waiting += 1
        try:
            self._jobs.put((images, names, loop, future))
            return await future
        finally:
            self.waiting -= 1

    def _work(self) -> None:
        while True:
            jobs = [self._jobs.get()]
            count = len(jobs[0][0])
            while count < self.batch_size:
                try:
                    jobs.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
                count += len(jobs[-1][0])
            self._run(jobs)

    def _run(self, jobs: list) -> None:
        try:
            predictions = self.detector.predict([im for job in jobs for im in job[0]], self.batch_size,
                                                [name for job in jobs for name in job[1]])
        except Exception as exc:  # noqa: BLE001 - handed to the waiting requests; the thread lives on
            for _, _, loop, future in jobs:
                loop.call_soon_threadsafe(_settle, future, None, exc)
            return
        start = 0
        for images, _, loop, future in jobs:
            loop.call_soon_threadsafe(_settle, future, predictions[start:start + len(images)], None)
            start += len(images)


def _settle(future: asyncio.Future, result: object, exc: BaseException | None) -> None:
    """Complete a request's future unless the request is gone (client disconnected)."""
    if future.cancelled():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


class _BodyLimit:
    """ASGI middleware: refuse a request body over `limit` bytes with 413, from its
    Content-Length before reading it, or as soon as a streamed body passes it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = (f"request body is over the limit of {self.limit / 2**20:.1f} MB "
                   f"({MAX_FILES} files of at most --max-upload-mb each)")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await JSONResponse({"detail": message}, 413)(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, message)
            return msg
        return await self.app(scope, counted, send)


def create_app(detector: Detector, token: str | None = None,
               max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
               max_megapixels: float = DEFAULT_MAX_MEGAPIXELS) -> FastAPI:
    """The web app around a loaded detector. With `token`, every API call needs
    `Authorization: Bearer <token>` or `?token=<token>`; the page and /health are public."""
    max_bytes = int(max_upload_mb * 2**20)
    max_pixels = int(max_megapixels * 1e6)
    model_queue = ModelQueue(detector)
    budget = PixelBudget(4 * max_pixels)
    page = (files("pfadseg") / "static" / "index.html").read_text(encoding="utf-8")
    app = FastAPI(title="pfadseg", description=__doc__, version=detector.info()["version"],
                  docs_url="/docs", redoc_url=None)
    app.add_middleware(_BodyLimit, limit=MAX_FILES * max_bytes + 2**20)

    def authorize(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else request.query_params.get("token", "")
        if not secrets.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong token: send 'Authorization: Bearer <token>' "
                                     "or ?token=<token>", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    @app.head("/", response_class=HTMLResponse, include_in_schema=False)  # uptime monitors
    async def index() -> str:
        return page

    @app.get("/health")
    @app.head("/health", include_in_schema=False)  # one operation in the schema, not two
    async def health() -> dict:
        """Open, like the page: load balancers' probes send no token, and it tells nothing."""
        return {"status": "ok"}

    @app.get("/model")
    @app.head("/model", include_in_schema=False)
    async def model(request: Request) -> dict:
        authorize(request)
        return detector.info()

    @app.post("/predict", openapi_extra=PREDICT_REQUEST)
    async def predict(request: Request) -> dict:
        """Score the images in the multipart field "file" (repeat it for several). All or
        nothing: one bad file fails the request, with an error naming it."""
        authorize(request)
        held = 0  # decoded pixels this request holds, given back when it is answered
        try:
            async with request.form(max_files=MAX_FILES, max_fields=MAX_FILES) as form:
                uploads = [u for u in form.getlist("file") if isinstance(u, UploadFile)]
                if not uploads:
                    kind = request.headers.get("content-type", "none").split(";")[0]
                    got = ("a 'file' field without a file name (curl: -F file=@x.png, not <x.png)"
                           if "file" in form else f"content type {kind}, fields {sorted(form) or 'none'}")
                    raise HTTPException(400, f"no images (got {got}): send one or more files in the "
                                             "multipart/form-data field 'file', e.g. curl -F file=@x.png")
                names, images = [], []
                for i, upload in enumerate(uploads):
                    name = upload.filename or f"file {i + 1}"
                    if upload.size is not None and upload.size > max_bytes:
                        raise UploadError(413, f"{name}: {upload.size / 2**20:.3g} MB is over the "
                                               f"upload limit of {max_upload_mb:g} MB (--max-upload-mb)")
                    data = await upload.read()
                    image = await run_in_threadpool(decode_upload, name, data, max_pixels, budget, held)
                    held += image.width * image.height
                    images.append(image)
                    names.append(name)
            predictions = await model_queue.predict(images, names)
            threshold = detector.thresholds.image
            return {"results": [await run_in_threadpool(result_json, p, threshold) for p in predictions]}
        except ClientDisconnect:  # a closed page or a dropped line: one log line, no traceback
            client = request.client.host if request.client else "a client"
            log.warning("%s closed the connection during its upload; nothing was scored", client)
            raise HTTPException(400, "connection closed during the upload") from None
        finally:
            budget.give(held)

    return app


def serve(detector: Detector, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
          max_megapixels: float = DEFAULT_MAX_MEGAPIXELS, listener: socket.socket | None = None) -> None:
    """Run the server until interrupted. A non-local `host` needs a `token`; `listener`
    is a socket from `bind(host, port, token)` (bound here when not given)."""
    listener = listener or bind(host, port, token)
    import uvicorn

    app = create_app(detector, token, max_upload_mb, max_megapixels)
    if host in ("0.0.0.0", "::"):  # every address of this machine: its name opens the page elsewhere
        shown = socket.gethostname()
    else:
        shown = f"[{host}]" if ":" in host else host
    print(f"pfadseg serve: {detector.info()['variant']} on {detector.device}, "
          f"page at http://{shown}:{listener.getsockname()[1]}/" + ("?token=..." if token else ""),
          flush=True)
    # on Ctrl-C open requests get 5 s, not as long as a stalled upload would take
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    with listener:
        uvicorn.Server(config).run(sockets=[listener])
