"""TAESD, the tiny autoencoder (madebyollin/taesd): a few plain ReLU conv blocks that map pixels to the latents of
a Stable Diffusion VAE and back, ~100x cheaper than the VAE it imitates: for previews and fast decodes.

Latent scale: TAESD reads and writes the latents the diffusion runs on, already multiplied by the VAE's
scaling factor (SD1's 0.18215, SDXL's 0.13025): diffusers' AutoencoderTiny says so with `scaling_factor=1.0`.
Its `latent_magnitude` (3) and `latent_shift` (0.5) only map latents to [0, 1] to store them as 8-bit images
(`scale_latents`); encode and decode never apply them. So `TinyAutoencoder.decode(latents)` takes the latents a
pipeline holds (those `vae.decode(latents / scaling_factor)` is given) and returns pixels in [-1, 1] like
`AutoencoderKL.decode`; `encode` takes [-1, 1] pixels and returns scaled latents.

Files read, recognised by their keys and shapes (never their names):
- madebyollin's `taesd_encoder.pth` / `taesd_decoder.pth` and their `.safetensors` (taesd, taesdxl: one
  nn.Sequential each, keys `1.conv.0.weight`, ...), one file or a folder holding both;
- one file with both halves under `taesd_encoder.` / `taesd_decoder.` (ComfyUI's and `sdengine train taesd`'s);
- diffusers' AutoencoderTiny: a folder with config.json + diffusion_pytorch_model.safetensors (or .bin), or the
  weights file alone (keys `encoder.layers.*`, `decoder.layers.*`).
Pickles go through `read_tensors` (`torch.load(weights_only=True)`): one that would run code is refused.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..weights.io import DIFFUSERS_WEIGHTS, CheckpointError, diffusers_weights, read_tensors

ENCODER, DECODER = "taesd_encoder.", "taesd_decoder."  # the halves' prefixes in one combined file


@dataclass(frozen=True)
class TAESDConfig:
    latent_channels: int = 4
    channels: int = 64
    encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)  # blocks per level; each level after the first halves the size
    decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)  # each level but the last doubles it

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.encoder_blocks) - 1)


def conv(n_in: int, n_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, stride=stride, bias=bias)


class Clamp(nn.Module):
    """A soft clamp of the decoder's input to (-3, 3): latents a sampler overshot stay in the range it knows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(conv(n_in, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(), conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


def build_encoder(cfg: TAESDConfig) -> nn.Sequential:
    """[0, 1] pixels -> scaled latents, madebyollin's layer order (its state-dict keys are these indices)."""
    c, layers = cfg.channels, []
    for i, n in enumerate(cfg.encoder_blocks):
        layers.append(conv(3, c) if i == 0 else conv(c, c, stride=2, bias=False))
        layers += [Block(c, c) for _ in range(n)]
    layers.append(conv(c, cfg.latent_channels))
    return nn.Sequential(*layers)


def build_decoder(cfg: TAESDConfig) -> nn.Sequential:
    """Scaled latents -> [0, 1] pixels (unclamped), madebyollin's layer order."""
    c = cfg.channels
    layers: list[nn.Module] = [Clamp(), conv(cfg.latent_channels, c), nn.ReLU()]
    for i, n in enumerate(cfg.decoder_blocks):
        layers += [Block(c, c) for _ in range(n)]
        last = i == len(cfg.decoder_blocks) - 1
        layers += [conv(c, 3)] if last else [nn.Upsample(scale_factor=2), conv(c, c, bias=False)]
    return nn.Sequential(*layers)


class TinyAutoencoder(nn.Module):
    """TAESD: `encoder` and/or `decoder` (a file may hold only one half; the other is None)."""

    def __init__(self, cfg: TAESDConfig, encoder: bool = True, decoder: bool = True):
        super().__init__()
        self.cfg = cfg
        self.encoder = build_encoder(cfg) if encoder else None
        self.decoder = build_decoder(cfg) if decoder else None

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[-1, 1] pixels (b, 3, h, w) -> scaled latents (b, latent_channels, h / f, w / f)."""
        if self.encoder is None:
            raise ValueError("this TAESD has no encoder (its file held only the decoder)")
        return self.encoder(pixels.add(1).div(2))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents, as the pipeline holds them -> pixels in [-1, 1] (not clamped, as AutoencoderKL)."""
        if self.decoder is None:
            raise ValueError("this TAESD has no decoder (its file held only the encoder)")
        return self.decoder(latents).mul(2).sub(1)

    def halves(self) -> dict[str, dict[str, torch.Tensor]]:
        """{"encoder": madebyollin's Sequential state dict, "decoder": ...} of the halves it has."""
        return {name: m.state_dict() for name, m in (("encoder", self.encoder), ("decoder", self.decoder))
                if m is not None}


# --- reading files ------------------------------------------------------------------------------------------------

_LAYER = re.compile(r"^(\d+)\.(.+)$")


def _layers(sd: dict[str, torch.Tensor], where: str) -> dict[int, dict[str, torch.Tensor]]:
    """Sequential state dict -> {index: {rest of key: tensor}}; any other key is an error."""
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        m = _LAYER.match(key)
        if not m:
            raise CheckpointError(f"{where}: unexpected key {key!r} in a TAESD layer list")
        layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
    return layers


def _runs(layers: dict[int, dict[str, torch.Tensor]], start: int) -> tuple[list[int], list[int]]:
    """From layer `start` on: the conv layers' indices and the number of blocks after each conv."""
    convs, blocks = [], []
    for i in sorted(k for k in layers if k >= start):
        if "conv.0.weight" in layers[i]:
            if not blocks:
                raise ValueError("a block before the first convolution")
            blocks[-1] += 1
        elif "weight" in layers[i]:
            convs.append(i)
            blocks.append(0)
        else:
            raise ValueError(f"layer {i} is neither a convolution nor a block")
    return convs, blocks


def _infer(half: str, sd: dict[str, torch.Tensor], where: str) -> TAESDConfig:
    """The config of one half from its Sequential weights (checked fully by the strict load that follows)."""
    try:
        layers = _layers(sd, where)
        if half == "encoder":
            convs, blocks = _runs(layers, 0)
            if len(convs) < 2 or blocks[-1] != 0:
                raise ValueError("no final latent convolution")
            first, last = layers[convs[0]]["weight"], layers[convs[-1]]["weight"]
            return TAESDConfig(latent_channels=last.shape[0], channels=first.shape[0],
                               encoder_blocks=tuple(blocks[:-1]), decoder_blocks=tuple(reversed(blocks[:-1])))
        convs, blocks = _runs(layers, 1)
        if len(convs) < 2 or blocks[-1] != 0 or layers[convs[-1]]["weight"].shape[0] != 3:
            raise ValueError("no RGB output convolution")
        first = layers[convs[0]]["weight"]
        dec = tuple(blocks[:-1])
        return TAESDConfig(latent_channels=first.shape[1], channels=first.shape[0],
                           encoder_blocks=tuple(reversed(dec)), decoder_blocks=dec)
    except (ValueError, IndexError, KeyError) as e:
        raise CheckpointError(f"{where}: not a TAESD {half} ({e})") from None


def _half_of(sd: dict[str, torch.Tensor]) -> str:
    """'encoder' or 'decoder', from the first layer: the encoder's layer 0 is a conv from RGB, the decoder's is the
    parameterless clamp."""
    first = sd.get("0.weight")
    if first is not None and first.ndim == 4 and first.shape[1] == 3:
        return "encoder"
    if "0.weight" not in sd and "1.weight" in sd:
        return "decoder"
    return "unknown"


def _build(sds: dict[str, dict[str, torch.Tensor]], where: str,
           device: torch.device | str, dtype: torch.dtype) -> TinyAutoencoder:
    """A TinyAutoencoder from madebyollin-layout halves ({"encoder": sd, "decoder": sd}, either may be absent)."""
    cfgs = {half: _infer(half, sd, where) for half, sd in sds.items()}
    # one width for both halves (madebyollin's and diffusers' TAESDs have it); a pair of other widths is refused here
    if len({(c.latent_channels, c.downscale, c.channels) for c in cfgs.values()}) > 1:
        raise CheckpointError(f"{where}: the encoder and decoder do not fit each other "
                              f"({cfgs['encoder']} vs {cfgs['decoder']})")
    # the decoder's counts are what it decodes with; the encoder's are kept for it
    cfg = cfgs.get("decoder") or cfgs["encoder"]
    if "encoder" in cfgs:
        cfg = TAESDConfig(cfg.latent_channels, cfg.channels, cfgs["encoder"].encoder_blocks, cfg.decoder_blocks)
    with torch.device("meta"):  # no random init of weights about to be replaced
        model = TinyAutoencoder(cfg, encoder="encoder" in sds, decoder="decoder" in sds)
    for half, sd in sds.items():
        module: nn.Module = getattr(model, half)
        try:
            module.load_state_dict(sd, strict=True, assign=True)
        except RuntimeError as e:
            detail = " ".join(str(e).split())[:300]
            raise CheckpointError(f"{where}: TAESD {half} weights do not fit its layout ({detail})") from None
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def taesd_from_tensors(sd: dict[str, torch.Tensor], where: str = "tensors", device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32) -> TinyAutoencoder:
    """One file's tensors in any of the layouts this module reads (one half, both prefixed, or diffusers')."""
    if any(k.startswith(("encoder.layers.", "decoder.layers.")) for k in sd):  # diffusers' AutoencoderTiny
        halves: dict[str, dict[str, torch.Tensor]] = {"encoder": {}, "decoder": {}}
        for key, value in sd.items():
            half, _, rest = key.partition(".layers.")
            m = _LAYER.match(rest)
            if half not in halves or not m:
                raise CheckpointError(f"{where}: unexpected key {key!r} in a diffusers AutoencoderTiny")
            # diffusers' decoder has no Clamp layer (its forward clamps): its indices are madebyollin's minus one
            index = int(m.group(1)) + (half == "decoder")
            halves[half][f"{index}.{m.group(2)}"] = value
        return _build({h: s for h, s in halves.items() if s}, where, device, dtype)
    if any(k.startswith((ENCODER, DECODER)) for k in sd):
        halves = {"encoder": {}, "decoder": {}}
        for key, value in sd.items():
            if not key.startswith((ENCODER, DECODER)):
                raise CheckpointError(f"{where}: unexpected key {key!r} beside the taesd_encoder/taesd_decoder ones")
            half = "encoder" if key.startswith(ENCODER) else "decoder"
            halves[half][key[len(ENCODER):]] = value
        return _build({h: s for h, s in halves.items() if s}, where, device, dtype)
    half = _half_of(sd)
    if half == "unknown":
        raise CheckpointError(f"{where}: not a TAESD file (neither madebyollin's encoder/decoder layout nor "
                              "diffusers' AutoencoderTiny)")
    return _build({half: sd}, where, device, dtype)


def load_taesd(path: str | Path, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> TinyAutoencoder:
    """A TAESD from `path`: a file (one half, or both), a folder with madebyollin's two files (`*encoder*` and
    `*decoder*`, .safetensors preferred over .pth), or a diffusers AutoencoderTiny folder. Eval mode, frozen."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_file():
        return taesd_from_tensors(read_tensors(path)[0], str(path), device, dtype)
    if (path / "config.json").exists():
        return _load_diffusers_folder(path, device, dtype)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".pth", ".pt", ".bin"))
    for f in sorted(files, key=lambda p: p.suffix != ".safetensors"):  # .safetensors first
        sd = read_tensors(f)[0]
        half = _half_of(sd)
        if half != "unknown" and half not in halves:
            halves[half] = sd
    if not halves:
        raise CheckpointError(f"{path}: no TAESD files in this folder (madebyollin's taesd_encoder/taesd_decoder "
                              ".safetensors or .pth, or a diffusers AutoencoderTiny with config.json)")
    return _build(halves, str(path), device, dtype)


def _load_diffusers_folder(folder: Path, device: torch.device | str, dtype: torch.dtype) -> TinyAutoencoder:
    try:
        config = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{folder / 'config.json'}: invalid JSON ({e})") from None
    if config.get("_class_name", "AutoencoderTiny") != "AutoencoderTiny":
        raise CheckpointError(f"{folder}: a diffusers {config.get('_class_name')}, not an AutoencoderTiny")
    # what our fixed layers assume; anything else would load and silently compute something different
    for key, want in (("act_fn", "relu"), ("upsample_fn", "nearest"), ("upsampling_scaling_factor", 2),
                      ("scaling_factor", 1.0), ("in_channels", 3), ("out_channels", 3)):
        if config.get(key, want) != want:
            raise CheckpointError(f"{folder}: AutoencoderTiny with {key}={config[key]!r} is not supported "
                                  f"(only {want!r})")
    weights = diffusers_weights(folder)
    if weights is None:
        raise CheckpointError(f"{folder}: no {' or '.join(DIFFUSERS_WEIGHTS)}")
    model = taesd_from_tensors(read_tensors(weights)[0], str(weights), device, dtype)
    for key, have in (("num_encoder_blocks", model.cfg.encoder_blocks),
                      ("num_decoder_blocks", model.cfg.decoder_blocks), ("latent_channels", model.cfg.latent_channels)):
        want = config.get(key)
        if want is not None and (tuple(want) if isinstance(want, list) else want) != have:
            raise CheckpointError(f"{folder}: config.json says {key}={want}, the weights have {have}")
    return model


def taesd_tensors(model: TinyAutoencoder) -> dict[str, torch.Tensor]:
    """Both halves in one state dict under `taesd_encoder.` / `taesd_decoder.` (what ComfyUI reads as one file)."""
    prefix = {"encoder": ENCODER, "decoder": DECODER}
    return {prefix[h] + k: v for h, sd in model.halves().items() for k, v in sd.items()}
