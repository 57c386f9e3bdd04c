"""The `sdengine` command line. Errors are one readable line on stderr and a non-zero exit, never a traceback.

One module per command group; a command's module is imported, and its options built, only when that command
runs, so `sdengine --help` and `sdengine info --help` import no torch.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable

EXIT_ERROR = 1
EXIT_USAGE = 2

# command -> (module in sdengine.cli that configures it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("generate", "text to image"),
    "img2img": ("generate", "image + text to image"),
    "inpaint": ("generate", "repaint the white part of a mask"),
    "outpaint": ("generate", "extend an image on any side and paint the new border"),
    "upscale": ("upscale", "enlarge an image with a model upscaler (ESRGAN, Real-ESRGAN) from the upscalers folder"),
    "batch": ("batch", "many generations from a JSON-lines file: resumable, sharded under torchrun or on Ray"),
    "grid": ("grid", "X/Y/Z plot: a labelled grid of generations over axis values (A1111's script)"),
    "info": ("models", "a checkpoint's family, prediction, sizes and config; or a PNG's parameters"),
    "models": ("models", "list the models folder with each model's detected family"),
    "convert": ("models", "convert between single-file and diffusers layouts"),
    "init": ("models", "write a checkpoint of a preset architecture with fresh weights (to train)"),
    "merge": ("models", "merge checkpoints as A1111's Checkpoint Merger does: A*(1-alpha) + B*alpha, "
                        "or A + (B - C)*alpha"),
    "train": ("train", "train a stage: vae, text (encoder) or unet"),
    "eval": ("evaluate", "ShapesEval: prompt adherence judged by the exact checker"),
    "serve": ("serve", "HTTP API compatible with AUTOMATIC1111's /sdapi/v1, with a job queue"),
}


class Parser(argparse.ArgumentParser):
    """Usage mistakes get the same one-line form as every other error (and argparse's exit code 2)."""

    def error(self, message: str):
        print(f"sdengine: error: {message} (see: {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _chosen_command(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv`: every command listed, the chosen one's options built (its module imported)."""
    parser = Parser(prog="sdengine", description="Stable Diffusion on PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    chosen = _chosen_command(sys.argv[1:] if argv is None else argv)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(f".{module}", __name__).configure(name, p)
    return parser


def run(argv: list[str] | None = None) -> int:
    from ..errors import CLIError, first_line

    args = build_parser(argv).parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except KeyboardInterrupt:
        print("sdengine: interrupted", file=sys.stderr)
        return 130
    except (CLIError, OSError, ValueError, KeyError, RuntimeError) as e:
        if os.environ.get("SDENGINE_DEBUG"):
            raise
        message = first_line(e)
        if isinstance(e, OSError) and e.strerror and e.filename:
            message = f"{e.strerror}: {e.filename}"
        print(f"sdengine: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 - a bug rather than bad input: still one line, as the CLI promises
        if os.environ.get("SDENGINE_DEBUG"):
            raise
        print(f"sdengine: error: internal error: {type(e).__name__}: {first_line(e)} (SDENGINE_DEBUG=1 shows the "
              "traceback)", file=sys.stderr)
        return EXIT_ERROR
    return 0


def main() -> None:
    # OpenMP's wait policy is left to the user. libgomp's default (spin briefly, then sleep) is the fast one on a
    # machine doing one job: forcing PASSIVE (sleep at once) made a 64x64 generation 1.7x slower here (UNet call
    # 28 -> 50 ms). On a CPU shared with other busy processes spinning threads stall each other (the same call:
    # 158 ms with a competing job vs 47 ms with PASSIVE), so there set OMP_WAIT_POLICY=PASSIVE.
    from ..cpu_memory import keep_freed_memory

    keep_freed_memory()  # large tensors reuse freed memory instead of fresh, kernel-zeroed pages (see the module)
    sys.exit(run())


if __name__ == "__main__":
    main()
