"""How much memory one generation needs on top of the loaded model, from the model's config and the request's sizes.

The server checks this against the machine's available memory before a job is queued (a 422 naming the size that
would fit) instead of letting the kernel kill the process halfway through. It is a pure function of the config,
sizes and dtype: it walks the networks' blocks as nn/unet.py and nn/vae.py run them, summing the tensors alive at
each step (inputs kept for skips and residuals, a block's temporaries) and takes the largest sum. Attention adds
nothing beyond q/k/v and its output: PyTorch's fused kernels, which nn/attention.py makes sure are used, never hold
the tokens x tokens matrix (and query chunks bound it to MAX_SCORES where they might). What the walk cannot see
(convolution workspaces, the allocator's rounding, PyTorch's own buffers) is two calibrated terms, OVERHEAD and FIXED.

Measured against it (peak RSS above the post-load level in a fresh process, fp32, one thread, this project's CPU;
19 cases: the shipped model and the TINY test model, guided UNet evaluations, VAE decodes and encodes, 1-step
txt2img runs, 256² to 1024², batch 1 and 2): measured / estimated was 0.48-1.27, and 0.69-1.01 where the peak was
over 200 MB; the shipped model's 1024² txt2img took 1.63 GiB for 1.83 GiB estimated (tests/test_reliability.py
checks five of the faster cases). The estimate errs high where it matters; GPUs (cuDNN workspaces, the caching
allocator) were not measured.
"""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import torch

from .config import ModelConfig, UNetConfig, VAEConfig

# What the walk does not see, fitted to the measurements above: per tensor (convolution workspaces and reordered
# copies on a CPU, allocator rounding and heap fragmentation) and per job (thread pools, kernel caches, prompts).
OVERHEAD = 1.6
FIXED = 32 << 20


@dataclass(frozen=True)
class Estimate:
    """Bytes of working memory for each part of a generation; `peak` is what the request needs at once."""

    unet: int  # one guided UNet evaluation at the output size (cond and uncond batched together)
    decode: int  # the VAE decode of the whole batch at the output size
    encode: int  # the VAE encode of an init image (img2img), else 0
    preview: int  # a live preview (one image decoded) while the UNet runs, else 0

    @property
    def peak(self) -> int:
        return max(self.unet + self.preview, self.decode, self.encode) + FIXED


def _resblock(c_in: int, c_out: int, norm_extra: int = 0) -> int:
    """Elements (per pixel and image) alive at a residual block's worst step: its input kept for the skip plus
    norm -> silu -> conv temporaries (nn.Sequential frees each one as the next layer returns)."""
    return max(3 * c_in, 2 * c_in + c_out, c_in + 3 * c_out) + norm_extra * max(c_in, c_out)


def _transformer(c: int, depth: int) -> int:
    """A SpatialTransformer on c channels: the residual and the block input kept, and the feed-forward's worst step
    (norm, GEGLU's 8c projection, gelu(gate) and the product); q/k/v and attention outputs (about 7c) stay below."""
    return 20 * c if depth else 0


def unet_bytes(cfg: UNetConfig, latent_h: int, latent_w: int, batch: int, element: int) -> int:
    """Working memory of one UNet evaluation on `batch` latents (pass 2x the images for classifier-free guidance)."""
    # GroupNorm32 computes in fp32: in half precision each norm makes an fp32 copy and an fp32 output
    norm_extra = 0 if element >= 4 else 2 * 4 // element
    skips: list[int] = []  # elements of each kept skip, per image
    peak = 0
    h, w = latent_h, latent_w
    ch = cfg.model_channels
    skips.append(ch * h * w)
    ds, levels = 1, len(cfg.channel_mult)
    depths = cfg.transformer_depth if isinstance(cfg.transformer_depth, tuple) else (cfg.transformer_depth,) * levels
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks[level]):
            out = mult * cfg.model_channels
            block = _resblock(ch, out, norm_extra)
            if ds in cfg.attention_resolutions:
                block = max(block, out + _transformer(out, depths[level]))
            peak = max(peak, sum(skips) + block * h * w)
            ch = out
            skips.append(ch * h * w)
        if level != levels - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
            skips.append(ch * h * w)
            ds *= 2
    middle = max(_resblock(ch, ch, norm_extra), ch + _transformer(ch, cfg.transformer_depth_middle or 0))
    peak = max(peak, sum(skips) + middle * h * w)
    for level, mult in reversed(list(enumerate(cfg.channel_mult))):
        for i in range(cfg.num_res_blocks[level] + 1):
            skip = skips.pop()
            out = mult * cfg.model_channels
            c_in = ch + skip // (h * w)
            # torch.cat([h, skip]) makes a copy: both inputs and the result alive, then the block on the result
            block = max(ch + c_in, _resblock(c_in, out, norm_extra))
            if ds in cfg.attention_resolutions:
                block = max(block, out + _transformer(out, depths[level]))
            ch = out
            peak = max(peak, sum(skips) + block * h * w)
            if level and i == cfg.num_res_blocks[level]:  # upsample: nearest 2x, then a convolution
                h, w = h * 2, w * 2
                ds //= 2
                peak = max(peak, sum(skips) + 9 * ch * h * w // 4)  # input (a quarter), interpolated, conv output
    return int(peak * batch * element * OVERHEAD)


def vae_decode_bytes(cfg: VAEConfig, height: int, width: int, batch: int, element: int) -> int:
    """Working memory of decoding `batch` latents to height x width pixels (the decoder runs from the deepest level)."""
    f = cfg.downscale
    h, w = math.ceil(height / f), math.ceil(width / f)
    top = cfg.ch * cfg.ch_mult[-1]
    # mid block: resnet blocks, and single-head attention over all pixels with contiguous q/k/v copies (9c)
    peak = max(_resblock(top, top), 9 * top) * h * w
    c_in = top
    for i in reversed(range(len(cfg.ch_mult))):
        c_out = cfg.ch * cfg.ch_mult[i]
        for j in range(cfg.num_res_blocks + 1):
            peak = max(peak, _resblock(c_in if j == 0 else c_out, c_out) * h * w)
        c_in = c_out
        if i:
            h, w = h * 2, w * 2
            peak = max(peak, 9 * c_out * h * w // 4)  # the level's output, interpolated, convolved
    peak = max(peak, 3 * c_in * h * w)  # norm_out, silu, conv_out at full size
    return int(peak * batch * element * OVERHEAD)


def vae_encode_bytes(cfg: VAEConfig, height: int, width: int, batch: int, element: int) -> int:
    """Working memory of encoding `batch` images (the pipeline encodes one image at a time: pass 1)."""
    h, w = height, width
    c_in = cfg.ch
    peak = (3 + cfg.ch) * h * w
    for i, mult in enumerate(cfg.ch_mult):
        c_out = cfg.ch * mult
        for j in range(cfg.num_res_blocks):
            peak = max(peak, _resblock(c_in if j == 0 else c_out, c_out) * h * w)
            c_in = c_out
        if i != len(cfg.ch_mult) - 1:  # pad (a copy), then a strided convolution
            peak = max(peak, 2 * c_out * h * w + c_out * (h // 2) * (w // 2))
            h, w = (h + 1) // 2, (w + 1) // 2
    peak = max(peak, max(_resblock(c_in, c_in), 9 * c_in) * h * w)
    return int(peak * batch * element * OVERHEAD)


DEFAULT_VAE_TILE = 512  # vae_tiling's tile side in pixels (diffusers' for SD1.x/2.x)


def tiled_decode_bytes(cfg: VAEConfig, height: int, width: int, batch: int, element: int,
                       tile: int = DEFAULT_VAE_TILE) -> int:
    """Working memory of vae_tiling.decode_tiled: one tile of one image, plus the output and the
    row of decoded tiles kept for blending (in the decoder's dtype)."""
    f = cfg.downscale
    h, w = math.ceil(height / f) * f, math.ceil(width / f) * f
    one_tile = vae_decode_bytes(cfg, min(tile, h), min(tile, w), 1, element)
    outputs = batch * h * w * (2 if batch > 1 else 1)  # a batch's per-image results, then their concatenation
    kept = (outputs + 2 * tile * w) * cfg.out_ch * element  # the output, the row above and this row
    return one_tile + int(kept * OVERHEAD)


def estimate(config: ModelConfig, width: int, height: int, batch: int = 1, dtype: torch.dtype = torch.float32, *,
             guidance: bool = True, img2img: bool = False, previews: bool = False,
             vae_tiling: bool | None = None) -> Estimate:
    """Working memory of generating `batch` images of width x height (the final size: the hires fix's second pass
    is the larger one) with this model in `dtype`; the model's own weights are not included.

    guidance: classifier-free guidance (the UNet sees 2 x batch). img2img: init images are encoded (one at a time,
    at the output size). previews: a one-image decode may run beside the UNet (the server's live previews).
    vae_tiling: the request's (None: automatic, so the smaller of the tiled and untiled decodes)."""
    element = torch.finfo(dtype).bits // 8
    f = config.vae.downscale
    unet = unet_bytes(config.unet, math.ceil(height / f), math.ceil(width / f), batch * (2 if guidance else 1),
                      element)
    decode = vae_decode_bytes(config.vae, height, width, batch, element)
    if vae_tiling is not False and max(height, width) > DEFAULT_VAE_TILE:  # within one tile nothing is tiled
        # forced, or automatic: decoding.py tiles whenever the untiled pass would not fit
        tiled = tiled_decode_bytes(config.vae, height, width, batch, element)
        decode = tiled if vae_tiling else min(decode, tiled)
    encode = vae_encode_bytes(config.vae, height, width, 1, element) if img2img else 0
    preview = vae_decode_bytes(config.vae, height, width, 1, element) if previews else 0
    return Estimate(unet=unet, decode=decode, encode=encode, preview=preview)


def available_bytes(device: torch.device) -> int | None:
    """Memory this process could still take: on CUDA the GPU's free memory plus what PyTorch holds unused in its
    cache, on a Linux CPU MemAvailable; None where it is not known (then nothing is checked)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 + heap_free_bytes()
    except OSError:
        return None
    return None


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_free_bytes() -> int:
    """Memory freed inside this process that malloc keeps for reuse (glibc's mallinfo2 fordblks; 0 elsewhere).
    The server keeps freed memory (cpu_memory.py), so after a big job its heap holds what the next one reuses:
    MemAvailable alone would count it as gone and refuse the same request twice."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2  # glibc >= 2.33
    except (OSError, AttributeError):
        return 0
    mallinfo2.restype = _MallInfo2
    return int(mallinfo2().fordblks)


def readable(n: int) -> str:
    return f"{n / (1 << 30):.1f} GB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MB"


def refusal(config: ModelConfig, width: int, height: int, batch: int, dtype: torch.dtype, device: torch.device,
            **options: bool) -> str | None:
    """Why a generation does not fit in the memory available now, naming a batch or a size that would; None when
    it fits or the available memory is unknown. options: estimate()'s guidance / img2img / previews."""
    available = available_bytes(device)
    if available is None:
        return None
    need = estimate(config, width, height, batch, dtype, **options).peak
    if need <= available:
        return None
    what = f"{width}x{height}" + (f" with batch_size {batch}" if batch > 1 else "")
    fits = next((b for b in range(batch - 1, 0, -1)
                 if estimate(config, width, height, b, dtype, **options).peak <= available), None)
    if fits is not None:
        hint = f"batch_size {fits} fits"
    else:  # the same aspect ratio at batch 1, shrunk until it fits (memory grows about as the pixels)
        scale, hint = math.sqrt(available / need), "no size fits"
        while scale * max(width, height) >= 8:
            w, h = (max(8, int(d * scale) // 8 * 8) for d in (width, height))
            if estimate(config, w, h, 1, dtype, **options).peak <= available:
                hint = f"{w}x{h} fits"
                break
            scale *= 0.9
    return f"{what} needs about {readable(need)} of memory and {readable(available)} is available now; {hint}"
