"""Token merging for Stable Diffusion (Bolya & Hoffman 2023, "Token Merging for Fast Stable Diffusion"; the tomesd
package's algorithm and defaults): in the transformer blocks at the full latent resolution, half the tokens are
merged into their most similar partners before self-attention and copied back after it, so attention's cost
(quadratic in tokens) and its projections' fall.

Matching is tomesd's random 2D bipartite soft matching: the latents are cut into sx x sy cells, one token of each
cell (drawn at random) is a destination, the rest are sources; the r = ratio x tokens sources most similar (cosine,
on the block's input) to some destination are averaged into it. tomesd forks its generator from torch's global
RNG state on first use; here the draws come from a generator seeded with `seed` when the patch is applied, so a
run is deterministic and leaves the global RNG alone (the same draws as tomesd given the same generator state).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..nn.attention import BasicTransformerBlock

Merge = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def bipartite_soft_matching_2d(metric: torch.Tensor, w: int, h: int, sx: int, sy: int, r: int,
                               generator: torch.Generator | None) -> tuple[Merge, Merge]:
    """(merge, unmerge) for tokens (b, h*w, c) laid out row-major on an h x w grid; r sources merged.
    generator None: the destination is each cell's top-left token (tomesd's no_rand)."""
    b, n, _ = metric.shape
    if r <= 0:
        return _identity, _identity
    device = metric.device
    with torch.no_grad():
        hsy, wsx = h // sy, w // sx
        if generator is None:
            pick = torch.zeros(hsy, wsx, 1, dtype=torch.int64, device=device)
        else:
            pick = torch.randint(sy * sx, size=(hsy, wsx, 1), generator=generator, device=generator.device).to(device)
        # -1 marks each cell's destination, 0 its sources; a stable argsort then lists destinations first
        cells = torch.zeros(hsy, wsx, sy * sx, dtype=torch.int64, device=device)
        cells.scatter_(2, pick, -torch.ones_like(pick))
        cells = cells.view(hsy, wsx, sy, sx).transpose(1, 2).reshape(hsy * sy, wsx * sx)
        if hsy * sy < h or wsx * sx < w:  # rows/columns outside whole cells stay sources
            grid = torch.zeros(h, w, dtype=torch.int64, device=device)
            grid[:hsy * sy, :wsx * sx] = cells
            cells = grid
        order = cells.reshape(1, -1, 1).argsort(dim=1)
        num_dst = hsy * wsx
        a_idx, b_idx = order[:, num_dst:, :], order[:, :num_dst, :]

        def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            c = x.shape[-1]
            return (torch.gather(x, 1, a_idx.expand(x.shape[0], n - num_dst, c)),
                    torch.gather(x, 1, b_idx.expand(x.shape[0], num_dst, c)))

        unit = metric / metric.norm(dim=-1, keepdim=True)
        a, bb = split(unit)
        scores = a @ bb.transpose(-1, -2)
        r = min(a.shape[1], r)
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
        dst_idx = torch.gather(node_idx[..., None], -2, src_idx)

    def merge(x: torch.Tensor) -> torch.Tensor:
        src, dst = split(x)
        nb, t1, c = src.shape
        unm = torch.gather(src, -2, unm_idx.expand(nb, t1 - r, c))
        src = torch.gather(src, -2, src_idx.expand(nb, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(nb, r, c), src, reduce="mean")
        return torch.cat([unm, dst], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        unm_len = unm_idx.shape[1]
        unm, dst = x[..., :unm_len, :], x[..., unm_len:, :]
        c = unm.shape[-1]
        src = torch.gather(dst, -2, dst_idx.expand(b, r, c))
        out = torch.zeros(b, n, c, device=x.device, dtype=x.dtype)
        out.scatter_(-2, b_idx.expand(b, num_dst, c), dst)
        a_all = a_idx.expand(b, a_idx.shape[1], 1)
        out.scatter_(-2, torch.gather(a_all, 1, unm_idx).expand(b, unm_len, c), unm)
        out.scatter_(-2, torch.gather(a_all, 1, src_idx).expand(b, r, c), src)
        return out

    return merge, unmerge


@dataclass
class ToMeSettings:
    """tomesd's apply_patch arguments, its defaults."""

    ratio: float = 0.5
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    seed: int = 0
    size: tuple[int, int] = (0, 0)  # the latents' (h, w) of the UNet call under way
    generator: torch.Generator | None = field(default=None, repr=False)
    merged_calls: int = 0  # blocks that merged tokens (for tests and reports)

    def check(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"token merging ratio must be in [0, 1), got {self.ratio}")
        if self.max_downsample not in (1, 2, 4, 8):
            raise ValueError(f"max_downsample must be 1, 2, 4 or 8, got {self.max_downsample}")
        if self.sx < 1 or self.sy < 1:
            raise ValueError(f"sx and sy must be >= 1, got {self.sx}, {self.sy}")

    def merges(self, x: torch.Tensor) -> tuple[Merge, Merge]:
        """(merge, unmerge) for a block's input x (b, tokens, c), as tomesd's compute_merge chooses."""
        oh, ow = self.size
        downsample = int(math.ceil(math.sqrt(oh * ow // x.shape[1])))
        if downsample > self.max_downsample:
            return _identity, _identity
        w, h = int(math.ceil(ow / downsample)), int(math.ceil(oh / downsample))
        r = int(x.shape[1] * self.ratio)
        if r > 0:
            self.merged_calls += 1
        if self.generator is None or self.generator.device != x.device:
            self.generator = torch.Generator(x.device).manual_seed(self.seed)
        # an odd batch cannot hold guidance's two halves together: random destinations would differ between
        # them and show as artifacts (tomesd forces them off then too)
        rand = self.use_rand and x.shape[0] % 2 == 0
        return bipartite_soft_matching_2d(x, w, h, self.sx, self.sy, r, self.generator if rand else None)


def _tome_forward(block: BasicTransformerBlock, settings: ToMeSettings
                  ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """BasicTransformerBlock.forward with merging around attn1 (and attn2 / ff when asked), as tomesd's ToMeBlock."""
    def forward(x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        m, u = settings.merges(x)
        ma, ua = (m, u) if settings.merge_attn else (_identity, _identity)
        mc, uc = (m, u) if settings.merge_crossattn else (_identity, _identity)
        mm, um = (m, u) if settings.merge_mlp else (_identity, _identity)
        # x first, as the block adds: the sum takes x's memory layout, so the layers after see the same strides
        # and ratio 0 stays bit for bit the plain block
        x = x + ua(block.attn1(ma(block.norm1(x))))
        x = x + uc(block.attn2(mc(block.norm2(x)), context))
        return x + um(block.ff(mm(block.norm3(x))))

    return forward


@contextmanager
def token_merging(unet: nn.Module, ratio: float = 0.5, *, max_downsample: int = 1, sx: int = 2, sy: int = 2,
                  use_rand: bool = True, merge_attn: bool = True, merge_crossattn: bool = False,
                  merge_mlp: bool = False, seed: int = 0) -> Iterator[ToMeSettings]:
    """ToMe on `unet`'s transformer blocks (patched in place; restored on exit). The UNet's first input block
    tells the latent size of each call (it runs in every call, DeepCache's partial ones included). Patching
    changes the shared model: do not run other requests on it meanwhile."""
    settings = ToMeSettings(ratio, max_downsample, sx, sy, use_rand, merge_attn, merge_crossattn, merge_mlp, seed)
    settings.check()
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    if not blocks:
        raise ValueError("token merging: this model has no transformer blocks")
    if any("forward" in vars(b) for b in blocks):
        raise RuntimeError("token merging: the blocks are already patched (nested token_merging?)")
    first = getattr(unet, "input_blocks", None)
    if first is None:
        raise ValueError("token merging needs sdengine's UNetModel (its input_blocks tell the latent size)")

    def record_size(_module: nn.Module, args: tuple) -> None:
        settings.size = tuple(args[0].shape[-2:])  # type: ignore[assignment]

    handle = first[0].register_forward_pre_hook(record_size)
    try:
        for b in blocks:
            b.forward = _tome_forward(b, settings)  # type: ignore[method-assign]
        yield settings
    finally:
        handle.remove()
        for b in blocks:
            vars(b).pop("forward", None)
