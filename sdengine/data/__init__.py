"""Procedural training data: the shapes world (`shapes`), its evaluation set and its exact checker."""
from .checker import check, detect
from .shapes import (
    HELD_OUT,
    VOCABULARY_WORDS,
    PromptError,
    Scene,
    SceneSampler,
    SceneSpec,
    caption_words,
    describe,
    parse_prompt,
    realize,
    render,
)
from .shapes_eval import EVAL_CATEGORIES, EvalItem, shapes_eval

__all__ = ["EVAL_CATEGORIES", "HELD_OUT", "VOCABULARY_WORDS", "EvalItem", "PromptError", "Scene", "SceneSampler",
           "SceneSpec", "caption_words", "check", "describe", "detect", "parse_prompt", "realize", "render",
           "shapes_eval"]
