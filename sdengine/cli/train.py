"""`sdengine train vae | text | unet`: the options live with the trainer (sdengine/train/cli.py)."""
from __future__ import annotations

import argparse


def configure(name: str, p: argparse.ArgumentParser) -> None:
    from ..train.cli import configure as configure_train

    configure_train(p)
