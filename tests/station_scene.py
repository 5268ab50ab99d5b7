"""A tiny synthetic line for the station tests: parts on a belt, written as video files.

Each frame shows one part (a plate with a ring of holes) in the middle of a 320x240 image, with
small pose, lighting and noise jitter. Defective parts have a dark scratch or a missing hole.
The truth of frame ``i`` of a video is known from its index (:func:`is_defective`), so a test
can check every verdict a station makes on it.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

W, H = 320, 240
#: Where the part is: the ROI a technician should draw (x, y, w, h).
PART_ROI = (80, 40, 160, 160)
FPS = 10.0
BLOCK = 5  # the mixed video alternates blocks of this many good / defective frames


def part(seed: int, defect: str | None = None) -> np.ndarray:
    """One BGR frame; ``defect`` is None, ``"scratch"`` or ``"missing_hole"``."""
    rng = np.random.default_rng(seed)
    img = np.full((H, W, 3), 70, np.uint8)
    cx, cy = 160, 120  # the part sits in a fixture: lighting and sensor noise vary, not the pose
    cv2.circle(img, (cx, cy), 60, (180, 180, 190), -1, cv2.LINE_AA)
    cv2.circle(img, (cx, cy), 18, (70, 70, 70), -1, cv2.LINE_AA)
    for k, a in enumerate(range(0, 360, 45)):
        if defect == "missing_hole" and k == int(seed) % 8:
            continue
        t = np.deg2rad(a)
        cv2.circle(img, (int(cx + 40 * np.cos(t)), int(cy + 40 * np.sin(t))), 6, (90, 90, 100), -1, cv2.LINE_AA)
    if defect == "scratch":
        x0, y0 = cx - 45 + int(rng.integers(0, 10)), cy - 30
        cv2.line(img, (x0, y0), (x0 + 50, y0 + 65), (20, 20, 20), 3, cv2.LINE_AA)
    gain = rng.uniform(GAIN[0], GAIN[1])
    noisy = (img.astype(np.float32) + TEXTURE_AMP * _texture()) * gain + rng.normal(0, NOISE, img.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


_TEXTURE: np.ndarray | None = None
TEXTURE_AMP = 6.0
NOISE = 2.0
GAIN = (0.99, 1.01)


def _texture() -> np.ndarray:
    """A fixed surface texture (the belt and the machined plate look the same on every part)."""
    global _TEXTURE
    if _TEXTURE is None:
        rng = np.random.default_rng(12345)
        base = rng.normal(0, 1, (H // 4 + 1, W // 4 + 1)).astype(np.float32)
        tex = cv2.resize(base, (W, H), interpolation=cv2.INTER_CUBIC)[:H, :W]
        _TEXTURE = np.repeat(tex[:, :, None], 3, axis=2)
    return _TEXTURE


def is_defective(index: int, mixed: bool) -> bool:
    """Truth of frame ``index`` of a video written by :func:`write_video`."""
    return mixed and (index // BLOCK) % 2 == 1


def read_video(path: Path) -> list[np.ndarray]:
    """Every frame of a video file, decoded as a camera source would decode it."""
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames


def write_video(path: Path, frames: int, mixed: bool, seed0: int = 0) -> Path:
    """An MJPG AVI of ``frames`` parts (all good, or good/defective blocks when ``mixed``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (W, H))
    assert writer.isOpened(), f"cannot write {path}"
    for i in range(frames):
        defect = ("scratch" if (i // BLOCK) % 4 == 1 else "missing_hole") if is_defective(i, mixed) else None
        writer.write(part(seed0 + i, defect))
    writer.release()
    return path
