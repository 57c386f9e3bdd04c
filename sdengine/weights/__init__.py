"""Checkpoint I/O: single files and diffusers folders in, either layout out."""
from .checkpoint import build, convert, load, read_checkpoint, save
from .detect import UnknownArchitecture, detect
from .io import CheckpointError
from .merge import merge, merge_models

__all__ = ["build", "convert", "load", "read_checkpoint", "save", "detect", "merge", "merge_models", "CheckpointError",
           "UnknownArchitecture"]
