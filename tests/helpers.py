"""Synthetic, learnable photo folders for tests: each class has its own colour and shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PALETTE = [(220, 40, 40), (40, 180, 60), (50, 80, 220), (230, 200, 40), (160, 60, 200), (40, 200, 200)]


def synthetic_image(class_index: int, rng: np.random.Generator, size: int = 48) -> Image.Image:
    base = np.array(PALETTE[class_index % len(PALETTE)], dtype=np.float32)
    arr = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    margin = max(1, size // 8)
    a, b = sorted(rng.integers(margin, size - margin - 4, 2))
    if class_index % 2:
        draw.ellipse((a, a, b + 4, b + 4), fill=(255, 255, 255))
    else:
        draw.rectangle((a, a, b + 4, b + 4), fill=(0, 0, 0))
    return img


def make_dataset(root: Path, classes: int = 3, per_class: int = 20, size: int = 48, seed: int = 0,
                 fmt: str = "JPEG") -> Path:
    """root/class_k/img_i.jpg for k < classes; returns root."""
    rng = np.random.default_rng(seed)
    for k in range(classes):
        folder = root / f"class_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            ext = {"JPEG": "jpg", "PNG": "png"}[fmt]
            synthetic_image(k, rng, size).save(folder / f"img_{i:03d}.{ext}", fmt)
    return root
