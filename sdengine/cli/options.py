"""Option helpers every command shares: argparse types that check values as they are parsed (a bad value is a
usage error naming the option), WxH sizes, and the runtime options (--device, --precision, --compile)."""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any


def _checked(cast: Callable[[str], Any], ok: Callable[[Any], bool], requirement: str, name: str) -> Callable:
    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if cast is int else 'a number'}, got "
                                             f"{text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {requirement} (got {text})")
        return value

    parse.__name__ = name  # argparse names the type in its messages
    return parse


positive_int = _checked(int, lambda v: v >= 1, "at least 1", "positive_int")
non_negative_int = _checked(int, lambda v: v >= 0, "0 or more", "non_negative_int")
positive_float = _checked(float, lambda v: 0 < v < math.inf, "positive", "positive_float")
non_negative_float = _checked(float, lambda v: 0 <= v < math.inf, "0 or more", "non_negative_float")
fraction = _checked(float, lambda v: 0 <= v <= 1, "between 0 and 1", "fraction")
decay = _checked(float, lambda v: 0 <= v < 1, "at least 0 and below 1", "decay")


def size_pair(text: str) -> tuple[int, int]:
    """'640x480' -> (640, 480)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 512x768, got {text!r}") from None
    return w, h


def add_runtime_args(p: argparse.ArgumentParser, first: str = "call") -> None:
    """Where and how the networks run: --device, --precision, --compile (generation, eval and serve alike)."""
    from ..runtime import DEVICES, PRECISIONS

    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--compile", nargs="?", const="inductor", default=None, choices=["inductor", "openvino"],
                   help=f"compile the UNet: TorchInductor (no value), or OpenVINO on a CPU (`--compile openvino`, "
                        f"~1.65x at 512² on AVX512-BF16; needs `pip install openvino`): faster steps after a slow "
                        f"first {first}")
