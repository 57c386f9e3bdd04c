"""Layout maps of the shapes world: a scene's ground truth as a ControlNet's control image, and the position check
that compares a generated image's objects with the layout it was given (sdengine/eval_control.py).

A layout map is every object's silhouette filled white on black, drawn as `shapes.render` draws (same polygons, same
supersampling and box filter), so a silhouette covers exactly its object's pixels. Colours and the background are
left out: the map says where each object is and what outline it has, and the prompt says the rest.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .checker import Detected
from .shapes import Scene, polygon_in_box, shape_dims

# How far (px at 64x64, scaled with the image) a generated object's centre may be from its silhouette's to count as
# where the control put it: a fifth of the smallest object's extent (10 px) is 2; twice that leaves room for the
# checker's fitted box (sub-pixel on renders) and the VAE's softened edges, and is still well under the 14 px
# between a small object's centre and its own edge's neighbour.
POSITION_TOLERANCE = 4.0


def render_layout(scene: Scene, supersample: int = 4) -> np.ndarray:
    """The scene's layout map: (res, res, 3) uint8, silhouettes white (255) on black (0), anti-aliased edges grey."""
    s, res = supersample, scene.resolution
    img = Image.new("L", (res * s, res * s), 0)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        w, h = shape_dims(o.shape, o.extent)
        draw.polygon(polygon_in_box(o.shape, (o.cx - w / 2) * s, (o.cy - h / 2) * s, w * s, h * s), fill=255)
    grey = np.asarray(img.resize((res, res), Image.BOX))
    return np.repeat(grey[:, :, None], 3, axis=2)


@dataclass(frozen=True)
class Placement:
    """How a generated image's objects sit against its layout: `landed` of the layout's `objects` have a detected
    object of their shape (and of their colour, where the prompt names it) within the tolerance of their centre,
    each detected object used once; `errors` is each layout object's distance (px) to the nearest detected object of
    its kind (inf when there is none)."""
    objects: int
    landed: int
    errors: tuple[float, ...]

    @property
    def all_landed(self) -> bool:
        return self.landed == self.objects


def placement(scene: Scene, detected: list[Detected], tolerance: float = POSITION_TOLERANCE) -> Placement:
    """Match the layout's objects (scene.objects) to the checker's detections, nearest pairs first."""
    tol = tolerance * scene.resolution / 64
    stated = [g.color for g in scene.spec.groups]  # the colour a prompt names per group (None: any)

    def kind_of(o) -> list[int]:
        want = stated[o.group] if o.group < len(stated) else None
        return [j for j, d in enumerate(detected) if d.shape == o.shape and (want is None or d.color == want)]

    pairs, errors = [], []
    for i, o in enumerate(scene.objects):
        dists = [(float(np.hypot(detected[j].cx - o.cx, detected[j].cy - o.cy)), i, j) for j in kind_of(o)]
        errors.append(min((d for d, _, _ in dists), default=float("inf")))
        pairs += [p for p in dists if p[0] <= tol]
    used_layout, used_detected = set(), set()
    for _, i, j in sorted(pairs):
        if i not in used_layout and j not in used_detected:
            used_layout.add(i)
            used_detected.add(j)
    return Placement(len(scene.objects), len(used_layout), tuple(errors))
