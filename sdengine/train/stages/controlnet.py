"""`sdengine train controlnet`: a ControlNet (Zhang et al. 2023) on a frozen model, as the paper trains one.

The ControlNet starts as a copy of the model's UNet encoder half (time embedding, input blocks, middle block), its
zero convolutions and the hint encoder's last convolution at zero, so the first step's model is the base model bit
for bit and the gradient first reaches the zero convolutions, then the copy. The UNet, text encoder and VAE are
frozen; the loss is `train unet`'s (eps or v target, min-SNR weighting) with the ControlNet's residuals added to the
UNet's skip connections and middle block. Captions are dropped half the time (the paper's 50%), so the ControlNet
learns to read the control image, not only the prompt. Leaves controlnet.safetensors: lllyasviel's single-file
layout (`control_model.*` keys, fp32), which `sdengine generate --control FILE:IMAGE` and
`sdengine.control.save_controlnet(..., layout="diffusers")` (for diffusers' ControlNetModel) read.

Data: each item is (image, caption, control image).
  --data shapes --hint layout   the scene's ground truth: every object's silhouette white on black
                                (shapes.render_layout), exact, colour-free: it says where each object is
  --data shapes --hint canny    Canny edges (A1111's thresholds) of the rendered image
  --data DIR [--hint file]      NAME.png + NAME.txt + NAME.control.png side by side; or metadata.jsonl rows
                                with file_name, text and conditioning_image (the columns of diffusers'
                                train_controlnet.py), paths relative to DIR
  --data DIR --hint canny       Canny edges of the folder's captioned images (no control images needed)
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from ...control import save_controlnet
from ...model import StableDiffusion
from ...nn.controlnet import HINT_BLOCK_CHANNELS, ControlNet, ControlNetConfig
from ...weights.io import atomic_path
from ..data import IMAGE_SUFFIXES, FolderSource, ShapesSource, read_caption_text, shapes_spec
from ..plots import image_grid
from .unet import UNetStage

RESULT = "controlnet.safetensors"
HINTS = ("layout", "canny", "file")
CONTROL_STEM = ".control"  # NAME.control.png is NAME.png's control image


def hint_widths(downscale: int) -> tuple[int, ...]:
    """The hint encoder's widths for a VAE that shrinks images `downscale` times: the published (16, 32, 96, 256)
    cut to one stride-2 stage per halving (SD's 8x: all of them; the shipped model's 4x: 16, 32, 96)."""
    stages = downscale.bit_length() - 1
    if downscale != 2 ** stages or not 1 <= stages < len(HINT_BLOCK_CHANNELS):
        raise ValueError(f"no hint encoder for a VAE that downscales {downscale}x (2, 4 or 8)")
    return HINT_BLOCK_CHANNELS[:stages + 1]


def controlnet_from_unet(model: StableDiffusion) -> ControlNet:
    """A ControlNet whose encoder half is a copy of the model's UNet's (same keys, same values), its zero
    convolutions and the hint encoder's last convolution zero, the hint encoder's other convolutions fresh (from
    torch's generator)."""
    net = ControlNet(ControlNetConfig(unet=model.config.unet,
                                      hint_block_channels=hint_widths(model.config.vae.downscale)))
    own = net.state_dict()
    copied = {k: v for k, v in model.unet.state_dict().items() if k in own}
    fresh = sorted(set(own) - set(copied))
    stray = [k for k in fresh if not k.startswith(("input_hint_block.", "zero_convs.", "middle_block_out."))]
    if stray:  # the UNet's names and the ControlNet's come from one Encoder: a miss is a bug, not a file problem
        raise AssertionError(f"ControlNet keys the UNet does not have: {stray[:5]}")
    net.load_state_dict(copied, strict=False)
    return net.to(next(model.unet.parameters()).device)


# --- data ----------------------------------------------------------------------------------------------------------

def canny(image: np.ndarray) -> np.ndarray:
    """Canny edges of an RGB image with A1111's default thresholds (control.preprocess), as (H, W, 3) uint8."""
    from ...control import preprocess

    return np.asarray(preprocess(Image.fromarray(image), "canny"), dtype=np.uint8)


class ShapesControlSource(ShapesSource):
    """The shapes world with each scene's control image: its layout map (render_layout) or the render's edges."""

    def __init__(self, size: int = 64, seed: int = 0, hint: str = "layout", **mix):
        if hint not in ("layout", "canny"):
            raise ValueError(f"--hint {hint}: the shapes world makes its control images as layout or canny maps "
                             "(file is for a folder of images with control images)")
        super().__init__(size, seed, **mix)
        self.hint = hint

    def item(self, index: int) -> tuple[np.ndarray, str, np.ndarray]:
        from ...data.layout import render_layout

        sample = self.sampler.sample(index)
        image = np.asarray(sample.image, dtype=np.uint8)
        control = render_layout(sample.scene, self.sampler.supersample) if self.hint == "layout" else canny(image)
        return image, sample.caption, control


def _square(img: Image.Image, size: int) -> np.ndarray:
    """Centre-cropped to a square and resized to size x size, as FolderSource prepares its images."""
    img = img.convert("RGB")
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)
    return np.asarray(img, dtype=np.uint8)


class ControlFolderSource(FolderSource):
    """FolderSource's captioned images, each with its control image (see the module docstring for the layouts);
    an image whose control image is missing or unreadable is skipped and counted; none usable is an error."""

    def __init__(self, folder: str | Path, size: int = 64, seed: int = 0, hint: str = "file"):
        if hint not in ("file", "canny"):
            raise ValueError(f"--hint {hint}: a folder's control images are its own files (file) or the edges of "
                             "its images (canny); layout maps are for --data shapes")
        self.hint = hint
        self.controls: dict[Path, Path] = {}
        super().__init__(folder, size, seed)

    def _pairs(self, folder: Path) -> list[tuple[Path, str]]:
        meta = folder / "metadata.jsonl"
        if self.hint == "canny":
            return super()._pairs(folder)
        if meta.exists():
            pairs = self._metadata_pairs(folder, meta)
        else:  # NAME.png + NAME.txt + NAME.control.png: the control images are no training images
            pairs = []
            images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            controls = {p.parent / p.stem[:-len(CONTROL_STEM)]: p for p in images if p.stem.endswith(CONTROL_STEM)}
            images = [p for p in images if not p.stem.endswith(CONTROL_STEM)]
            captioned = 0
            for p in images:
                txt = p.with_suffix(".txt")
                if not txt.exists():
                    continue
                captioned += 1
                control = controls.get(p.with_suffix(""))
                if control is not None:
                    pairs.append((p, read_caption_text(txt).strip()))
                    self.controls[p] = control
            if captioned and not pairs:
                raise ValueError(f"{folder}: {captioned} captioned images but no control image: put NAME.control.png "
                                 "beside each NAME.png (or give metadata.jsonl rows a conditioning_image), or use "
                                 "--hint canny")
            self._missing_captions = len(images) - captioned
        unreadable = [p for p, _ in pairs if not _readable(self.controls[p])]
        if unreadable and os.environ.get("RANK", "0") == "0":
            print(f"sdengine: skipped {len(unreadable)} images whose control image is unreadable (first: "
                  f"{self.controls[unreadable[0]]})", file=sys.stderr)
        return [(p, c) for p, c in pairs if p not in set(unreadable)]

    def _metadata_pairs(self, folder: Path, meta: Path) -> list[tuple[Path, str]]:
        """metadata.jsonl rows with file_name, text and conditioning_image (diffusers' train_controlnet columns)."""
        rows = [line for line in read_caption_text(meta).splitlines() if line.strip()]
        pairs = []
        for n, line in enumerate(rows, 1):
            try:
                row = json.loads(line)
                names = [row["file_name"], row["text"], row["conditioning_image"]]
                if not all(isinstance(v, str) for v in names):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{meta}:{n}: expected a JSON object with file_name, text and conditioning_image "
                                 f"strings (diffusers' train_controlnet columns), got {line.strip()[:60]!r}") from None
            image, control = folder / names[0].removeprefix("./"), folder / names[2].removeprefix("./")
            if not image.is_file() or not control.is_file():
                raise ValueError(f"{meta}:{n}: no such file {image if not image.is_file() else control}")
            pairs.append((image, names[1]))
            self.controls[image] = control
        self._missing_captions = 0
        return pairs

    def item(self, index: int) -> tuple[np.ndarray, str, np.ndarray]:
        n = len(self.items)
        epoch, position = divmod(index, n)
        path, caption = self.items[self._order(epoch)[position]]
        with Image.open(path) as img:
            image = _square(img, self.size)
        if self.hint == "canny":
            return image, caption, canny(image)
        with Image.open(self.controls[path]) as img:
            return image, caption, _square(img, self.size)


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.load()
        return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def make_control_source(data: str, size: int, seed: int, hint: str | None = None,
                        kinds: tuple[str, ...] | None = None, color_drop: float | None = None):
    """The shapes world with control maps (hint: layout, the default, or canny) or a folder of images with control
    images (hint: file, the default, or canny)."""
    spec = shapes_spec(data)
    if spec is not None:
        mix = {k: v for k, v in (("kinds", kinds), ("color_drop", color_drop)) if v is not None}
        return ShapesControlSource(size, seed, hint or "layout", **spec, **mix)
    if kinds is not None or color_drop is not None:
        raise ValueError("--scene-kinds and --color-drop are for --data shapes")
    return ControlFolderSource(data, size, seed, hint or "file")


def hint_batch(controls: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """Control images as the ControlNet reads them: (b, 3, h, w) in [0, 1] (control.hint_tensor's range)."""
    pixels = torch.from_numpy(np.stack(controls).astype(np.float32) / 255.0)
    return pixels.permute(0, 3, 1, 2).contiguous().to(device)


# --- the stage -----------------------------------------------------------------------------------------------------

class ControlNetStage(UNetStage):
    """UNetStage's data and loss with the model frozen and a ControlNet's residuals in the UNet; trains only it."""

    name = "controlnet"

    def __init__(self, model: StableDiffusion, source, seed: int = 0, caption_dropout: float = 0.5,
                 init_name: str = "", **unet_options):
        super().__init__(model, source, seed=seed, caption_dropout=caption_dropout, **unet_options)
        model.requires_grad_(False)
        model.unet.eval()
        model.text_encoder.eval()
        self.controlnet = controlnet_from_unet(model)
        self.init_name = init_name

    def trainable(self) -> dict[str, nn.Module]:
        return {"controlnet": self.controlnet}

    def use_cache(self, cache) -> None:
        raise ValueError("train controlnet reads each image's control image with it: it trains without a latent cache")

    @torch.no_grad()
    def batch(self, step: int, indices: range, device: torch.device, items: list | None = None):
        """UNetStage's (z0, conditioning, timesteps, noise) and the control images (b, 3, h, w) in [0, 1]."""
        from ..data import batch_items

        items = items if items is not None else batch_items(self.source, step, indices)
        z0, cond, t, noise = super().batch(step, indices, device, [(im, c) for im, c, _ in items])
        return z0, cond, t, noise, hint_batch([h for _, _, h in items], device)

    def loss(self, batch, step: int):
        z0, context, t, noise, hint = batch
        self.model.to(z0.device)  # the frozen model is not the trainer's to move (a no-op once there)

        def predict(x_t: torch.Tensor) -> torch.Tensor:
            return self.model.unet(x_t, t, context, control=self.controlnet(x_t, hint, t, context))

        return self.denoising_loss(z0, t, noise, predict), {}

    @torch.no_grad()
    def samples(self, modules: dict[str, nn.Module], step: int, out: Path) -> None:
        """Four of the source's control images (items of a stream the training never reaches), each beside two
        generations with the ControlNet (its caption as the prompt) and one without."""
        from ...control import ControlUnit
        from ...pipeline import Pipeline

        net = self.controlnet
        was = net.training
        net.eval()
        self.model.to(next(net.parameters()).device)
        size = self.source.size
        pipe = Pipeline(self.model)
        images, labels = [], []
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / RESULT
            save_controlnet(net, path)
            for i in range(4):
                image, caption, control = self.source.item(10 ** 9 + i)
                hint = Image.fromarray(control)
                unit = ControlUnit(str(path), hint)
                with_control = pipe.generate(caption, seed=i, width=size, height=size, batch_size=2, controls=[unit],
                                             **self.SAMPLING)
                without = pipe.generate(caption, seed=i, width=size, height=size, **self.SAMPLING)
                images += [Image.fromarray(image), hint, *with_control, *without]
                labels += [caption, "control", "ControlNet", "ControlNet", "no ControlNet"]
        image_grid(images, columns=5, labels=labels).save(out)
        net.train(was)

    def export(self, modules: dict[str, nn.Module], out: Path) -> None:
        net = modules["controlnet"]
        with atomic_path(out / RESULT, force=True) as tmp:
            save_controlnet(net, tmp)


def build_controlnet(args, source) -> ControlNetStage:
    """The stage `sdengine train controlnet` runs (cli/train.py)."""
    from ...weights import load

    model = load(args.init)
    return ControlNetStage(model, source, seed=args.seed, caption_dropout=args.caption_dropout,
                           timestep_shift=args.timestep_shift, snr_floor=args.snr_floor, init_name=args.init.name)

