"""Checkpoint I/O: single files and diffusers folders in, either layout out."""
from .checkpoint import build, convert, load, read_checkpoint, save
from .detect import UnknownArchitecture, detect
from .io import CheckpointError

__all__ = ["build", "convert", "load", "read_checkpoint", "save", "detect", "CheckpointError", "UnknownArchitecture"]
