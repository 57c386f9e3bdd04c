"""The procedural text-image world the built-in model is trained on: coloured shapes on a plain background.

Every image is drawn from a scene whose truth is known exactly, so a generated image can be judged by
`checker.check` without a learned classifier. Captions come from a small grammar (`describe` writes it,
`parse_prompt` reads it back), so prompts a person would guess ("a red circle above a blue square",
"three yellow stars on a black background") are inside the world.

A colour and a shape the shipped model never saw (NOVEL_COLORS: pink; NOVEL_SHAPES: heart) are part of the grammar,
the renderer and the checker but never of the default stream: `SceneSampler(concept="heart")` mixes scenes featuring
one into the ordinary ones, for teaching the model a new concept (a LoRA, an embedding) and measuring it with
`shapes_eval(concept="heart")`.

Everything here is numpy + PIL and deterministic from a seed: sample i of `SceneSampler(seed)` depends only
on (seed, i), so data-parallel workers can shard the stream and a resumed run continues it exactly.
"""
from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

# Saturated and far apart in RGB (closest pair, orange-yellow, is ~106 apart) so nearest-colour segmentation
# stays exact on renders and tolerant on generated images.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 30), "green": (20, 160, 40), "blue": (20, 60, 220), "yellow": (250, 235, 10),
    "purple": (140, 40, 180), "orange": (245, 130, 0), "black": (0, 0, 0), "white": (255, 255, 255),
}
# Colours the world can draw, parse and judge but never draws by itself: the shipped model never saw them, so
# they are new concepts to teach it (issue 30: LoRA / textual inversion). They stay out of COLORS, so every stream,
# prompt list and judgment that existed before them is unchanged bit for bit; a stream shows one only when asked
# (`SceneSampler(concept=...)`), and the checker's palette holds one only when the prompt names it.
# Pink (255, 100, 200): 131 from its nearest colour (purple), 164 from white, 191 from red, 202 from orange (the
# closest old pair is ~106); and 69 from any blend of red and white, 74 from any blend of purple and white, so
# more than COLOR_TOLERANCE (60) from every anti-aliased edge between two old colours. CSS hot pink
# (255, 105, 180) is as far from the colours themselves but 52 from the red-white blends: red edges would read pink.
NOVEL_COLORS: dict[str, tuple[int, int, int]] = {"pink": (255, 100, 200)}
WORLD_COLORS: dict[str, tuple[int, int, int]] = {**COLORS, **NOVEL_COLORS}   # all the grammar and renderer know
CONCEPT_SHARE = 0.5   # a concept stream's share of scenes featuring it; the rest are the ordinary stream's
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
# A shape the world can draw, parse and judge but never draws by itself, as NOVEL_COLORS are colours: the checker
# tries its template only when the prompt names it. Unlike pink, the shipped VAE reconstructs it (its round trip
# passes the checker), so a LoRA or an embedding can be measured on it without the autoencoder capping the score.
NOVEL_SHAPES: tuple[str, ...] = ("heart",)
WORLD_SHAPES: tuple[str, ...] = SHAPES + NOVEL_SHAPES
CONCEPTS: tuple[str, ...] = tuple(NOVEL_COLORS) + NOVEL_SHAPES
PLURALS: dict[str, str] = {s: ("crosses" if s == "cross" else s + "s") for s in WORLD_SHAPES}
SIZES: tuple[str, ...] = ("small", "big")
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
RELATION_PHRASES: dict[str, str] = {"left": "to the left of", "right": "to the right of",
                                    "above": "above", "below": "below"}
INVERSE_RELATION: dict[str, str] = {"left": "right", "right": "left", "above": "below", "below": "above"}
PREFIXES: tuple[str, ...] = ("a picture of", "an image of", "a photo of")
DEFAULT_BACKGROUND = "white"
MAX_COUNT = 4
# The training rotation: one single-object scene to three relations and two each of counts and combinations.
# Single objects were learnt first (release 3: 0.85) while relations (0.35) and counts (0.47) lagged; in release
# 5, with shapes drawn well, 35 of 61 failed position prompts had the relation itself wrong.
SCENE_KINDS: tuple[str, ...] = ("single", "relation", "counting", "combination", "relation", "counting",
                                "combination", "relation")
COLOR_DROP = 0.15  # how often a training caption leaves an object's colour unsaid
# What a rotation may name: "pair" is two objects with no relation ("a red circle and a blue square");
# "combination" picks one of the last three (counts in a pair or a relation: "two red circles and a star").
ALL_SCENE_KINDS: tuple[str, ...] = ("single", "relation", "counting", "pair", "combination", "counted_pair",
                                    "counted_relation")

# Colour-shape bindings never drawn in the training stream (as image or caption): the model sees purple
# and triangles, but never a purple triangle, so evaluation can measure compositional generalization.
HELD_OUT: frozenset[tuple[str, str]] = frozenset({
    ("purple", "triangle"), ("orange", "star"), ("green", "diamond"), ("blue", "cross")})

# Sizes are the bounding box's longer side, in pixels at 64x64 (scaled with the resolution). The gap
# between the classes (14 -> 20) lets the checker split them at 17 without ambiguity.
SMALL_RANGE = (10.0, 14.0)
BIG_RANGE = (20.0, 28.0)
SIZE_SPLIT = 17.0
MARGIN = 2.0        # px from the image border, so the border ring is pure background
GAP = 4.0           # px between bounding boxes, so anti-aliased edges of neighbours never touch
DOMINANCE = 1.5     # a relation's axis distance is at least 1.5x the cross-axis distance (checker needs > 1x)


def _unit_polygons() -> dict[str, np.ndarray]:
    """Each shape as a polygon filling the unit box [0,1]^2; drawing stretches it to the shape's bbox."""
    t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    circle = np.stack([0.5 + 0.5 * np.cos(t), 0.5 + 0.5 * np.sin(t)], 1)
    ang = -np.pi / 2 + np.arange(10) * np.pi / 5         # five points, first one straight up
    rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.48)    # fat inner radius: tips survive at 10 px
    star = np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)
    star = (star - star.min(0)) / (star.max(0) - star.min(0))
    a, b = 0.31, 0.69                                    # cross arms 0.38 of the extent wide
    cross = [(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1), (a, b), (0, b), (0, a), (a, a)]
    # the classic heart curve (x = 16 sin³t, y = 13 cos t - 5 cos 2t - 2 cos 3t - cos 4t), point down
    heart = np.stack([16 * np.sin(t) ** 3,
                      -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))], 1)
    heart = (heart - heart.min(0)) / (heart.max(0) - heart.min(0))
    return {"circle": circle, "square": np.array([(0, 0), (1, 0), (1, 1), (0, 1)], float),
            "triangle": np.array([(0.5, 0), (1, 1), (0, 1)], float),
            "star": star, "diamond": np.array([(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)], float),
            "cross": np.array(cross, float), "heart": heart}


UNIT_POLYGONS = _unit_polygons()
# Width / height of each shape's bounding box: equilateral triangle, regular star, a taller-than-wide
# diamond (so it is not just a rotated square), the heart curve's own.
ASPECT: dict[str, float] = {"circle": 1.0, "square": 1.0, "triangle": 2 / np.sqrt(3), "star": 1.0515,
                            "diamond": 0.75, "cross": 1.0, "heart": 1.1066}


def shape_dims(shape: str, extent: float) -> tuple[float, float]:
    """(width, height) of a shape whose longer side is `extent`."""
    a = ASPECT[shape]
    return (extent, extent / a) if a >= 1 else (extent * a, extent)


def polygon_in_box(shape: str, x0: float, y0: float, w: float, h: float) -> list[tuple[float, float]]:
    p = UNIT_POLYGONS[shape] * (w, h) + (x0, y0)
    return [tuple(q) for q in p.tolist()]


class PromptError(ValueError):
    """A prompt outside the shapes grammar, or one that asks for something the world cannot hold."""


@dataclass(frozen=True)
class Group:
    """`count` objects of one kind; None attributes are not stated (any colour but the background's)."""
    shape: str
    color: str | None = None
    size: str | None = None
    count: int = 1


@dataclass(frozen=True)
class SceneSpec:
    """What a caption asserts: one or two groups, optionally `groups[0] <relation> groups[1]`."""
    groups: tuple[Group, ...]
    relation: str | None = None
    background: str = DEFAULT_BACKGROUND

    def normalized(self) -> SceneSpec:
        """One form per meaning: right/below become left/above by swapping; unrelated groups sorted."""
        g, rel = self.groups, self.relation
        if rel in ("right", "below"):
            g, rel = (g[1], g[0]), INVERSE_RELATION[rel]
        elif rel is None and len(g) == 2:
            g = tuple(sorted(g, key=lambda x: (x.shape, x.color or "", x.size or "", x.count)))
        return SceneSpec(tuple(g), rel, self.background)

    def validate(self) -> SceneSpec:
        """Raises PromptError unless the spec describes a scene that can be judged unambiguously."""
        if not 1 <= len(self.groups) <= 2:
            raise PromptError("a scene has one or two kinds of object")
        if self.relation is not None and len(self.groups) != 2:
            raise PromptError("a relation needs two objects")
        if self.relation is not None and self.relation not in RELATIONS:
            raise PromptError(f"unknown relation {self.relation!r}")
        if self.background not in WORLD_COLORS:
            raise PromptError(f"unknown background colour {self.background!r}")
        for g in self.groups:
            if g.shape not in WORLD_SHAPES or (g.color is not None and g.color not in WORLD_COLORS) \
                    or (g.size is not None and g.size not in SIZES) or not 1 <= g.count <= MAX_COUNT:
                raise PromptError(f"not a valid object: {g}")
            if g.color == self.background:
                raise PromptError(f"a {g.color} {g.shape} would be invisible on a {self.background} background")
        if len(self.groups) == 2:
            a, b = self.groups
            if a.shape == b.shape and (a.color is None or b.color is None or a.color == b.color):
                raise PromptError("the two objects must differ in shape, or both name different colours")
        return self

    def held_out(self, held: frozenset[tuple[str, str]] = HELD_OUT) -> bool:
        return any((g.color, g.shape) in held for g in self.groups)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str          # "small" | "big"
    extent: float      # px, longer side of the bounding box
    cx: float          # bbox centre, px (y grows downwards)
    cy: float
    group: int


@dataclass(frozen=True)
class Scene:
    spec: SceneSpec    # what the caption states
    objects: tuple[SceneObject, ...]
    background: str
    resolution: int = 64


class Sample(NamedTuple):
    image: np.ndarray  # (H, W, 3) uint8
    caption: str
    scene: Scene


# ----------------------------------------------------------------------------------------------- rendering

def render(scene: Scene, supersample: int = 4) -> np.ndarray:
    """Draw at `supersample`x and box-filter down: exact area coverage, no ringing (Lanczos overshoots
    colours), so edge pixels are true blends of the two colours."""
    s, res = supersample, scene.resolution
    img = Image.new("RGB", (res * s, res * s), WORLD_COLORS[scene.background])
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        w, h = shape_dims(o.shape, o.extent)
        draw.polygon(polygon_in_box(o.shape, (o.cx - w / 2) * s, (o.cy - h / 2) * s, w * s, h * s),
                     fill=WORLD_COLORS[o.color])
    return np.asarray(img.resize((res, res), Image.BOX))


_Point = tuple[float, float] | tuple[np.ndarray, np.ndarray]


def relation_holds(rel: str, a: _Point, b: _Point, dominance: float = 1.0) -> bool | np.ndarray:
    """a <rel> b for centres a = (x, y), b = (x, y) (floats or arrays): the axis distance has the right
    sign and exceeds dominance x the cross-axis distance."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    along, cross = {"left": (dx, dy), "right": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[rel]
    return (along > 0) & (along > dominance * np.abs(cross))


def _place(objs: list[tuple[int, str, float]], relation: str | None, res: int,
           rng: np.random.Generator, restarts: int = 30, tries: int = 64) -> list[tuple[float, float]] | None:
    """Rejection sampling, `tries` candidates per object at once: boxes inside the margin and GAP apart,
    the relation held with DOMINANCE for every (group 0, group 1) pair. None if it keeps failing (the
    caller then shrinks the objects)."""
    k = res / 64
    for _ in range(restarts):
        placed: list[tuple[int, np.ndarray, np.ndarray]] = []      # (group, centre, box)
        for gi, shape, extent in objs:
            half = np.array(shape_dims(shape, extent)) / 2
            lo, hi = MARGIN * k + half, res - MARGIN * k - half
            c = rng.uniform(lo, hi, size=(tries, 2))
            box = np.concatenate([c - half, c + half], 1)
            ok = np.ones(tries, bool)
            for pg, pc, pb in placed:
                g = GAP * k
                ok &= (box[:, 2] + g <= pb[0]) | (pb[2] + g <= box[:, 0]) | (box[:, 3] + g <= pb[1]) \
                    | (pb[3] + g <= box[:, 1])
                if relation and pg != gi:
                    ok &= relation_holds(relation, *((c.T, pc) if gi == 0 else (pc, c.T)), DOMINANCE)
            hits = np.flatnonzero(ok)
            if not hits.size:
                break
            placed.append((gi, c[hits[0]], box[hits[0]]))
        if len(placed) == len(objs):
            return [(float(c[0]), float(c[1])) for _, c, _ in placed]
    return None


def realize(spec: SceneSpec, rng: np.random.Generator, resolution: int = 64,
            exclude: frozenset[tuple[str, str]] = frozenset()) -> Scene:
    """A concrete scene for `spec`: unstated colours/sizes drawn at random (never the background's colour,
    never a binding in `exclude`), then objects placed so the caption is unambiguously true."""
    spec.validate()
    k = resolution / 64
    colors: list[str] = []
    for g in spec.groups:
        if g.color is not None:
            colors.append(g.color)
            continue
        # never a novel colour: an unstated colour is one of the world the model was trained on
        options = [c for c in COLORS if c != spec.background and (c, g.shape) not in exclude
                   and (c, g.shape) not in {(g2.color, g2.shape) for g2 in spec.groups}]
        colors.append(str(rng.choice(options)))
    sizes = [g.size or str(rng.choice(SIZES)) for g in spec.groups]
    total = sum(g.count for g in spec.groups)
    big_hi = {1: 28.0, 2: 28.0, 3: 26.0}.get(total, 24.0)   # four big ones only fit when not the biggest
    for _ in range(8):
        objs = []
        for gi, (g, size) in enumerate(zip(spec.groups, sizes)):
            lo, hi = SMALL_RANGE if size == "small" else (BIG_RANGE[0], big_hi)
            objs += [(gi, g.shape, float(rng.uniform(lo, hi)) * k) for _ in range(g.count)]
        centres = _place(objs, spec.relation, resolution, rng)
        if centres is not None:
            objects = tuple(SceneObject(sh, colors[gi], sizes[gi], e, cx, cy, gi)
                            for (gi, sh, e), (cx, cy) in zip(objs, centres))
            return Scene(spec, objects, spec.background, resolution)
        big_hi = max(BIG_RANGE[0], big_hi - 2.0)
    raise PromptError(f"cannot place {total} objects for {describe(spec)!r} at {resolution}px")


# ------------------------------------------------------------------------------------------------ captions

def _noun_phrase(g: Group, rng: np.random.Generator | None) -> str:
    words = [w for w in (g.size, g.color) if w]
    words.append(g.shape if g.count == 1 else PLURALS[g.shape])
    if g.count > 1:
        det = NUMBER_WORDS[g.count]
    elif rng is not None and rng.random() < 0.25:
        det = "one"
    else:
        det = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([det] + words)


def describe(spec: SceneSpec, rng: np.random.Generator | None = None) -> str:
    """A caption for `spec`. With rng the phrasing varies (article, 'one', order, inverted relation,
    optional 'a picture of', stated white background); without, one canonical phrasing."""
    groups, rel = spec.groups, spec.relation
    if len(groups) == 2 and rng is not None and rng.random() < 0.5:
        groups = (groups[1], groups[0])
        rel = INVERSE_RELATION[rel] if rel else None
    text = _noun_phrase(groups[0], rng)
    if len(groups) == 2:
        text += f" {RELATION_PHRASES[rel] if rel else 'and'} {_noun_phrase(groups[1], rng)}"
    if rng is not None and rng.random() < 0.25:
        text = f"{PREFIXES[int(rng.integers(len(PREFIXES)))]} {text}"
    if spec.background != DEFAULT_BACKGROUND or (rng is not None and rng.random() < 0.15):
        how = "with" if rng is not None and rng.random() < 0.2 else "on"
        art = "an" if spec.background[0] in "aeiou" else "a"
        text += f" {how} {art} {spec.background} background"
    return text


def hard_negatives(caption: str) -> list[str]:
    """Captions worded like `caption` that mean another scene: the relation turned round and the two objects'
    colours exchanged. Contrastive text pretraining with them as extra negatives (as NegCLIP does, Yuksekgonul et
    al. 2023) cannot be solved as a bag of words, so the encoder has to carry who is where and which colour goes
    with which shape. [] for captions this world does not parse."""
    return [c for c in (turn_relation(caption), exchange_colors(caption)) if c is not None]


def turn_relation(caption: str) -> str | None:
    """`caption` with its relation reversed ("left" <-> "right", "above" <-> "below"); None without one."""
    spec = _parsed(caption)
    if spec is None or spec.relation is None:
        return None
    words = r"\b(" + "|".join(INVERSE_RELATION) + r")\b"
    return _if_other(re.sub(words, lambda m: INVERSE_RELATION[m.group(1)], caption), spec)


def exchange_colors(caption: str) -> str | None:
    """`caption` with the colours of its two objects exchanged; None unless both name different colours (or the
    exchange means the same, as for two unrelated objects of one shape)."""
    spec = _parsed(caption)
    if spec is None or len(spec.groups) != 2:
        return None
    a, b = (g.color for g in spec.groups)
    if a is None or b is None or a == b:
        return None
    # both objects name a colour, so the first two colour words are theirs (a background's comes last)
    first, second = list(re.finditer(r"\b(" + "|".join(WORLD_COLORS) + r")\b", caption))[:2]
    return _if_other(caption[:first.start()] + second.group() + caption[first.end():second.start()] + first.group()
                     + caption[second.end():], spec)


def _parsed(caption: str) -> SceneSpec | None:
    try:
        return parse_prompt(caption)
    except PromptError:
        return None


def _if_other(caption: str, original: SceneSpec) -> str | None:
    """`caption` if it parses to a scene other than `original`."""
    spec = _parsed(caption)
    return caption if spec is not None and spec.normalized() != original.normalized() else None


def caption_words() -> tuple[str, ...]:
    """Every word a caption of the default stream can contain (the trainer builds its small BPE vocabulary from
    captions); the novel concepts are not among them, as the shipped model's vocabulary has no token for them."""
    words = {"a", "an", "and", "of", "on", "with", "background"}
    words |= set(COLORS) | set(SHAPES) | {PLURALS[s] for s in SHAPES} | set(SIZES) | set(NUMBER_WORDS.values())
    for phrase in list(RELATION_PHRASES.values()) + list(PREFIXES):
        words |= set(phrase.split())
    return tuple(sorted(words))


VOCABULARY_WORDS: tuple[str, ...] = caption_words()
_SINGULAR = {p: s for s, p in PLURALS.items()}
_NUMBERS = {w: n for n, w in NUMBER_WORDS.items()} | {str(n): n for n in NUMBER_WORDS}


class _Tokens:
    def __init__(self, prompt: str) -> None:
        self.prompt = prompt
        self.words = re.findall(r"[a-z0-9]+", prompt.lower())
        self.i = 0

    def peek(self, k: int = 0) -> str | None:
        return self.words[self.i + k] if self.i + k < len(self.words) else None

    def take(self, *options: str) -> str:
        w = self.peek()
        if w is None or (options and w not in options):
            self.fail(f"expected {' or '.join(repr(o) for o in options) or 'a word'}")
        self.i += 1
        return w  # type: ignore[return-value]

    def fail(self, why: str) -> None:
        got = self.peek()
        where = f"at word {self.i + 1} ({got!r})" if got is not None else "at the end"
        raise PromptError(f"{why} {where} in {self.prompt!r}; the shapes grammar is "
                          "'[a picture of] <n> [small|big] [colour] <shape> [and|<relation> <n> ... <shape>] "
                          "[on a <colour> background]'")


def _parse_group(t: _Tokens) -> Group:
    det = t.take("a", "an", *_NUMBERS)
    count = 1 if det in ("a", "an") else _NUMBERS[det]
    size = color = None
    while t.peek() in SIZES or t.peek() in WORLD_COLORS:   # either order: "big red" or "red big"
        w = t.take()
        if w in SIZES and size is None:
            size = w
        elif w in WORLD_COLORS and color is None:
            color = w
        else:
            t.i -= 1
            t.fail("repeated attribute")
    noun = t.peek()
    if noun in WORLD_SHAPES or noun in _SINGULAR:
        plural = noun in _SINGULAR
        if plural != (count > 1):
            t.fail(f"'{det}' needs a {'plural' if count > 1 else 'singular'} shape")
        t.i += 1
        return Group(_SINGULAR.get(noun, noun), color, size, count)
    t.fail(f"expected a shape ({', '.join(SHAPES)})")
    raise AssertionError  # unreachable


def _parse_relation(t: _Tokens) -> str | None:
    w = t.peek()
    if w in ("above", "below"):
        t.i += 1
        return w
    if w == "to" or (w in ("left", "right") and t.peek(1) == "of"):
        if w == "to":
            t.take("to"), t.take("the")
        side = t.take("left", "right")
        t.take("of")
        return side
    return None


def parse_prompt(prompt: str) -> SceneSpec:
    """The scene a prompt asks for; PromptError (naming the word) for anything outside the grammar."""
    t = _Tokens(prompt)
    if t.peek() in ("a", "an") and t.peek(1) in ("picture", "image", "photo") and t.peek(2) == "of":
        t.i += 3
    groups = [_parse_group(t)]
    relation = None
    if t.peek() == "and":
        t.i += 1
        groups.append(_parse_group(t))
    elif (relation := _parse_relation(t)) is not None:
        groups.append(_parse_group(t))
    background = DEFAULT_BACKGROUND
    if t.peek() in ("on", "with", "against"):
        t.i += 1
        if t.peek() in ("a", "an"):
            t.i += 1
        background = t.take(*WORLD_COLORS)
        t.take("background")
    if t.peek() is not None:
        t.fail("unexpected word")
    return SceneSpec(tuple(groups), relation, background).validate()


# ------------------------------------------------------------------------------------------------- streams

def _random_spec(kind: str, rng: np.random.Generator) -> SceneSpec:
    """A fully stated spec (every colour and size concrete) of one scene kind."""
    # Half the scenes on a coloured background: objects on colour were the weakest case of release 1's eval.
    bg = DEFAULT_BACKGROUND if rng.random() < 0.5 else str(rng.choice([c for c in COLORS if c != "white"]))
    if kind == "combination":
        kind = str(rng.choice(["pair", "counted_pair", "counted_relation"]))
    counts = {"single": (1,), "relation": (1, 1), "pair": (1, 1),
              "counting": (int(rng.integers(2, MAX_COUNT + 1)),)}.get(kind)
    if counts is None:   # counted pair: up to 4 objects in all; counted relation: up to 3, one group > 1
        limit = 4 if kind == "counted_pair" else 3
        counts = tuple(rng.choice([c for c in itertools.product(range(1, 4), repeat=2)
                                   if sum(c) <= limit and max(c) > 1]).tolist())
    colors = [c for c in COLORS if c != bg]
    groups = [Group(str(rng.choice(SHAPES)), str(rng.choice(colors)), str(rng.choice(SIZES)), int(n))
              for n in counts]
    relation = str(rng.choice(RELATIONS)) if kind in ("relation", "counted_relation") else None
    return SceneSpec(tuple(groups), relation, bg)


def _featuring(spec: SceneSpec, concept: str, rng: np.random.Generator) -> SceneSpec:
    """`spec` with one of its groups (drawn at random) in the concept's colour, or of the concept's shape."""
    groups = list(spec.groups)
    i = int(rng.integers(len(groups)))
    groups[i] = replace(groups[i], **({"color": concept} if concept in NOVEL_COLORS else {"shape": concept}))
    return SceneSpec(tuple(groups), spec.relation, spec.background)


def _drop_attributes(spec: SceneSpec, rng: np.random.Generator, color_drop: float = COLOR_DROP,
                     keep: str | None = None) -> SceneSpec:
    """Captions sometimes leave size (half the time) or colour (`color_drop` of the time) unsaid: the model
    learns they are free. A colour `keep` is always said (a novel colour: an unstated colour is an old one, and the
    checker, like the model, would see no object in a colour it was not asked about)."""
    groups = list(spec.groups)
    for i, g in enumerate(groups):
        g = replace(g, size=None) if rng.random() < 0.5 else g
        trial = replace(g, color=None) if rng.random() < color_drop and g.color != keep else g
        try:
            SceneSpec(tuple(groups[:i] + [trial] + groups[i + 1:]), spec.relation, spec.background).validate()
            g = trial
        except PromptError:
            pass
        groups[i] = g
    return SceneSpec(tuple(groups), spec.relation, spec.background)


class SceneSampler:
    """Endless, deterministic stream of (image, caption, scene). Sample i depends only on (seed, i); kinds
    rotate through SCENE_KINDS, so each kind has exactly its share.

    mode: "train" never draws a HELD_OUT binding; "held_out" only scenes with at least one; "all" both.
    kinds: the scene kinds rotated through (SCENE_KINDS; a kind named twice has twice the share);
    color_drop: how often a caption leaves an object's colour unsaid.
    concept: a colour of NOVEL_COLORS or a shape of NOVEL_SHAPES that about `concept_share` of the samples feature
    (one of their objects in that colour or of that shape, the rest as the stream draws them); the other samples
    are exactly the stream's without a concept, so a fine-tune on it keeps seeing the world it knows. Which samples
    feature it depends only on (seed, i)."""

    def __init__(self, seed: int = 0, resolution: int = 64, mode: str = "train",
                 held_out: frozenset[tuple[str, str]] = HELD_OUT, supersample: int = 4,
                 kinds: tuple[str, ...] = SCENE_KINDS, color_drop: float = COLOR_DROP,
                 concept: str | None = None, concept_share: float = CONCEPT_SHARE) -> None:
        if mode not in ("train", "held_out", "all"):
            raise ValueError(f"mode must be train, held_out or all, not {mode!r}")
        if concept is not None:
            if concept not in CONCEPTS:
                raise ValueError(f"unknown concept {concept!r}; concepts: {', '.join(CONCEPTS)}")
            if not 0.0 < concept_share <= 1.0:
                raise ValueError(f"concept share must be in (0, 1], got {concept_share}")
            if mode == "held_out":   # a single object of the concept is never a held-out binding
                raise ValueError("a concept stream draws modes train or all, not held_out")
        unknown = sorted(set(kinds) - set(ALL_SCENE_KINDS))
        if not kinds or unknown:
            raise ValueError(f"scene kinds must be some of {', '.join(ALL_SCENE_KINDS)}; got {', '.join(unknown)}"
                             if unknown else "scene kinds: name at least one")
        if not 0.0 <= color_drop <= 1.0:
            raise ValueError(f"colour drop must be a probability in [0, 1], got {color_drop}")
        self.seed, self.resolution, self.mode = seed, resolution, mode
        self.held, self.supersample = held_out, supersample
        self.kinds, self.color_drop = tuple(kinds), color_drop
        self.concept, self.concept_share = concept, concept_share

    def features_concept(self, index: int) -> bool:
        """Whether sample `index` features the concept (never, without one)."""
        if self.concept is None:
            return False
        # its own generator, so the ordinary samples are drawn exactly as without a concept
        return bool(np.random.default_rng([self.seed, index, 0xC0C0]).random() < self.concept_share)

    def scene(self, index: int) -> tuple[Scene, str]:
        """(scene, caption) of sample `index`, without drawing it."""
        featured = self.features_concept(index)
        rng = np.random.default_rng([self.seed, index, 0xC0C1 if featured else 0x5EED])
        kind = self.kinds[index % len(self.kinds)]
        while True:
            full = _random_spec(kind, rng)
            if featured:
                full = _featuring(full, self.concept, rng)  # type: ignore[arg-type]
            try:
                full.validate()
            except PromptError:
                continue
            if self.mode == "train" and full.held_out(self.held):
                continue
            if self.mode == "held_out" and not full.held_out(self.held):
                continue
            keep = self.concept if featured and self.concept in NOVEL_COLORS else None
            said = _drop_attributes(full, rng, self.color_drop, keep)
            try:  # rarely (big objects bound by a relation) no placement is found: draw another scene
                scene = replace(realize(full, rng, self.resolution), spec=said)
            except PromptError:
                continue
            return scene, describe(said, rng)

    def sample(self, index: int) -> Sample:
        scene, caption = self.scene(index)
        return Sample(render(scene, self.supersample), caption, scene)

    def __iter__(self) -> Iterator[Sample]:
        return (self.sample(i) for i in itertools.count())

    def take(self, n: int, start: int = 0) -> list[Sample]:
        """A fixed set: samples start .. start+n-1 (e.g. a validation set from a seed not used to train)."""
        return [self.sample(i) for i in range(start, start + n)]


def preview_grid(samples: list[tuple[np.ndarray, str]], cols: int = 8, scale: int = 3) -> Image.Image:
    """Images (upscaled, nearest) with their captions wrapped underneath, for eyeballing the world."""
    tile = samples[0][0].shape[0] * scale
    rows = (len(samples) + cols - 1) // cols
    cap_h = 44
    grid = Image.new("RGB", (cols * (tile + 6), rows * (tile + cap_h)), (128, 128, 128))
    draw = ImageDraw.Draw(grid)
    for i, (img, caption) in enumerate(samples):
        x, y = (i % cols) * (tile + 6), (i // cols) * (tile + cap_h)
        grid.paste(Image.fromarray(img).resize((tile, tile), Image.NEAREST), (x, y))
        line, lines = "", []
        for word in caption.split():
            if len(line) + len(word) + 1 > tile // 6:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
        draw.text((x + 1, y + tile + 1), "\n".join(lines[:4]), fill=(0, 0, 0))
    return grid
