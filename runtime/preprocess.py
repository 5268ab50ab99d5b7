"""Camera image → encoder ``pixel_values``, with numpy and OpenCV only (no torch on the device).

The geometry of every step is kept in :class:`Prepared` so an anomaly map (in encoder-input
pixels) can be mapped back onto the original camera image for overlays and region boxes.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from anomalygpt_edge.engines.manifest import Preprocess

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


def read_image(path) -> np.ndarray:
    """Read an image file as OpenCV does (BGR or gray), with a clear error if it cannot be decoded."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such image file")
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        raise ImageError(f"{path}: file is empty")
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
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
    x = out.astype(np.float32) * np.float32(spec.scale)
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
