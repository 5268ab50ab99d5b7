"""Images are sized from their header before anything decodes them: a real 20000x20000 PNG (400 KB
on disk, 400 MB as pixels) is refused by read_image, by the image-folder camera and by a station
upload, naming the file and its size, while the process's peak memory stays flat; a camera folder
with a bad file in it goes on with the files after it; duplicate uploads are skipped undecoded."""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from daemon_fixtures import (  # noqa: F401 - fixtures are used by name
    Subscriber,
    broker_fixture,
    line_fixture,
    topic_is,
    write_config,
)
from station_http import Client

from anomalygpt_edge.engines import preprocess
from anomalygpt_edge.engines.preprocess import ImageError, decode_image, image_size, read_image
from anomalygpt_edge.runtime.cameras import Camera, create_source
from anomalygpt_edge.runtime.line.config import CameraConfig, load_config, parse_config
from anomalygpt_edge.runtime.line.daemon import Daemon
from anomalygpt_edge.runtime.tools import synthetic

SIDE = 20000


def write_huge_png(path: Path, width: int = SIDE, height: int = SIDE) -> Path:
    """A valid 8-bit gray PNG of width x height black pixels, streamed through zlib a block of rows
    at a time (never more than a few MB in memory, though it decodes to width*height bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(6)
    rows = 200
    block = bytes(width + 1) * rows  # filter byte 0 + a row of zeros, 200 rows at a time
    idat = bytearray()
    for _ in range(height // rows):
        idat += comp.compress(block)
    idat += comp.compress(bytes(width + 1) * (height % rows)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", bytes(idat)) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_huge_png(tmp_path_factory.mktemp("huge") / "huge.png")


def _peak_rss_mb(code: str) -> tuple[float, str]:
    """Run ``code`` in a fresh interpreter; (its peak RSS in MB, its stdout)."""
    wrapped = f"{code}\nimport resource\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    out = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True, timeout=60, check=True)
    lines = out.stdout.strip().splitlines()
    return float(lines[-1]), "\n".join(lines[:-1])


def test_a_huge_png_is_refused_from_its_header_before_decoding_and_peak_memory_stays_low(huge_png: Path) -> None:
    assert huge_png.stat().st_size < 2_000_000, "it is small on disk"
    imports = "from anomalygpt_edge.engines.preprocess import ImageError, read_image"
    baseline, _ = _peak_rss_mb(imports)
    t0 = time.monotonic()
    peak, said = _peak_rss_mb(
        f"{imports}\ntry:\n    read_image({str(huge_png)!r})\nexcept ImageError as e:\n    print(e)"
    )
    assert time.monotonic() - t0 < 10
    assert str(huge_png) in said and "20000x20000 = 400.0 Mpx" in said and "limit of 40 Mpx" in said, said
    assert peak - baseline < 50, f"peak RSS grew by {peak - baseline:.0f} MB (decoding would take 400 MB)"
    with pytest.raises(ImageError, match="over the limit"):
        decode_image(huge_png.read_bytes(), "upload.png")


def _encoded(ext: str, image: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, image, params or [])
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize(
    ("ext", "params"),
    [
        (".png", None),
        (".jpg", None),
        (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
        (".bmp", None),
        (".tif", None),
        (".webp", None),
        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101]),  # lossless: the VP8L header
        (".ppm", None),
        (".pgm", None),
    ],
)
def test_every_supported_format_is_sized_from_its_header(ext: str, params: list[int] | None) -> None:
    image = (np.arange(37 * 53 * 3) % 251).astype(np.uint8).reshape(37, 53, 3)
    data = _encoded(ext, image[..., 0] if ext == ".pgm" else image, params)
    assert image_size(lambda o, n: data[o : o + n]) == (53, 37)
    assert decode_image(data, f"a{ext}").shape[:2] == (37, 53)
    with pytest.raises(ImageError, match=rf"a{ext}: image is 53x37 = 0.0 Mpx, over the limit of 0.001 Mpx"):
        decode_image(data, f"a{ext}", max_pixels=1000)


def _bmp_header(w: int, h: int) -> bytes:
    return b"BM" + bytes(12) + struct.pack("<Iii", 40, w, h) + bytes(28)


def _jpeg_header(w: int, h: int) -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\0" + bytes(9)
    return b"\xff\xd8" + app0 + b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, h, w, 1) + bytes(3)


def _tiff_header(w: int, h: int) -> bytes:
    entries = struct.pack("<HHII", 256, 4, 1, w) + struct.pack("<HHII", 257, 4, 1, h)
    return b"II*\0" + struct.pack("<I", 8) + struct.pack("<H", 2) + entries + bytes(4)


def _webp_header(w: int, h: int) -> bytes:
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes(4) + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x


@pytest.mark.parametrize("header", [_bmp_header, _jpeg_header, _tiff_header, _webp_header, None])
def test_a_few_header_bytes_claiming_a_huge_image_are_refused_in_every_format(header, tmp_path: Path) -> None:
    data = header(16000, 16000) if header else b"P5\n# comment\n16000 16000\n255\n"
    path = tmp_path / "claim.img"
    path.write_bytes(data)
    with pytest.raises(ImageError, match=r"claim.img: image is 16000x16000 = 256.0 Mpx, over the limit"):
        read_image(path)


@pytest.mark.parametrize(
    "data",
    [
        b"not an image",
        b"\x89PNG\r\n\x1a\n\0\0",
        b"\xff\xd8\xff\xe0\0\x10JFIF",
        b"BM" + bytes(10),
        b"RIFF\0\0\0\0WEBPVP9 ",
    ],
)
def test_garbage_and_truncated_headers_are_one_clear_image_error(data: bytes) -> None:
    with pytest.raises(ImageError, match="part.png: not a decodable image"):
        decode_image(data, "part.png")


def test_the_pixel_limit_comes_from_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    base = "device: {id: d}\ncameras: {c: {type: video_file, source: a}}\nrecipes: [{camera: c, recipe: r}]\n"
    assert parse_config(base).limits.max_image_pixels == preprocess.DEFAULT_MAX_IMAGE_PIXELS == 40_000_000
    assert parse_config(base + "limits: {max_image_pixels: 1000}\n").limits.max_image_pixels == 1000
    monkeypatch.setattr(preprocess, "_max_image_pixels", preprocess.max_image_pixels())
    preprocess.set_max_image_pixels(1000)
    with pytest.raises(ImageError, match="over the limit of 0.001 Mpx"):
        decode_image(_encoded(".png", np.zeros((40, 40), np.uint8)), "x.png")
    with pytest.raises(ValueError):
        preprocess.set_max_image_pixels(0)


# -- the image-folder camera goes on after a bad file ---------------------------------------------


def _write_frames(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        cv2.imwrite(str(folder / name), np.full((24, 32, 3), 10 * i, np.uint8))


def test_an_image_folder_camera_skips_a_bad_file_reports_it_and_delivers_the_files_after_it(
    tmp_path: Path, huge_png: Path
) -> None:
    folder = tmp_path / "frames"
    _write_frames(folder, ["a.png", "d.png", "e.png", "f.png", "g.png"])
    (folder / "b.png").write_bytes(b"this is not a png")  # unreadable
    (folder / "c.png").write_bytes(huge_png.read_bytes())  # over the pixel limit
    names: list[str | None] = []
    two_passes = threading.Event()

    def on_frame(frame) -> None:
        names.append(frame.name)
        if names.count("g.png") >= 2:
            two_passes.set()

    statuses: list[str] = []
    cfg = CameraConfig("folder", "image_folder", str(folder), fps=50, loop=True)
    cam = Camera(create_source(cfg), on_frame=on_frame, on_status=lambda n, s, r: statuses.append(s)).start()
    try:
        assert two_passes.wait(10), f"the files after the bad ones never came: {names}"
        info = cam.info()
    finally:
        cam.stop()
    first = names[: names.index("g.png") + 1]
    assert first == ["a.png", "d.png", "e.png", "f.png", "g.png"], names
    assert "b.png" not in names and "c.png" not in names
    assert statuses[0] == "online" and "reconnecting" not in statuses, "a bad file is not a lost camera"
    assert info["status"] == "online" and info["reconnects"] == 0
    assert info["skipped"] >= 2 and "c.png: image is 20000x20000" in info["last_error"], info


def test_an_image_folder_with_only_bad_files_is_a_camera_that_reconnects_with_the_reason(tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    for name in ("x.png", "y.png"):
        (folder / name).write_bytes(b"garbage")
    reasons: list[str] = []
    got = threading.Event()

    def on_status(name: str, status: str, reason: str | None) -> None:
        if status == "reconnecting":
            reasons.append(reason or "")
            got.set()

    cfg = CameraConfig("bad", "image_folder", str(folder), fps=50, reconnect_min_s=0.05, reconnect_max_s=0.1)
    cam = Camera(create_source(cfg), on_status=on_status).start()
    try:
        assert got.wait(5)
    finally:
        cam.stop()
    assert "no readable image" in reasons[0] and "not a decodable image" in reasons[0], reasons


def test_the_stations_folder_camera_skips_bad_files_too(
    default_bundle_dir: Path, tmp_path: Path, huge_png: Path
) -> None:
    from anomalygpt_edge.engines.bundle import EngineBundle
    from anomalygpt_edge.runtime.recipes.store import RecipeStore
    from anomalygpt_edge.runtime.web.standalone import CameraSpec, StandaloneStation

    folder = tmp_path / "frames"
    _write_frames(folder, ["a.png", "c.png"])
    (folder / "b.png").write_bytes(huge_png.read_bytes())
    # The station's cameras are the daemon's cameras (one runtime): the page shows their skips.
    station = StandaloneStation(
        RecipeStore(tmp_path / "store"),
        EngineBundle.open(default_bundle_dir),
        [CameraSpec("bench", "image_folder", str(folder), fps=50)],
    ).start()

    def cam() -> dict:
        return station.cameras()[0]

    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not ((cam()["skipped"] or 0) >= 2 and (cam()["frame_seq"] or 0) >= 4):
            time.sleep(0.05)
        info = cam()
    finally:
        station.stop()
    assert info["skipped"] >= 2 and info["frame_seq"] >= 4 and info["status"] == "online", info
    assert "b.png: image is 20000x20000" in (info["last_error"] or "")


# -- station uploads: header check and duplicates before decoding ---------------------------------


def _rss_peak_reset() -> bool:
    """Reset this process's peak-RSS counter (Linux clear_refs 5); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def test_station_upload_refuses_a_huge_png_before_decoding_and_skips_duplicates_undecoded(
    default_bundle_dir: Path, tmp_path: Path, huge_png: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anomalygpt_edge.engines.bundle import EngineBundle
    from anomalygpt_edge.runtime.recipes.store import RecipeStore
    from anomalygpt_edge.runtime.web import enroll_ops as station_module  # where uploads are decoded
    from anomalygpt_edge.runtime.web.auth import UserStore
    from anomalygpt_edge.runtime.web.server import StationServer, WebConfig
    from anomalygpt_edge.runtime.web.standalone import CameraSpec, StandaloneStation

    decoded: list[str] = []
    real_decode = station_module.decode_image

    def counting_decode(data: bytes, name: str = "image", max_pixels: int | None = None) -> np.ndarray:
        decoded.append(name)
        return real_decode(data, name, max_pixels)

    monkeypatch.setattr(station_module, "decode_image", counting_decode)
    _write_frames(tmp_path / "frames", ["a.png"])  # a station has a camera; this one is not used
    camera = CameraSpec("bench", "image_folder", str(tmp_path / "frames"), fps=1)
    station = StandaloneStation(
        RecipeStore(tmp_path / "store"), EngineBundle.open(default_bundle_dir), [camera]
    ).start()
    UserStore(tmp_path / "users.json").set("theo", "technician", "technician-pw")
    server = StationServer(station, WebConfig(tmp_path / "users.json", tmp_path / "audit.jsonl", port=0)).start()
    try:
        c = Client(server.url)
        assert c.login("theo", "technician-pw").status == 200
        assert c.post("/api/enroll/start", {"recipe": "plate"}).status == 200
        huge = base64.b64encode(huge_png.read_bytes()).decode()
        measured = _rss_peak_reset()
        rss_before = _status_kb("VmRSS")
        t0 = time.monotonic()
        files = [{"name": f"huge-{i}.png", "data": huge} for i in range(3)]
        r = c.post("/api/enroll/upload", {"recipe": "plate", "files": files})
        elapsed = time.monotonic() - t0
        if measured:
            grown_mb = (_status_kb("VmHWM") - rss_before) / 1024
            assert grown_mb < 150, f"peak RSS grew {grown_mb:.0f} MB (three decodes took 4.76 GB)"
        assert r.status == 400 and "huge-0.png: image is 20000x20000" in r.json()["error"], r.body[:300]
        assert elapsed < 5, elapsed
        assert c.get("/api/recipes/plate").json()["k"] == 0, "nothing was enrolled"

        good = np.random.default_rng(1).integers(0, 255, (224, 224, 3), dtype=np.uint8)
        png = base64.b64encode(_encoded(".png", good)).decode()
        decoded.clear()
        step = c.post(
            "/api/enroll/upload",
            {"recipe": "plate", "files": [{"name": "good.png", "data": png}, {"name": "copy.png", "data": png}]},
        ).json()
        assert step["k"] == 1 and step["added"] == ["good.png"] and step["skipped"] == ["copy.png: uploaded twice"]
        assert decoded == ["good.png"], "the copy was skipped by its hash, undecoded"
        decoded.clear()
        again = c.post("/api/enroll/upload", {"recipe": "plate", "files": [{"name": "again.png", "data": png}]}).json()
        assert again["k"] == 1 and again["skipped"] == ["again.png: already enrolled"] and decoded == []
    finally:
        server.stop()
        station.stop()


# -- the running daemon: folder-watch parts and folder cameras ------------------------------------


def test_the_daemon_answers_a_huge_folder_watch_part_with_an_error_at_once_and_a_folder_camera_skips_it(
    tmp_path: Path, broker, line: dict, huge_png: Path
) -> None:
    frames = synthetic.read_video_frames(line["video"])
    inbox, folder = tmp_path / "inbox", tmp_path / "frames"
    inbox.mkdir()
    folder.mkdir()
    for i in range(4):
        cv2.imwrite(str(folder / f"{i:04d}.png"), frames[i])
    (folder / "0001b.png").write_bytes(huge_png.read_bytes())  # between two good frames
    cameras = {
        "inbox": {"type": "image_folder", "source": str(inbox)},
        "cam2": {"type": "image_folder", "source": str(folder), "fps": 10},
    }
    recipes = [
        {"camera": "inbox", "recipe": "bracket", "trigger": "folder_watch", "deadline_ms": 5000},
        {"camera": "cam2", "recipe": "bracket", "trigger": "free_run", "fps": 10, "deadline_ms": 3000},
    ]
    path = write_config(tmp_path / "h.yaml", broker, cameras, recipes, line["store"], line["bundle"], device="huge")
    cfg = json.loads(path.read_text())
    cfg["health"] = {"heartbeat_s": 0.5}
    path.write_text(json.dumps(cfg))
    sub = Subscriber(broker, ["anomalygpt/huge/#"])
    daemon = Daemon(load_config(path)).start()
    try:
        sub.wait_for(topic_is("/cam2/verdict"), count=1, timeout=20)
        t0 = time.time()
        (inbox / ".huge.tmp").write_bytes(huge_png.read_bytes())
        (inbox / ".huge.tmp").rename(inbox / "huge.png")
        cv2.imwrite(str(inbox / ".good.png"), frames[0])
        (inbox / ".good.png").rename(inbox / "good.png")
        parts = {m.json()["part_id"]: m.json() for m in sub.wait_for(topic_is("/inbox/verdict"), count=2, timeout=20)}

        def skipped(m) -> bool:
            cam = m.json().get("cameras", {}).get("cam2", {}) if m.topic.endswith("/status") else {}
            return cam.get("skipped", 0) >= 1 and cam.get("status") == "online"

        status = sub.wait_for(skipped, timeout=10)[0].json()["cameras"]["cam2"]
        cam2 = [m.json() for m in sub.messages if m.topic.endswith("/cam2/verdict")]
    finally:
        daemon.stop()
        sub.close()
    huge = parts["huge"]
    assert huge["verdict"] == "ERROR" and "image is 20000x20000 = 400.0 Mpx, over the limit" in huge["reason"], huge
    assert huge["published_at_epoch"] - t0 < 2.5, "refused from the header, not after a 400 Mpx decode"
    assert parts["good"]["verdict"] == "OK"
    assert "0001b.png: image is 20000x20000" in status["last_error"] and status["reconnects"] == 0
    assert all(v["verdict"] in ("OK", "NG") for v in cam2), "the folder camera went on with the good frames"
