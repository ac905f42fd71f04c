"""Deterministic test images for the synthetic checkpoints' tests and benchmarks: colourful RGB
PNGs (gradients plus a few filled shapes), the same for the same seed."""

from __future__ import annotations

import pathlib
import random


def write_image(path, w: int, h: int, seed: int = 0) -> pathlib.Path:
    """Write a deterministic colourful RGB PNG (gradients plus a few filled shapes)."""
    import numpy as np
    from PIL import Image, ImageDraw

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    ys = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
    xs = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :]
    phase = [rng.random() * 6.283 for _ in range(3)]
    freq = [1.0 + 3.0 * rng.random() for _ in range(3)]
    r = 0.5 + 0.5 * np.sin(freq[0] * 3.14159 * xs + phase[0]) * np.ones_like(ys)
    g = 0.5 + 0.5 * np.cos(freq[1] * 3.14159 * ys + phase[1]) * np.ones_like(xs)
    b = 0.5 + 0.5 * np.sin(freq[2] * 3.14159 * (xs + ys) + phase[2])
    arr = (np.stack([r, g, b], axis=-1) * 255.0).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(arr).convert("RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, x1 = sorted(rng.randint(0, max(w - 1, 1)) for _ in range(2))
        y0, y1 = sorted(rng.randint(0, max(h - 1, 1)) for _ in range(2))
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        if rng.random() < 0.5:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        else:
            draw.ellipse([x0, y0, x1, y1], fill=colour, outline=(0, 0, 0))
    img.save(path, format="PNG")
    return path
