"""ShapesEval: a fixed GenEval-style benchmark for the shapes world, judged exactly by checker.check.

Categories follow GenEval: single_object ("a star"), two_object ("a circle and a square"), counting ("three
crosses"), colors ("a purple diamond"), position ("a circle to the left of a star"), color_attr ("a red circle
and a blue square"). Like GenEval, objects in single_object / two_object / counting carry no colour; about a
quarter of the coloured prompts use a HELD_OUT colour-shape binding (tagged held_out) that the training
stream never shows, so compositional generalization is measured separately from memorization.

The list is built from a fixed rng: the same prompts, in the same order, for every run and every machine.

`shapes_eval(concept="pink")` is the same benchmark for a colour the shipped model never saw (shapes.NOVEL_COLORS):
the categories that name a colour (colors, position, color_attr), each prompt naming the concept, built from their
own rng so the ordinary list is untouched. `shapes_eval(concept="heart")`, for a shape it never saw
(shapes.NOVEL_SHAPES), has all six categories, each prompt naming the shape.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from .shapes import (
    COLORS,
    CONCEPTS,
    DEFAULT_BACKGROUND,
    HELD_OUT,
    NOVEL_COLORS,
    RELATIONS,
    SHAPES,
    SIZES,
    Group,
    PromptError,
    Scene,
    SceneSpec,
    describe,
    realize,
    render,
)

EVAL_CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position",
                                    "color_attr")
# Prompts per category (520 in all); single_object is small because the world has few unstated-colour forms.
CATEGORY_SIZES: dict[str, int] = {"single_object": 60, "two_object": 90, "counting": 90, "colors": 80,
                                  "position": 100, "color_attr": 100}
HELD_OUT_SHARE = 0.25
_COLORED = ("colors", "position", "color_attr")
# A concept's prompts (120 in all, 480 images at 4 seeds): the categories where a colour is named. Single pink
# objects have 144 distinct forms (6 shapes x 3 sizes x 8 backgrounds), so 40 of each leaves room to vary.
CONCEPT_SIZES: dict[str, int] = {"colors": 40, "position": 40, "color_attr": 40}
# A novel shape's prompts (120): every category. A single heart with no colour has only 24 forms (3 sizes x 8
# backgrounds), hence the smaller share there.
SHAPE_CONCEPT_SIZES: dict[str, int] = {"single_object": 16, "two_object": 20, "counting": 20, "colors": 24,
                                       "position": 20, "color_attr": 20}


@dataclass(frozen=True)
class EvalItem:
    category: str
    prompt: str
    spec: SceneSpec
    seed: int          # the generation seed; each prompt comes with seeds 0 .. seeds_per_prompt-1
    held_out: bool     # the prompt names a HELD_OUT colour-shape binding
    concept: str | None = None   # the novel colour or shape the prompt is about (shapes_eval(concept=...))

    def scene(self, resolution: int = 64) -> Scene:
        """A ground-truth scene for this prompt and seed (what a perfect model could draw)."""
        rng = np.random.default_rng([self.seed, zlib.crc32(self.prompt.encode())])
        return realize(self.spec, rng, resolution)

    def render(self, resolution: int = 64) -> np.ndarray:
        return render(self.scene(resolution))


def _background(rng: np.random.Generator) -> str:
    return DEFAULT_BACKGROUND if rng.random() < 0.7 else str(rng.choice([c for c in COLORS if c != "white"]))


def _size(rng: np.random.Generator) -> str | None:
    return None if rng.random() < 0.6 else str(rng.choice(SIZES))


def _two_shapes(rng: np.random.Generator) -> tuple[str, str]:
    a, b = rng.choice(len(SHAPES), 2, replace=False)
    return SHAPES[int(a)], SHAPES[int(b)]


def _colored_group(rng: np.random.Generator, shape: str, held: bool) -> Group:
    """A coloured object; held: its binding is one of HELD_OUT (shape ignored), else never one."""
    if held:
        color, shape = sorted(HELD_OUT)[int(rng.integers(len(HELD_OUT)))]
    else:
        color = str(rng.choice([c for c in COLORS if (c, shape) not in HELD_OUT]))
    return Group(shape, color, _size(rng))


def _single_object(rng: np.random.Generator, held: bool) -> SceneSpec:
    return SceneSpec((Group(str(rng.choice(SHAPES)), None, _size(rng)),), None, _background(rng))


def _two_object(rng: np.random.Generator, held: bool) -> SceneSpec:
    a, b = _two_shapes(rng)
    return SceneSpec((Group(a, None, _size(rng)), Group(b, None, _size(rng))), None, _background(rng))


def _counting(rng: np.random.Generator, held: bool) -> SceneSpec:
    g = Group(str(rng.choice(SHAPES)), None, _size(rng), int(rng.integers(2, 5)))
    return SceneSpec((g,), None, _background(rng))


def _colors(rng: np.random.Generator, held: bool) -> SceneSpec:
    return SceneSpec((_colored_group(rng, str(rng.choice(SHAPES)), held),), None, _background(rng))


def _position(rng: np.random.Generator, held: bool) -> SceneSpec:
    a, b = _two_shapes(rng)
    rel = str(rng.choice(RELATIONS))
    if not held and rng.random() < 0.5:   # GenEval's form: no colours, only where things are
        groups = (Group(a, None, _size(rng)), Group(b, None, _size(rng)))
    else:
        first_held = held and rng.random() < 0.5
        groups = (_colored_group(rng, a, first_held), _colored_group(rng, b, held and not first_held))
    return SceneSpec(groups, rel, _background(rng))


def _color_attr(rng: np.random.Generator, held: bool) -> SceneSpec:
    a, b = _two_shapes(rng) if rng.random() < 0.8 else (str(rng.choice(SHAPES)),) * 2
    first_held = held and rng.random() < 0.5
    ga, gb = _colored_group(rng, a, first_held), _colored_group(rng, b, held and not first_held)
    return SceneSpec((ga, gb), None, _background(rng))


_MAKERS: dict[str, Callable[[np.random.Generator, bool], SceneSpec]] = {
    "single_object": _single_object, "two_object": _two_object, "counting": _counting, "colors": _colors,
    "position": _position, "color_attr": _color_attr}


def _concept_group(rng: np.random.Generator, shape: str, concept: str) -> Group:
    return Group(shape, concept, _size(rng))


def _other_group(rng: np.random.Generator, shape: str) -> Group:
    """The object beside the concept's: an old colour (never a HELD_OUT binding, so a failure is the concept's),
    unstated a quarter of the time (then any colour passes, the concept's included)."""
    group = _colored_group(rng, shape, held=False)
    return replace(group, color=None) if rng.random() < 0.25 else group


def _concept_colors(rng: np.random.Generator, concept: str) -> SceneSpec:
    return SceneSpec((_concept_group(rng, str(rng.choice(SHAPES)), concept),), None, _background(rng))


def _concept_position(rng: np.random.Generator, concept: str) -> SceneSpec:
    a, b = _two_shapes(rng)
    groups = (_concept_group(rng, a, concept), _other_group(rng, b))
    if rng.random() < 0.5:            # the concept's object is the first or the second one named
        groups = groups[::-1]
    return SceneSpec(groups, str(rng.choice(RELATIONS)), _background(rng))


def _concept_color_attr(rng: np.random.Generator, concept: str) -> SceneSpec:
    # a fifth of them one shape in two colours ("a pink circle and a red circle"): the colour has to be bound
    a, b = _two_shapes(rng) if rng.random() < 0.8 else (str(rng.choice(SHAPES)),) * 2
    other = _colored_group(rng, b, held=False)    # named: an unstated one would make the pair ambiguous
    groups = (_concept_group(rng, a, concept), other)
    return SceneSpec(groups[::-1] if rng.random() < 0.5 else groups, None, _background(rng))


_CONCEPT_MAKERS: dict[str, Callable[[np.random.Generator, str], SceneSpec]] = {
    "colors": _concept_colors, "position": _concept_position, "color_attr": _concept_color_attr}


def _shape_single(rng: np.random.Generator, shape: str) -> SceneSpec:
    return SceneSpec((Group(shape, None, _size(rng)),), None, _background(rng))


def _shape_two(rng: np.random.Generator, shape: str) -> SceneSpec:
    groups = (Group(shape, None, _size(rng)), Group(str(rng.choice(SHAPES)), None, _size(rng)))
    return SceneSpec(groups[::-1] if rng.random() < 0.5 else groups, None, _background(rng))


def _shape_counting(rng: np.random.Generator, shape: str) -> SceneSpec:
    return SceneSpec((Group(shape, None, _size(rng), int(rng.integers(2, 5))),), None, _background(rng))


def _shape_colors(rng: np.random.Generator, shape: str) -> SceneSpec:
    return SceneSpec((Group(shape, str(rng.choice(list(COLORS))), _size(rng)),), None, _background(rng))


def _shape_position(rng: np.random.Generator, shape: str) -> SceneSpec:
    colored = rng.random() < 0.5   # half GenEval's form (no colours), half with both colours named
    groups = tuple(Group(s, str(rng.choice(list(COLORS))) if colored else None, _size(rng))
                   for s in (shape, str(rng.choice(SHAPES))))
    return SceneSpec(groups[::-1] if rng.random() < 0.5 else groups, str(rng.choice(RELATIONS)), _background(rng))


def _shape_color_attr(rng: np.random.Generator, shape: str) -> SceneSpec:
    other = shape if rng.random() < 0.2 else str(rng.choice(SHAPES))   # "a red heart and a blue heart" a fifth
    a, b = rng.choice(list(COLORS), 2, replace=False)
    groups = (Group(shape, str(a), _size(rng)), Group(other, str(b), _size(rng)))
    return SceneSpec(groups[::-1] if rng.random() < 0.5 else groups, None, _background(rng))


_SHAPE_CONCEPT_MAKERS: dict[str, Callable[[np.random.Generator, str], SceneSpec]] = {
    "single_object": _shape_single, "two_object": _shape_two, "counting": _shape_counting, "colors": _shape_colors,
    "position": _shape_position, "color_attr": _shape_color_attr}


def concept_prompts(concept: str, seed: int = 2024) -> list[tuple[str, str, SceneSpec, bool]]:
    """The distinct prompts of a novel colour's or shape's benchmark, (category, prompt, spec, held_out=False), each
    naming the concept; the same for every run (the rng is seeded from `seed` and the concept's name)."""
    if concept not in CONCEPTS:
        raise ValueError(f"unknown concept {concept!r}; concepts: {', '.join(CONCEPTS)}")
    rng = np.random.default_rng([seed, zlib.crc32(concept.encode())])
    seen: set[SceneSpec] = set()
    out: list[tuple[str, str, SceneSpec, bool]] = []
    sizes, makers = ((CONCEPT_SIZES, _CONCEPT_MAKERS) if concept in NOVEL_COLORS
                     else (SHAPE_CONCEPT_SIZES, _SHAPE_CONCEPT_MAKERS))
    for cat, n in sizes.items():
        made = 0
        while made < n:
            spec = makers[cat](rng, concept)
            try:
                spec.validate()
            except PromptError:        # a colour drawn equal to the background, two alike objects, ...
                continue
            if spec.held_out() or spec.normalized() in seen:
                continue
            seen.add(spec.normalized())
            out.append((cat, describe(spec), spec, False))
            made += 1
    return out


def eval_prompts(seed: int = 2024) -> list[tuple[str, str, SceneSpec, bool]]:
    """The distinct prompts: (category, prompt, spec, held_out), no two with the same meaning."""
    rng = np.random.default_rng(seed)
    seen: set[SceneSpec] = set()
    out: list[tuple[str, str, SceneSpec, bool]] = []
    for cat in EVAL_CATEGORIES:
        made = 0
        while made < CATEGORY_SIZES[cat]:
            held = cat in _COLORED and rng.random() < HELD_OUT_SHARE
            spec = _MAKERS[cat](rng, held)
            try:
                spec.validate()
            except PromptError:        # e.g. the shape's colour drawn equal to the background
                continue
            if spec.held_out() != held or spec.normalized() in seen:
                continue
            seen.add(spec.normalized())
            out.append((cat, describe(spec), spec, held))
            made += 1
    return out


def shapes_eval(seeds_per_prompt: int = 4, seed: int = 2024, first_seed: int = 0,
                concept: str | None = None) -> list[EvalItem]:
    """Every prompt of eval_prompts() with generation seeds first_seed .. first_seed+seeds_per_prompt-1 (GenEval
    uses 4; seeds past the usual ones check a choice made on those); concept: concept_prompts(concept) instead."""
    prompts = eval_prompts(seed) if concept is None else concept_prompts(concept, seed)
    return [EvalItem(cat, prompt, spec, s, held, concept) for cat, prompt, spec, held in prompts
            for s in range(first_seed, first_seed + seeds_per_prompt)]


def summarize(items: list[EvalItem], passed: list[bool]) -> dict[str, float]:
    """Pass rate per category, GenEval's overall score (mean over categories), and held-out vs seen (for the
    ordinary prompts only: a concept's prompts have no held-out bindings to compare)."""
    scores: dict[str, float] = {}
    for cat in EVAL_CATEGORIES:
        r = [p for it, p in zip(items, passed) if it.category == cat]
        if r:
            scores[cat] = float(np.mean(r))
    scores["overall"] = float(np.mean([scores[c] for c in EVAL_CATEGORIES if c in scores]))
    for name, want in (("held_out", True), ("seen_colored", False)):
        r = [p for it, p in zip(items, passed)
             if it.held_out == want and it.category in _COLORED and it.concept is None]
        if r:
            scores[name] = float(np.mean(r))
    return scores
