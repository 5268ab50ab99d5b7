"""A synthetic production line for the demo, the benchmark and the tests: rendered with OpenCV only.

Machined brackets (a plate with four holes and a slot) ride a belt under the camera; each part is
seen for a few frames, like a camera on an indexing conveyor. Some parts carry defects: a
scratch, a missing hole or a stain. The line is written as a real video file (MJPG in AVI, which
every OpenCV build with FFmpeg reads and writes) and read back through the video-file camera.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

WIDTH, HEIGHT = 320, 240
#: Where the part sits (x, y, w, h): the recipes' ROI.
PART_ROI = (60, 40, 200, 160)
DEFECTS = ("scratch", "missing_hole", "stain")


@dataclass(frozen=True)
class Part:
    """One part on the line: its number, defect (None for a good part) and its frames in the video."""

    number: int
    defect: str | None
    first_frame: int
    frames: int


def render_part(rng: np.random.Generator, defect: str | None = None) -> np.ndarray:
    """One camera frame (BGR, 320x240) with a bracket on the belt, slightly shifted and lit differently."""
    belt = _belt(rng)
    dx, dy = (int(v) for v in rng.integers(-1, 2, 2))
    x0, y0 = 90 + dx, 70 + dy
    img = belt.copy()
    # Plate with a soft shadow, brushed-metal shading.
    cv2.rectangle(img, (x0 + 4, y0 + 4), (x0 + 144, y0 + 104), (25, 25, 25), -1)
    plate = np.full((100, 140, 3), 178, np.uint8)
    plate += (np.linspace(0, 20, 140)[None, :, None]).astype(np.uint8)
    img[y0 : y0 + 100, x0 : x0 + 140] = plate
    cv2.rectangle(img, (x0, y0), (x0 + 139, y0 + 99), (120, 120, 120), 1)
    holes = [(x0 + 22, y0 + 22), (x0 + 117, y0 + 22), (x0 + 22, y0 + 77), (x0 + 117, y0 + 77)]
    missing = int(rng.integers(0, 4)) if defect == "missing_hole" else -1
    for i, (hx, hy) in enumerate(holes):
        if i != missing:
            cv2.circle(img, (hx, hy), 10, (40, 40, 40), -1, cv2.LINE_AA)
            cv2.circle(img, (hx, hy), 10, (90, 90, 90), 1, cv2.LINE_AA)
    cv2.rectangle(img, (x0 + 50, y0 + 42), (x0 + 90, y0 + 58), (45, 45, 45), -1)
    if defect == "scratch":
        sx, sy = x0 + int(rng.integers(30, 70)), y0 + int(rng.integers(10, 30))
        cv2.line(img, (sx, sy), (sx + 45, sy + 55), (245, 245, 245), 2, cv2.LINE_AA)
        cv2.line(img, (sx + 1, sy + 3), (sx + 40, sy + 52), (70, 70, 70), 1, cv2.LINE_AA)
    elif defect == "stain":
        cx, cy = x0 + int(rng.integers(35, 105)), y0 + int(rng.integers(65, 90))
        cv2.ellipse(img, (cx, cy), (14, 9), float(rng.integers(0, 180)), 0, 360, (60, 95, 120), -1, cv2.LINE_AA)
    gain = rng.uniform(0.98, 1.02)
    noisy = img.astype(np.float32) * gain + rng.normal(0, 2.0, img.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _belt(rng: np.random.Generator) -> np.ndarray:
    """A dark belt with a faint weave; its phase moves from part to part."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    phase = float(rng.uniform(0, 2 * np.pi))
    weave = 55 + 3 * np.sin(x / 3.0 + phase) * np.sin(y / 5.0)
    return cv2.cvtColor(weave.astype(np.uint8), cv2.COLOR_GRAY2BGR)


def golden_images(n: int, seed: int = 1) -> list[tuple[str, np.ndarray]]:
    """``n`` good parts for enrollment (a different random stream from the line's)."""
    rng = np.random.default_rng(seed)
    return [(f"golden-{i:02d}.png", render_part(rng)) for i in range(n)]


def line_schedule(n_parts: int, frames_per_part: int, defect_every: int = 3, seed: int = 7) -> list[Part]:
    """Which parts are defective: every ``defect_every``-th, cycling through :data:`DEFECTS`."""
    parts = []
    for i in range(n_parts):
        defect = (
            DEFECTS[(i // defect_every) % len(DEFECTS)]
            if defect_every and i % defect_every == defect_every - 1
            else None
        )
        parts.append(Part(i + 1, defect, i * frames_per_part, frames_per_part))
    return parts


def write_line_video(
    path: Path | str,
    n_parts: int = 20,
    frames_per_part: int = 5,
    fps: float = 10.0,
    defect_every: int = 3,
    seed: int = 7,
) -> list[Part]:
    """Render the line into a video file; returns the parts in order (frame ranges and defects)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, (WIDTH, HEIGHT))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path} (MJPG/AVI): is this OpenCV built with FFmpeg?")
    rng = np.random.default_rng(seed)
    parts = line_schedule(n_parts, frames_per_part, defect_every, seed)
    try:
        for part in parts:
            for _ in range(frames_per_part):
                writer.write(render_part(rng, part.defect))
    finally:
        writer.release()
    return parts


def write_golden_video(path: Path | str, n: int = 24, seed: int = 1) -> None:
    """``n`` good parts, one frame each, through the same video codec as the line (what the camera sees)."""
    write_line_video(path, n_parts=n, frames_per_part=1, defect_every=0, seed=seed)


def read_video_frames(path: Path | str) -> list[np.ndarray]:
    """Every frame of a (short) video file, in order."""
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    frames = []
    try:
        while True:
            ok, image = cap.read()
            if not ok:
                break
            frames.append(image)
    finally:
        cap.release()
    return frames
