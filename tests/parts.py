"""Synthetic golden and defective parts for tests: no dataset needed, deterministic per seed.

A part is a textured grey plate with a bright disc (a feature every good part has); defects are a
dark scratch, a missing disc, or a dark blob. Small pose and lighting jitter keeps golden parts
from being identical, as on a real line.
"""

from __future__ import annotations

import cv2
import numpy as np

SIZE = (240, 320)  # H, W: non-square on purpose


def good_part(seed: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    """A defect-free part, BGR uint8."""
    rng = np.random.default_rng(seed)
    h, w = size
    base = rng.normal(0, 1, (h // 8 + 1, w // 8 + 1)).astype(np.float32)
    texture = cv2.resize(base, (w, h), interpolation=cv2.INTER_CUBIC)[:h, :w]
    grain = rng.normal(0, 3, (h, w)).astype(np.float32)
    image = 110 + rng.uniform(-6, 6) + 6 * texture + grain
    cx, cy = w // 2 + int(rng.integers(-4, 5)), h // 2 + int(rng.integers(-4, 5))
    cv2.circle(image, (cx, cy), min(h, w) // 6, 190.0, -1, cv2.LINE_AA)
    cv2.rectangle(image, (10, 10), (w - 11, h - 11), 70.0, 2)
    return cv2.cvtColor(np.clip(image, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)


def scratched_part(seed: int, where: str = "top left", size: tuple[int, int] = SIZE) -> np.ndarray:
    """A good part with a dark scratch centred in the named third of the image ("top left", ...)."""
    image = good_part(seed, size)
    h, w = size
    rows = {"top": 1 / 6, "center": 1 / 2, "bottom": 5 / 6}
    cols = {"left": 1 / 6, "center": 1 / 2, "right": 5 / 6}
    parts = where.split()
    row = rows.get(parts[0], 1 / 2)
    col = cols.get(parts[-1], 1 / 2)
    cy, cx = int(row * h), int(col * w)
    cv2.line(image, (cx - 22, cy - 10), (cx + 22, cy + 10), (25, 25, 25), 4, cv2.LINE_AA)
    cv2.circle(image, (cx + 5, cy - 5), 6, (20, 20, 20), -1)
    return image


def missing_feature_part(seed: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    """A part whose bright disc is missing."""
    image = good_part(seed, size).astype(np.float32)
    h, w = size
    cv2.circle(image, (w // 2, h // 2), min(h, w) // 6 + 3, (110, 110, 110), -1)
    return np.clip(image, 0, 255).astype(np.uint8)


def write(path, image: np.ndarray) -> None:
    """Write an image file (PNG/JPEG by extension), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image), path


def defect_mask(defective: np.ndarray, seed: int) -> np.ndarray:
    """Ground-truth mask (0/255) of a defect: where the part differs from its good twin of the same seed."""
    diff = np.abs(defective.astype(np.int16) - good_part(seed, defective.shape[:2]).astype(np.int16)).max(axis=2)
    return np.where(diff > 12, 255, 0).astype(np.uint8)


def mvtec_folder(root, n_train: int = 8, n_good: int = 4, n_bad: int = 4) -> None:
    """A small MVTec-layout dataset: train/good, test/good, test/scratch with ground_truth masks."""
    for i in range(n_train):
        write(root / "train" / "good" / f"{i:03d}.png", good_part(i))
    for i in range(n_good):
        write(root / "test" / "good" / f"{i:03d}.png", good_part(500 + i))
    spots = ["top left", "top right", "bottom left", "bottom right", "center"]
    for i in range(n_bad):
        image = scratched_part(600 + i, spots[i % len(spots)])
        write(root / "test" / "scratch" / f"{i:03d}.png", image)
        write(root / "ground_truth" / "scratch" / f"{i:03d}_mask.png", defect_mask(image, 600 + i))
