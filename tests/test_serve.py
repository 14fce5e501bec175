"""`pfadseg serve`: the JSON API through FastAPI's test client, the model queue,
and the real command on a localhost port under a small load test."""
from __future__ import annotations

import asyncio
import base64
import errno
import importlib.util
import io
import socket
import struct
import threading
import warnings
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'pfadseg[serve]'")
from fastapi.testclient import TestClient  # noqa: E402

from pfadseg.calibration import Thresholds  # noqa: E402
from pfadseg.checkpoint import save_checkpoint  # noqa: E402
from pfadseg.cli import main  # noqa: E402
from pfadseg.config import preset  # noqa: E402
from pfadseg.demo import demo_root  # noqa: E402
from pfadseg.detector import Detector  # noqa: E402
from pfadseg.models import AnomalyModel, ModelConfig  # noqa: E402
from pfadseg.models.teacher import RANDOM  # noqa: E402
from pfadseg.serve import ModelQueue, PixelBudget, UploadError, bind, create_app, is_local, serve  # noqa: E402

spec = importlib.util.spec_from_file_location(
    "load_test", Path(__file__).parents[1] / "benchmarks" / "load_test.py")
load_test = importlib.util.module_from_spec(spec)
spec.loader.exec_module(load_test)

TEST_IMAGES = sorted((demo_root() / "bottle" / "test").rglob("*.jpg"))
IMAGE = demo_root() / "bottle" / "test" / "broken_large" / "000.jpg"


def write_checkpoint(path: Path, image_threshold: float = 0.4, pixel_threshold: float = 0.6) -> Path:
    """An untrained 64x64 PFADSeg checkpoint (the API's behaviour does not depend on training)."""
    model = AnomalyModel.build(ModelConfig.named("pfadseg", teacher="efficientnet_lite0", image_size=64),
                               teacher_weights=RANDOM)
    thresholds = Thresholds(image=image_threshold, pixel=pixel_threshold, method="test")
    save_checkpoint(model, path, preset("tiny").to_dict(), image_threshold,
                    {"category": "bottle", **thresholds.to_meta()})
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, one_thread) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("serve") / "checkpoint.safetensors")


@pytest.fixture(scope="module")
def detector(checkpoint: Path) -> Detector:
    return Detector.load(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def client(detector: Detector) -> TestClient:
    with TestClient(create_app(detector)) as c:
        yield c


def upload(*paths: Path) -> list:
    return [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def png(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG file that claims width x height pixels (what a decompression bomb looks like)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def test_health_and_model(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    for path in ("/health", "/", "/model"):  # probes and uptime monitors that send HEAD
        assert client.head(path).status_code == 200, path
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # GET and HEAD /health warned: one operation id, two ops
        schema = client.get("/openapi.json").json()
    assert sorted(schema["paths"]) == ["/health", "/model", "/predict"]
    form = schema["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert form["schema"]["properties"]["file"]["items"]["format"] == "binary"  # /docs: a file picker
    info = client.get("/model").json()
    assert info["variant"] == "pfadseg" and info["teacher"] == "efficientnet_lite0"
    assert info["threshold"] == 0.4 and info["pixel_threshold"] == 0.6
    assert info["image_size"] == 64 and info["version"]


def test_page_is_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="threshold"' in page.text and "/predict" in page.text


def test_predict_matches_the_detector(client: TestClient, detector: Detector) -> None:
    response = client.post("/predict", files=upload(IMAGE))
    assert response.status_code == 200
    [r] = response.json()["results"]
    [expected] = detector.predict([IMAGE])
    assert r["name"] == IMAGE.name
    assert r["score"] == pytest.approx(expected.score, abs=1e-3)
    assert r["threshold"] == 0.4 and r["anomalous"] == (r["score"] >= 0.4)
    assert r["anomalous"] == (r["normalized_score"] >= 0.5)
    overlay, mask, amap = png(r["overlay"]), png(r["mask"]), png(r["anomaly_map"])
    assert overlay.size == mask.size == (r["width"], r["height"]) == (256, 256)  # the upload's size
    assert overlay.mode == "RGB" and mask.mode == "L" and amap.mode == "L"
    assert amap.size == (64, 64)  # the model's input size
    values = np.asarray(mask)
    assert set(np.unique(values)) <= {0, 255}
    assert r["defect_area"] == pytest.approx((values == 255).mean())


def test_several_images_come_back_in_order(client: TestClient) -> None:
    paths = TEST_IMAGES[:3]
    response = client.post("/predict", files=upload(*paths))
    assert response.status_code == 200
    assert [r["name"] for r in response.json()["results"]] == [p.name for p in paths]


@pytest.mark.parametrize("files, status, words", [
    ([("file", ("notes.txt", b"not an image at all", "text/plain"))], 415, ["notes.txt", "not an image"]),
    ([("file", ("cut.jpg", IMAGE.read_bytes()[:3000], "image/jpeg"))], 400, ["cut.jpg", "truncated"]),
    ([("file", ("empty.png", b"", "image/png"))], 400, ["empty.png", "empty"]),
    ([("file", ("bomb.png", png_header(30000, 30000), "image/png"))], 413, ["bomb.png", "bomb"]),
    ([("file", ("huge.png", png_header(7000, 7000), "image/png"))], 413, ["huge.png", "megapixels"]),
    ([("image", ("a.jpg", IMAGE.read_bytes(), "image/jpeg"))], 400, ["no images", "'file'"]),
    (None, 400, ["no images"]),
])
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(
        client: TestClient, files: list | None, status: int, words: list[str]) -> None:
    response = client.post("/predict", files=files)
    assert response.status_code == status
    detail = response.json()["detail"]
    assert all(w in detail for w in words), detail
    assert client.post("/predict", files=upload(IMAGE)).status_code == 200


def test_an_upload_that_is_not_a_file_says_what_came(client: TestClient) -> None:
    """A raw image body and a text part named 'file' (curl -F file=<x.png) both got the
    bare 'no images'."""
    raw = client.post("/predict", content=IMAGE.read_bytes(), headers={"content-type": "image/jpeg"})
    assert raw.status_code == 400 and "got content type image/jpeg" in raw.json()["detail"]
    text = client.post("/predict", data={"file": "not a file"},
                       headers={"content-type": "application/x-www-form-urlencoded"})
    assert text.status_code == 400 and "without a file name" in text.json()["detail"]


def test_one_bad_file_among_good_ones_is_named(client: TestClient) -> None:
    files = upload(IMAGE) + [("file", ("second.gif", b"GIF89a garbage", "image/gif"))]
    response = client.post("/predict", files=files)
    assert response.status_code == 415 and "second.gif" in response.json()["detail"]


def test_every_format_predict_reads_is_served(client: TestClient) -> None:
    image = Image.open(IMAGE).convert("RGB")
    for fmt, suffix in (("GIF", "gif"), ("PPM", "ppm"), ("TGA", "tga"), ("WEBP", "webp")):
        data = io.BytesIO()
        image.save(data, fmt)
        response = client.post("/predict", files=[("file", (f"part.{suffix}", data.getvalue()))])
        assert response.status_code == 200, (fmt, response.text)  # was 415 for GIF, PNM and TGA


BOUNDARY = "pfadseg-test-boundary"


def _chunked_upload(size: int):
    """A multipart body holding one file of `size` zero bytes, yielded in pieces."""
    yield (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
           "Content-Type: image/png\r\n\r\n").encode()
    for _ in range(size // 65536):
        yield b"\0" * 65536
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def test_upload_limits(detector: Detector) -> None:
    with TestClient(create_app(detector, max_upload_mb=0.001)) as small:  # 1 KiB a file
        response = small.post("/predict", files=upload(IMAGE))
        assert response.status_code == 413
        assert IMAGE.name in response.json()["detail"] and "--max-upload-mb" in response.json()["detail"]
        # a body over every file's limit together is refused before it is read
        response = small.post("/predict", files=[("file", ("big.png", b"\0" * (3 << 20)))])
        assert response.status_code == 413 and "over the limit" in response.json()["detail"]
        # ... and so is a streamed body without a Content-Length, once it passes the limit
        response = small.post("/predict", content=_chunked_upload(3 << 20),
                              headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
        assert response.request.headers.get("transfer-encoding") == "chunked"
        assert response.status_code == 413 and "over the limit" in response.json()["detail"]
    with TestClient(create_app(detector)) as normal:
        too_many = [("file", (f"{i}.jpg", b"x", "image/jpeg")) for i in range(17)]
        response = normal.post("/predict", files=too_many)
        assert response.status_code == 400 and "files" in response.json()["detail"].lower()


def test_a_client_gone_mid_upload_is_one_log_line(detector: Detector, caplog) -> None:
    """A closed page or a dropped line raised ClientDisconnect: a traceback per upload."""
    app = create_app(detector)
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            "\r\n").encode()
    messages = [{"type": "http.request", "body": head + b"\0" * 1000, "more_body": True}]
    sent: list = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/predict", "raw_path": b"/predict", "query_string": b"",
             "root_path": "", "server": ("testserver", 80), "client": ("10.0.0.7", 5000),
             "headers": [(b"host", b"testserver"),
                         (b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode())]}
    with caplog.at_level("WARNING", logger="pfadseg.serve"):
        asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 400
    assert caplog.messages == ["10.0.0.7 closed the connection during its upload; nothing was scored"]


def test_decoded_pixels_are_bounded_over_requests(detector: Detector) -> None:
    """Small files of huge images could fill the memory: the server holds at most 4x
    --max-megapixels of decoded images; a request alone over it gets 413, one arriving
    while others hold it 503; what a request held is given back when it is answered."""
    pixels = Image.open(IMAGE).width * Image.open(IMAGE).height  # 256 x 256
    with TestClient(create_app(detector, max_megapixels=6 * pixels / 4e6)) as c:  # room for 6
        for _ in range(2):  # the first request's pixels were given back
            assert c.post("/predict", files=upload(*[IMAGE] * 6)).status_code == 200
        response = c.post("/predict", files=upload(*[IMAGE] * 7))
        assert response.status_code == 413 and "fewer images per request" in response.json()["detail"]
        bad = [("file", ("cut.png", png_header(8, 8)[:-20], "image/png"))]
        assert c.post("/predict", files=upload(IMAGE) + bad).status_code == 400
        assert c.post("/predict", files=upload(*[IMAGE] * 6)).status_code == 200  # none leaked
    budget = PixelBudget(10)
    budget.take("a", 6, request_holds=0)
    with pytest.raises(UploadError) as busy:
        budget.take("b", 6, request_holds=0)
    assert busy.value.status_code == 503 and "retry" in busy.value.detail
    assert busy.value.headers == {"Retry-After": "1"}  # as the queue-full 503 says, when to retry
    budget.give(6)
    budget.take("b", 6, request_holds=0)


def test_serve_options_are_checked_before_the_model_loads(detector: Detector, capsys) -> None:
    with pytest.raises(ValueError, match="--token must be printable ASCII"):
        serve(detector, token="sécret")  # no HTTP header can carry it: the page could never log in
    with pytest.raises(ValueError, match="--token is empty. Fix: give a secret"):
        serve(detector, token="")  # served every call unchecked before
    for option, value, words in (("--port", "99999", "is over 65535"),
                                 ("--max-megapixels", "0", "is not a number above 0"),
                                 ("--max-upload-mb", "-1", "is not a number above 0")):
        with pytest.raises(SystemExit):
            main(["serve", "--checkpoint", "missing.safetensors", option, value])
        assert f"{option}: '{value}' {words}" in capsys.readouterr().err


def test_token_guards_every_api_call_but_not_the_page(detector: Detector) -> None:
    with TestClient(create_app(detector, token="s3cret")) as c:
        assert c.get("/").status_code == 200
        assert c.get("/health").json() == {"status": "ok"}  # for probes that send no token
        assert c.get("/model").status_code == 401
        assert c.get("/model", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/model", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/model", params={"token": "s3cret"}).status_code == 200
        assert c.post("/predict", files=upload(IMAGE)).status_code == 401
        ok = c.post("/predict", files=upload(IMAGE), headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


def test_non_local_bind_needs_a_token(detector: Detector) -> None:
    assert is_local("127.0.0.1") and is_local("::1") and is_local("localhost")
    assert not is_local("0.0.0.0") and not is_local("192.168.1.5") and not is_local("example.org")
    with pytest.raises(ValueError, match="--token"):
        serve(detector, host="0.0.0.0", port=1)
    # the command refuses before loading the model (the checkpoint need not exist)
    assert main(["serve", "--checkpoint", "missing.safetensors", "--host", "0.0.0.0"]) == 2


def test_a_port_in_use_is_refused_before_the_model_loads(capsys, monkeypatch) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert main(["serve", "--checkpoint", "missing.safetensors", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot serve on 127.0.0.1:{port}" in err and "--port" in err and "missing" not in err
    # an address this machine lacks, a name that does not resolve: the fix is the host, not the
    # port (the errors are raised here: a machine may allow binding any address, or have no DNS)
    for error in (OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"),
                  socket.gaierror(socket.EAI_NONAME, "Name or service not known")):
        def refuse(self: socket.socket, address: tuple, error: OSError = error) -> None:
            raise error
        monkeypatch.setattr(socket.socket, "bind", refuse)
        assert main(["serve", "--checkpoint", "missing.safetensors", "--host", "203.0.113.7",
                     "--token", "t", "--port", "0"]) == 2
        err = capsys.readouterr().err
        assert "cannot serve on 203.0.113.7:0" in err and "Fix: check --host" in err, err


class _GatedDetector:
    """Stands in for a Detector: records each batch of names, holds the first
    batch until released, fails batches holding "bad"."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.started, self.release = threading.Event(), threading.Event()

    def predict(self, images: list, batch_size: int, names: list[str]) -> list[str]:
        self.calls.append(list(names))
        self.started.set()
        self.release.wait(timeout=30)
        if "bad" in names:
            raise RuntimeError("model failed")
        return [f"prediction of {n}" for n in names]


def test_model_queue_batches_waiting_requests_and_survives_errors() -> None:
    stub = _GatedDetector()

    async def scenario() -> tuple[list, list]:
        queue = ModelQueue(stub, batch_size=8)  # type: ignore[arg-type]
        first = asyncio.ensure_future(queue.predict([1], ["a"]))
        await asyncio.to_thread(stub.started.wait, 30)  # the model thread is busy with "a"
        waiting = [asyncio.ensure_future(queue.predict([1, 1], [f"{n}1", f"{n}2"])) for n in "bc"]
        failing = asyncio.ensure_future(queue.predict([1], ["bad"]))
        await asyncio.sleep(0)  # all three are queued now
        assert queue.waiting == 4
        stub.release.set()
        results = await asyncio.gather(first, *waiting, failing, return_exceptions=True)
        after = await queue.predict([1], ["z"])
        return results, after

    results, after = asyncio.run(scenario())
    assert stub.calls == [["a"], ["b1", "b2", "c1", "c2", "bad"], ["z"]]
    assert results[0] == ["prediction of a"]
    # "bad" shared a batch with b and c, so the error reached all three; the queue lives on
    assert all(isinstance(r, RuntimeError) for r in results[1:])
    assert after == ["prediction of z"]


@pytest.fixture(scope="module")
def live_server(checkpoint: Path):
    with load_test.running_server(checkpoint, ("--device", "cpu")) as (url, proc):
        yield url, proc


def test_the_command_serves_health_and_predictions(live_server) -> None:
    url, _ = live_server
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    response = httpx.post(f"{url}/predict", files=upload(IMAGE), timeout=60)
    assert response.status_code == 200
    assert isinstance(response.json()["results"][0]["score"], float)
    text = httpx.post(f"{url}/predict", files=[("file", ("a.txt", b"hello", "text/plain"))], timeout=60)
    assert 400 <= text.status_code < 500 and "a.txt" in text.json()["detail"]


@pytest.mark.parametrize("requests", [
    32, pytest.param(200, marks=pytest.mark.slow)])  # 200 took 1-2 minutes on 2 busy cores
def test_load_test_answers_every_request_correctly(live_server, requests: int) -> None:
    url, proc = live_server
    stats = load_test.run_load(url, TEST_IMAGES[:4], requests=requests, concurrency=8)
    print(f"\n{requests} requests from 8 clients: p50 {stats['p50_ms']:.0f} ms, "
          f"p95 {stats['p95_ms']:.0f} ms, server peak memory {load_test.peak_rss_mb(proc.pid) or 0:.0f} MiB")
    assert stats["errors"] == [] and stats["correct"] == requests



def test_port_zero_binds_a_free_port_held_until_served() -> None:
    with bind("127.0.0.1", 0, None) as listener:  # the command binds once: no probe, then a second bind
        port = listener.getsockname()[1]
        assert port != 0
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))
