"""Pictures of a run without a plotting library: the loss curve and image grids, drawn with PIL."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def write_loss_curve(log_path: Path, out: Path, size: tuple[int, int] = (640, 360)) -> None:
    """Loss against step from a JSONL log, log-scaled, with its smoothed trend."""
    if not log_path.exists():
        return
    points = []
    for line in log_path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if isinstance(r.get("loss"), (int, float)) and r["loss"] > 0 and math.isfinite(r["loss"]):
            points.append((r["step"], math.log10(r["loss"])))
    if len(points) < 2:
        return
    w, h = size
    pad = 40
    steps, values = zip(*points)
    s0, s1 = min(steps), max(steps)
    v0, v1 = min(values), max(values)
    v1 = v1 if v1 > v0 else v0 + 1e-6

    def xy(step: float, value: float) -> tuple[float, float]:
        return (pad + (step - s0) / max(1, s1 - s0) * (w - 2 * pad),
                h - pad - (value - v0) / (v1 - v0) * (h - 2 * pad))

    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([pad, pad, w - pad, h - pad], outline=(180, 180, 180))
    draw.line([xy(s, v) for s, v in points], fill=(160, 190, 230), width=1)
    k = max(1, len(values) // 30)
    smooth = np.convolve(values, np.ones(k) / k, mode="valid")
    draw.line([xy(steps[i + k // 2], v) for i, v in enumerate(smooth)], fill=(20, 60, 160), width=2)
    draw.text((pad, 8), f"log10 loss: {10 ** v1:.3g} .. {10 ** v0:.3g}   steps {s0}..{s1}", fill="black")
    img.save(out)


def image_grid(images: list[Image.Image], columns: int, labels: list[str] | None = None) -> Image.Image:
    """Images in a grid, each with an optional label under it."""
    w, h = images[0].size
    label_h = 12 if labels else 0
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * w, rows * (h + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        x, y = (i % columns) * w, (i // columns) * (h + label_h)
        grid.paste(img.convert("RGB"), (x, y))
        if labels:
            draw.text((x + 1, y + h), labels[i][: w // 6], fill="black")
    return grid
