"""Camera image → encoder ``pixel_values``, with numpy and OpenCV only (no torch on the device).

The geometry of every step is kept in :class:`Prepared` so an anomaly map (in encoder-input
pixels) can be mapped back onto the original camera image for overlays and region boxes.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from anomalygpt_edge.engines.manifest import Preprocess

#: Largest image (width x height) decoded anywhere: files, camera folders, folder-watch parts,
#: station uploads. A 20000x20000 PNG is ~1 MB on disk but 1.2 GB decoded; the header says so
#: before a byte of it is decoded. ``limits.max_image_pixels`` in the config overrides it.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
_max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS
#: Formats whose header :func:`image_size` reads; anything else is refused rather than handed
#: to a decoder whose memory use we cannot bound beforehand.
SIZED_FORMATS = "PNG, JPEG, BMP, TIFF, WebP, PNM"

_INTERP = {
    "bicubic": cv2.INTER_CUBIC,
    "bilinear": cv2.INTER_LINEAR,
    "area": cv2.INTER_AREA,
    "nearest": cv2.INTER_NEAREST,
}


class ImageError(ValueError):
    """An image that cannot be inspected: empty, undecodable, wrong type; the message says which."""


@dataclass(frozen=True)
class Prepared:
    """A preprocessed image and where the encoder's input window lies in the source image.

    ``window`` is (x0, y0, x1, y1) in source pixels covered by the encoder input (for letterbox,
    the padded canvas extends past the image; ``content`` is the image part inside the input).
    """

    pixel_values: np.ndarray  # (3, H, W) float32
    source_size: tuple[int, int]  # (H, W) of the source image (after ROI)
    window: tuple[float, float, float, float]
    content: tuple[int, int, int, int]  # (x0, y0, x1, y1) of real image pixels in encoder-input pixels


def to_rgb(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Accept grayscale (H,W), (H,W,1), BGR (H,W,3) or BGRA (H,W,4) uint8/uint16; return RGB uint8."""
    if not isinstance(image, np.ndarray) or image.size == 0:
        raise ImageError(f"{name}: empty image")
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageError(f"{name}: pixel type {image.dtype} is not supported (need uint8 or uint16)")
    if image.ndim == 2 or image.ndim == 3 and image.shape[2] == 1:
        return cv2.cvtColor(image.reshape(image.shape[0], image.shape[1]), cv2.COLOR_GRAY2RGB)
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    raise ImageError(f"{name}: shape {image.shape} is not an image (need HxW, HxWx1, HxWx3 or HxWx4)")


def set_max_image_pixels(limit: int) -> None:
    """Set the process-wide pixel limit of :func:`read_image` and :func:`decode_image` (from config)."""
    global _max_image_pixels
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"max_image_pixels must be a positive integer, got {limit!r}")
    _max_image_pixels = limit


def max_image_pixels() -> int:
    """The pixel limit in force (see :func:`set_max_image_pixels`)."""
    return _max_image_pixels


# -- image headers: size without decoding -----------------------------------------------------------

_Reader = Callable[[int, int], bytes]  # (offset, n) -> up to n bytes at offset
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers carry the size
_JPEG_MAX_SEGMENTS = 4096  # a real file reaches its SOF in a few dozen segments


class _HeaderError(Exception):
    """A recognised format whose header is truncated or inconsistent."""


def _exact(read: _Reader, offset: int, n: int) -> bytes:
    data = read(offset, n)
    if len(data) != n:
        raise _HeaderError("truncated header")
    return data


def _png_size(read: _Reader) -> tuple[int, int]:
    chunk = _exact(read, 8, 16)
    if chunk[4:8] != b"IHDR":
        raise _HeaderError("PNG without IHDR chunk first")
    return struct.unpack(">II", chunk[8:16])


def _jpeg_size(read: _Reader) -> tuple[int, int]:
    pos = 2
    for _ in range(_JPEG_MAX_SEGMENTS):
        marker = _exact(read, pos, 2)
        if marker[0] != 0xFF:
            raise _HeaderError("JPEG segment without marker")
        m = marker[1]
        if m == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if m in (0x01, 0xD8) or 0xD0 <= m <= 0xD7:  # markers without a length
            pos += 2
            continue
        if m in (0xD9, 0xDA):
            raise _HeaderError("JPEG without a frame header before its scan")
        (length,) = struct.unpack(">H", _exact(read, pos + 2, 2))
        if length < 2:
            raise _HeaderError("JPEG segment length below 2")
        if m in _JPEG_SOF:
            _precision, height, width = struct.unpack(">BHH", _exact(read, pos + 4, 5))
            return width, height
        pos += 2 + length
    raise _HeaderError("JPEG frame header not found")


def _bmp_size(read: _Reader) -> tuple[int, int]:
    (dib,) = struct.unpack("<I", _exact(read, 14, 4))
    if dib == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        return struct.unpack("<HH", _exact(read, 18, 4))
    width, height = struct.unpack("<ii", _exact(read, 18, 8))
    if width < 0:
        raise _HeaderError("BMP with a negative width")
    return width, abs(height)  # a negative height is a top-down bitmap


def _tiff_size(read: _Reader) -> tuple[int, int]:
    head = _exact(read, 0, 16 if read(2, 2) in (b"+\0", b"\0+") else 8)
    e = "<" if head[:2] == b"II" else ">"
    (version,) = struct.unpack(e + "H", head[2:4])
    big = version == 43  # BigTIFF: 64-bit offsets and counts
    offset = struct.unpack(e + "Q", head[8:16])[0] if big else struct.unpack(e + "I", head[4:8])[0]
    count_fmt, entry_size = (e + "Q", 20) if big else (e + "H", 12)
    (count,) = struct.unpack(count_fmt, _exact(read, offset, struct.calcsize(count_fmt)))
    if count > 4096:
        raise _HeaderError(f"TIFF directory with {count} entries")
    table = _exact(read, offset + struct.calcsize(count_fmt), count * entry_size)
    found: dict[int, int] = {}
    for i in range(count):
        entry = table[i * entry_size : (i + 1) * entry_size]
        tag, kind = struct.unpack(e + "HH", entry[:4])
        if tag not in (256, 257):  # ImageWidth, ImageLength
            continue
        value = entry[12:] if big else entry[8:]
        if kind == 3:  # SHORT, left-justified in the value field
            found[tag] = struct.unpack(e + "H", value[:2])[0]
        elif kind == 4:  # LONG
            found[tag] = struct.unpack(e + "I", value[:4])[0]
        elif kind == 16 and big:  # LONG8
            found[tag] = struct.unpack(e + "Q", value[:8])[0]
        else:
            raise _HeaderError(f"TIFF size tag {tag} of type {kind}")
    if 256 not in found or 257 not in found:
        raise _HeaderError("TIFF without ImageWidth/ImageLength")
    return found[256], found[257]


def _webp_size(read: _Reader) -> tuple[int, int]:
    head = _exact(read, 12, 18)
    fourcc = head[:4]
    if fourcc == b"VP8 ":  # lossy: a key frame's start code, then 14-bit sizes
        if head[11:14] != b"\x9d\x01\x2a":
            raise _HeaderError("WebP VP8 without a key frame start code")
        width, height = struct.unpack("<HH", head[14:18])
        return width & 0x3FFF, height & 0x3FFF
    if fourcc == b"VP8L":  # lossless: signature byte, then 14-bit sizes minus one
        if head[8] != 0x2F:
            raise _HeaderError("WebP VP8L without its signature")
        (bits,) = struct.unpack("<I", head[9:13])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if fourcc == b"VP8X":  # extended: 24-bit canvas sizes minus one
        w = int.from_bytes(head[12:15], "little") + 1
        h = int.from_bytes(head[15:18], "little") + 1
        return w, h
    raise _HeaderError(f"WebP chunk {fourcc!r} unknown")


def _pnm_size(read: _Reader) -> tuple[int, int]:
    text = read(0, 4096)
    if text[:2] == b"P7":  # PAM: WIDTH/HEIGHT lines up to ENDHDR
        fields: dict[bytes, int] = {}
        for line in text.split(b"\n")[1:]:
            parts = line.split()
            if parts[:1] == [b"ENDHDR"]:
                break
            if len(parts) == 2 and parts[0] in (b"WIDTH", b"HEIGHT") and parts[1].isdigit():
                fields[parts[0]] = int(parts[1])
        if b"WIDTH" not in fields or b"HEIGHT" not in fields:
            raise _HeaderError("PAM without WIDTH/HEIGHT")
        return fields[b"WIDTH"], fields[b"HEIGHT"]
    tokens: list[bytes] = []
    for line in text[2:].split(b"\n"):
        tokens += line.split(b"#", 1)[0].split()
        if len(tokens) >= 2:
            break
    if len(tokens) < 2 or not (tokens[0].isdigit() and tokens[1].isdigit()):
        raise _HeaderError("PNM header without width and height")
    return int(tokens[0]), int(tokens[1])


def _format(read: _Reader) -> tuple[str, Callable[[_Reader], tuple[int, int]]] | None:
    sig = read(0, 16)
    if sig.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG", _png_size
    if sig.startswith(b"\xff\xd8"):
        return "JPEG", _jpeg_size
    if sig.startswith(b"BM"):
        return "BMP", _bmp_size
    if sig[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
        return "TIFF", _tiff_size
    if sig[:4] == b"RIFF" and sig[8:12] == b"WEBP":
        return "WebP", _webp_size
    if len(sig) >= 3 and sig[0:1] == b"P" and sig[1:2] in b"1234567Ff" and sig[2:3] in b" \t\r\n":
        return "PNM", _pnm_size
    return None


def image_size(read: _Reader, name: str = "image") -> tuple[int, int]:
    """(width, height) of an encoded image from its header alone; ``read(offset, n)`` gives its bytes.

    Raises :class:`ImageError` when the format is not one of :data:`SIZED_FORMATS` or the header
    is truncated or inconsistent (such a file would not decode either).
    """
    fmt = _format(read)
    if fmt is None:
        raise ImageError(f"{name}: not a decodable image (not {SIZED_FORMATS})")
    kind, parse = fmt
    try:
        width, height = parse(read)
    except (_HeaderError, struct.error) as exc:
        raise ImageError(f"{name}: not a decodable image ({kind}: {exc})") from None
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: not a decodable image ({kind} header says {width}x{height})")
    return width, height


def check_pixels(width: int, height: int, name: str = "image", max_pixels: int | None = None) -> None:
    """Refuse an image of more than ``max_pixels`` (default: the configured limit) before decoding it."""
    limit = max_pixels if max_pixels is not None else _max_image_pixels
    if width * height > limit:
        raise ImageError(
            f"{name}: image is {width}x{height} = {width * height / 1e6:.1f} Mpx, over the limit of "
            f"{limit / 1e6:g} Mpx (limits.max_image_pixels); not decoded"
        )


def decode_image(data: bytes, name: str = "image", max_pixels: int | None = None) -> np.ndarray:
    """Decode encoded image bytes as OpenCV does (BGR or gray), after the header's pixel-count check."""
    if not data:
        raise ImageError(f"{name}: file is empty")
    view = memoryview(data)
    width, height = image_size(lambda offset, n: bytes(view[offset : offset + n]), name)
    check_pixels(width, height, name, max_pixels)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise ImageError(f"{name}: not a decodable image (corrupt or unsupported format)")
    return image


#: The one set of image file suffixes every folder of parts is read with.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def list_images(path: str | os.PathLike[str], *, allow_empty: bool = False) -> list[Path]:
    """Image files of a folder in name order (hidden and temporary files skipped), or ``[path]``
    for a single file; :class:`ImageError` naming the path when it is missing or holds no images
    (unless ``allow_empty``: a watched folder may be empty for a while)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ImageError(f"{path}: no such file or folder")
    files = sorted(
        p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )
    if not files and not allow_empty:
        raise ImageError(f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def read_image(path: str | os.PathLike[str], max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as OpenCV does (BGR or gray), with a clear error if it cannot be decoded.

    The header is read first: an image over the pixel limit is refused before the rest of the
    file is even read, let alone decoded.
    """
    path = Path(path)
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below; the header reader needs it open
    except FileNotFoundError:
        raise ImageError(f"{path}: no such image file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: no such image file (a folder)") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot read: {exc.strerror or exc}") from None
    with fh:
        try:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                raise ImageError(f"{path}: file is empty")

            def read(offset: int, n: int) -> bytes:
                fh.seek(offset)
                return fh.read(n)

            width, height = image_size(read, str(path))
            check_pixels(width, height, str(path), max_pixels)
            fh.seek(0)
            data = fh.read()
        except OSError as exc:
            raise ImageError(f"{path}: cannot read: {exc.strerror or exc}") from None
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise ImageError(f"{path}: not a decodable image (corrupt or unsupported format)")
    return image


def crop_roi(image: np.ndarray, roi: tuple[int, int, int, int] | None, name: str = "image") -> np.ndarray:
    """Crop ``roi`` = (x, y, w, h); the ROI must lie inside the image."""
    if roi is None:
        return image
    x, y, w, h = roi
    H, W = image.shape[:2]
    if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > W or y + h > H:
        raise ImageError(f"{name}: ROI (x={x}, y={y}, w={w}, h={h}) does not fit inside the {W}x{H} image")
    return image[y : y + h, x : x + w]


def preprocess(image: np.ndarray, spec: Preprocess, resize: str | None = None, name: str = "image") -> Prepared:
    """Apply the manifest's preprocessing (``resize`` may override the mode, e.g. from a recipe)."""
    rgb = to_rgb(image, name)
    H, W = rgb.shape[:2]
    th, tw = spec.size
    mode = resize or spec.resize
    interp = _INTERP[spec.interpolation]
    if mode == "squash":
        out = cv2.resize(rgb, (tw, th), interpolation=interp)
        window, content = (0.0, 0.0, float(W), float(H)), (0, 0, tw, th)
    elif mode == "shorter_side_crop":
        scale = max(th / H, tw / W)
        rh, rw = max(th, round(H * scale)), max(tw, round(W * scale))
        resized = cv2.resize(rgb, (rw, rh), interpolation=interp)
        top, left = (rh - th) // 2, (rw - tw) // 2
        out = resized[top : top + th, left : left + tw]
        window = (left / scale, top / scale, (left + tw) / scale, (top + th) / scale)
        content = (0, 0, tw, th)
    elif mode == "letterbox":
        scale = min(th / H, tw / W)
        rh, rw = max(1, round(H * scale)), max(1, round(W * scale))
        resized = cv2.resize(rgb, (rw, rh), interpolation=interp)
        out = np.full((th, tw, 3), 114, np.uint8)
        top, left = (th - rh) // 2, (tw - rw) // 2
        out[top : top + rh, left : left + rw] = resized
        window = (-left / scale, -top / scale, (tw - left) / scale, (th - top) / scale)
        content = (left, top, left + rw, top + rh)
    else:
        raise ImageError(f"unknown resize mode '{mode}'")
    x: np.ndarray = out.astype(np.float32) * np.float32(spec.scale)
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return Prepared(np.ascontiguousarray(x.transpose(2, 0, 1)), (H, W), window, content)


def map_to_source(anomaly_map: np.ndarray, prepared: Prepared) -> np.ndarray:
    """Resample a (H, W) map in encoder-input pixels onto the source image (zeros outside the window)."""
    H, W = prepared.source_size
    x0, y0, x1, y1 = prepared.window
    mh, mw = anomaly_map.shape
    # Affine from source pixel centres to map pixel coordinates.
    sx, sy = mw / (x1 - x0), mh / (y1 - y0)
    m = np.array([[sx, 0, -x0 * sx + 0.5 * sx - 0.5], [0, sy, -y0 * sy + 0.5 * sy - 0.5]], np.float32)
    return cv2.warpAffine(
        anomaly_map.astype(np.float32),
        m,
        (W, H),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0.0,
    )
