"""The exact judge of the shapes world: does an image show what its prompt says?

check(image, prompt) parses the prompt with the world's grammar (shapes.parse_prompt), then reads the image
analytically: background = the commonest palette colour on the border; each pixel -> nearest palette colour
(or none if far from all); connected same-colour regions that hold at least one solid 3x3 block are objects
(this drops the 1-px rings that anti-aliasing leaves, e.g. orange-looking pixels between red and yellow);
each object's shape is the template that best overlaps its mask inside its own bounding box, gated by aspect
ratio; size class from the bounding box; relations from bounding-box centres, dominant axis.

The palette is COLORS, plus a colour of NOVEL_COLORS (pink) only when the prompt names it, and the shapes tried are
SHAPES, plus one of NOVEL_SHAPES (heart) only when the prompt names it: the judgment of every prompt of the old world
stays exactly what it was, and a pink object is no object at all to it (pink is > 60 from every old colour, so its
pixels belong to none), a heart an object of no known shape.

numpy + PIL only (no scipy, no torch), so evaluation runs wherever the engine runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

import numpy as np
from PIL import Image, ImageDraw

from .shapes import (
    ASPECT,
    COLORS,
    NOVEL_COLORS,
    NOVEL_SHAPES,
    SHAPES,
    SIZE_SPLIT,
    WORLD_COLORS,
    SceneSpec,
    parse_prompt,
    polygon_in_box,
    relation_holds,
)

_NAMES = list(COLORS)
COLOR_TOLERANCE = 60.0   # RGB distance; half the closest palette pair (~106) would be the hard limit
MIN_AREA = 16            # px at 64x64: smaller specks are noise, not objects (smallest object is ~45 px)
MIN_SCORE = 0.6          # template IoU below this: the region is no shape of the world
ASPECT_TOLERANCE = 1.35  # measured / canonical aspect ratio allowed either way (a 2:1 box is no square)


@dataclass(frozen=True)
class Detected:
    color: str
    shape: str                              # "unknown" if no template fits
    size: str                               # "small" | "big"
    cx: float                               # bounding-box centre, px, y downwards
    cy: float
    bbox: tuple[int, int, int, int]         # x0, y0, x1, y1 (exclusive)
    area: int
    score: float                            # IoU with the chosen template


@dataclass
class Details:
    spec: SceneSpec
    background: str
    objects: list[Detected]
    failures: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        objs = ", ".join(f"{o.size} {o.color} {o.shape}@({o.cx:.0f},{o.cy:.0f})" for o in self.objects)
        return f"background {self.background}; objects [{objs}]; " + ("; ".join(self.failures) or "ok")


def to_array(image: object) -> np.ndarray:
    """(H, W, 3) float32 in 0..255 from a PIL image, a uint8 array, or a float array in [0, 1]."""
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) image, got shape {a.shape}")
    a = a[..., :3].astype(np.float32)
    if a.max() <= 1.0 and np.issubdtype(np.asarray(image).dtype, np.floating):
        a = a * 255.0
    return a


def label(classes: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of equal non-negative class values (-1 = unlabelled). Plain BFS: a 64x64
    image is a few thousand pixels, and this keeps scipy out of the engine."""
    h, w = classes.shape
    cls = classes.ravel().tolist()
    lab = [0] * (h * w)
    n = 0
    for start in np.flatnonzero(classes.ravel() >= 0).tolist():
        if lab[start]:
            continue
        n += 1
        c = cls[start]
        lab[start] = n
        stack = [start]
        while stack:
            p = stack.pop()
            y, x = divmod(p, w)
            for yy in (y - 1, y, y + 1):
                if 0 <= yy < h:
                    for xx in (x - 1, x, x + 1):
                        if 0 <= xx < w:
                            q = yy * w + xx
                            if not lab[q] and cls[q] == c:
                                lab[q] = n
                                stack.append(q)
    return np.array(lab, np.int32).reshape(h, w), n


def _coverage(shape: str, x0: float, y0: float, w: float, h: float, size: tuple[int, int],
              s: int = 8) -> np.ndarray:
    """Fraction of each pixel of a (rows, cols) canvas covered by the shape in box (x0, y0, w, h), drawn
    like the renderer: supersampled polygon, box-filtered down."""
    rows, cols = size
    img = Image.new("L", (cols * s, rows * s), 0)
    ImageDraw.Draw(img).polygon(polygon_in_box(shape, x0 * s, y0 * s, w * s, h * s), fill=255)
    return np.asarray(img.resize((cols, rows), Image.BOX), np.float32) / 255.0


@cache
def _unit_moments(shape: str) -> tuple[float, float, float, float]:
    """(centroid u, centroid v, variance u, variance v) of the shape filling the unit box."""
    n = 512
    a = _coverage(shape, 0, 0, n, n, (n, n), s=1)
    v, u = (np.mgrid[0:n, 0:n] + 0.5) / n
    m = a.sum()
    cu, cv = (a * u).sum() / m, (a * v).sum() / m
    return cu, cv, (a * (u - cu) ** 2).sum() / m, (a * (v - cv) ** 2).sum() / m


def classify_shape(alpha: np.ndarray, shapes: tuple[str, ...] = SHAPES
                   ) -> tuple[str, float, tuple[float, float, float, float]]:
    """Fit every shape to a soft coverage map by moments, keep the best overlap.

    For each hypothesis the centroid and second moments of `alpha` give the box (x0, y0, w, h) that shape
    would need (moments are exact under anti-aliasing, unlike a thresholded mask whose thin tips vanish
    at 10 px); the shape is redrawn there and scored by soft IoU. Hypotheses whose fitted box has the
    wrong aspect ratio (a 2:1 box is no square) are skipped. Returns (shape or "unknown", score, box).
    shapes: the hypotheses, in order (a tie keeps the first)."""
    rows, cols = alpha.shape
    y, x = np.mgrid[0:rows, 0:cols] + 0.5
    m = float(alpha.sum())
    cx, cy = float((alpha * x).sum()) / m, float((alpha * y).sum()) / m
    # + 1/12: pixel integration hides each pixel's own spread around its centre.
    vx = float((alpha * (x - cx) ** 2).sum()) / m + 1 / 12
    vy = float((alpha * (y - cy) ** 2).sum()) / m + 1 / 12
    best, best_score, best_box = "unknown", 0.0, (cx, cy, 0.0, 0.0)
    for shape in shapes:
        cu, cv, vu, vv = _unit_moments(shape)
        w, h = (vx / vu) ** 0.5, (vy / vv) ** 0.5
        if not 1 / ASPECT_TOLERANCE <= (w / h) / ASPECT[shape] <= ASPECT_TOLERANCE:
            continue
        x0, y0 = cx - cu * w, cy - cv * h
        t = _coverage(shape, x0, y0, w, h, (rows, cols))
        score = float(np.minimum(t, alpha).sum() / max(1e-6, np.maximum(t, alpha).sum()))
        if score > best_score:
            best, best_score, best_box = shape, score, (x0, y0, w, h)
    return (best if best_score >= MIN_SCORE else "unknown"), best_score, best_box


@cache
def _palette(novel: tuple[str, ...]) -> tuple[list[str], np.ndarray]:
    """(names, RGB rows): COLORS in their order, then the novel colours asked for. Appended, never interleaved, so
    an old colour keeps its index and ties (argmin/argmax take the first) fall as they did without them."""
    names = _NAMES + [c for c in novel if c not in COLORS]
    return names, np.array([WORLD_COLORS[c] for c in names], np.float32)


def novel_colors(spec: SceneSpec) -> tuple[str, ...]:
    """The NOVEL_COLORS a spec names (as an object's colour or the background), in NOVEL_COLORS' order."""
    named = {spec.background, *(g.color for g in spec.groups)}
    return tuple(c for c in NOVEL_COLORS if c in named)


def novel_shapes(spec: SceneSpec) -> tuple[str, ...]:
    """The NOVEL_SHAPES a spec names, in NOVEL_SHAPES' order."""
    return tuple(s for s in NOVEL_SHAPES if s in {g.shape for g in spec.groups})


def detect(image: object, novel: tuple[str, ...] = ()) -> tuple[str, list[Detected]]:
    """(background colour, objects) read from an image of the shapes world; `novel`: NOVEL_COLORS and NOVEL_SHAPES
    to tell apart too (without them, a novel colour's pixels are no colour, a novel shape is "unknown")."""
    unknown = [c for c in novel if c not in NOVEL_COLORS and c not in NOVEL_SHAPES]
    if unknown:
        raise ValueError(f"not novel concepts: {', '.join(unknown)} (novel colours: {', '.join(NOVEL_COLORS)}; "
                         f"novel shapes: {', '.join(NOVEL_SHAPES)})")
    names, palette = _palette(tuple(c for c in novel if c in NOVEL_COLORS))
    shapes = SHAPES + tuple(s for s in novel if s in NOVEL_SHAPES)   # appended: old ties fall as before
    img = to_array(image)
    h, w, _ = img.shape
    k = min(h, w) / 64
    dist = np.linalg.norm(img[:, :, None, :] - palette[None, None], axis=-1)
    nearest = dist.argmin(-1)
    border = np.concatenate([nearest[0], nearest[-1], nearest[:, 0], nearest[:, -1]])
    bg = int(np.bincount(border, minlength=len(names)).argmax())
    classes = np.where((dist.min(-1) < COLOR_TOLERANCE) & (nearest != bg), nearest, -1)
    # A pixel is solid if its whole 3x3 neighbourhood has its class; anti-aliasing rings never are.
    pad = np.pad(classes, 1, constant_values=-2)
    solid = classes >= 0
    for dy in range(3):
        for dx in range(3):
            solid &= pad[dy:dy + h, dx:dx + w] == classes
    labels, n = label(classes)
    objects = []
    for i in range(1, n + 1):
        m = labels == i
        area = int(m.sum())
        if area < MIN_AREA * k * k or not solid[m].any():
            continue
        ys, xs = np.nonzero(m)
        c = int(classes[ys[0], xs[0]])
        # Soft coverage of this object's colour over the background, in its mask grown by 2 px (the
        # partly covered edge pixels, whatever nearest colour they happen to have).
        x0, x1 = max(0, int(xs.min()) - 2), min(w, int(xs.max()) + 3)
        y0, y1 = max(0, int(ys.min()) - 2), min(h, int(ys.max()) + 3)
        near = m[y0:y1, x0:x1]
        grown = np.zeros_like(near)
        pad_m = np.pad(near, 2)
        for dy in range(5):
            for dx in range(5):
                grown |= pad_m[dy:dy + near.shape[0], dx:dx + near.shape[1]]
        f, b = palette[c], palette[bg]
        alpha = ((img[y0:y1, x0:x1] - b) @ (f - b)) / float((f - b) @ (f - b))
        alpha = np.where(grown, np.clip(alpha, 0.0, 1.0), 0.0)
        shape, score, (bx, by, bw, bh) = classify_shape(alpha, shapes)
        if shape == "unknown":   # no fitted box to trust: the mask's own
            bx, by, bw, bh = xs.min() - x0, ys.min() - y0, np.ptp(xs) + 1, np.ptp(ys) + 1
        size = "small" if max(bw, bh) < SIZE_SPLIT * k else "big"
        objects.append(Detected(names[c], shape, size, x0 + bx + bw / 2, y0 + by + bh / 2,
                                (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
                                area, score))
    return names[bg], objects


def check(image: object, prompt: str | SceneSpec, *, strict: bool = True) -> tuple[bool, Details]:
    """Whether `image` shows `prompt` (a caption or a SceneSpec), and why not. Raises PromptError for a
    prompt outside the grammar. strict: any object the prompt did not ask for (or of no known shape) fails."""
    spec = (parse_prompt(prompt) if isinstance(prompt, str) else prompt).validate()
    background, objects = detect(image, novel_colors(spec) + novel_shapes(spec))
    d = Details(spec, background, objects)
    if background != spec.background:
        d.failures.append(f"background is {background}, not {spec.background}")
    members: list[list[Detected]] = []
    for g in spec.groups:
        found = [o for o in objects if o.shape == g.shape and (g.color is None or o.color == g.color)]
        members.append(found)
        what = " ".join(x for x in (g.color, g.shape) if x)
        if len(found) != g.count:
            d.failures.append(f"{len(found)} x {what}, expected {g.count}")
        if g.size is not None and any(o.size != g.size for o in found):
            d.failures.append(f"{what}: sizes {[o.size for o in found]}, expected {g.size}")
    if strict:
        claimed = {id(o) for found in members for o in found}
        extra = [o for o in objects if id(o) not in claimed]
        if extra:
            d.failures.append("unexpected objects: " + ", ".join(f"{o.color} {o.shape}" for o in extra))
    if spec.relation is not None and all(members):
        for a in members[0]:
            for b in members[1]:
                if not bool(relation_holds(spec.relation, (a.cx, a.cy), (b.cx, b.cy))):
                    d.failures.append(f"{a.color} {a.shape} at ({a.cx:.0f},{a.cy:.0f}) is not {spec.relation} "
                                      f"{b.color} {b.shape} at ({b.cx:.0f},{b.cy:.0f})")
    return not d.failures, d
