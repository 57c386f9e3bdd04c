"""Opt-in accelerations, each trading a measured bit of quality for speed (benchmarks/accel_quality.py):

  deepcache      reuse the UNet's deep features between steps (deepcache.py)
  token_merging  ToMe: merge similar tokens before self-attention at full resolution (tome.py)
  CFG skipping   the last steps without guidance's unconditional half (CFGDenoiser's guidance_until)

`Accelerations` is what a request asks for; `accelerated` switches it on around one sampling pass.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from ..diffusion.denoiser import CFGDenoiser, Denoiser
from ..nn.unet import UNetModel
from .deepcache import DeepCacheUNet, deepcache, nonuniform_steps
from .tome import ToMeSettings, bipartite_soft_matching_2d, token_merging


@dataclass(frozen=True)
class Accelerations:
    """deepcache: a full UNet call every N steps (0 or 1: off); deepcache_branch: its skip branch (0 = shallowest);
    tome: the token merging ratio (0: off); cfg_skip: the last k steps run without guidance (0: off)."""

    deepcache: int = 0
    deepcache_branch: int = 0
    tome: float = 0.0
    cfg_skip: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.deepcache, int) or self.deepcache < 0:
            raise ValueError(f"deepcache interval must be an integer >= 0 (0: off), got {self.deepcache!r}")
        if not isinstance(self.deepcache_branch, int) or self.deepcache_branch < 0:
            raise ValueError(f"deepcache branch must be an integer >= 0, got {self.deepcache_branch!r}")
        if not 0.0 <= self.tome < 1.0:
            raise ValueError(f"token merging ratio must be in [0, 1) (0: off), got {self.tome!r}")
        if not isinstance(self.cfg_skip, int) or self.cfg_skip < 0:
            raise ValueError(f"cfg skip must be a number of steps >= 0 (0: off), got {self.cfg_skip!r}")

    @property
    def any(self) -> bool:
        return self.deepcache > 1 or self.tome > 0 or self.cfg_skip > 0

    def infotext_fields(self) -> dict[str, Any]:
        """The PNG parameters that say which accelerations made an image (none when off)."""
        fields: dict[str, Any] = {}
        if self.deepcache > 1:
            fields["DeepCache interval"] = self.deepcache
            fields["DeepCache branch"] = self.deepcache_branch
        if self.tome > 0:
            fields["Token merging ratio"] = self.tome  # A1111's own key for ToMe
        if self.cfg_skip > 0:
            fields["CFG skip last steps"] = self.cfg_skip
        return fields


def accelerate_denoiser(guided: CFGDenoiser, settings: Accelerations, end_step: int) -> Callable[[], None]:
    """The per-pass accelerations (DeepCache, CFG skipping) set on `guided`, a CFGDenoiser built for one sampling
    pass whose steps run up to `end_step` (exclusive, counted as guided.step counts them: len(sigmas) - 1 from
    step 0). Returns the function that undoes them. Token merging, which patches the shared UNet, is not here."""
    denoiser = guided.denoiser
    undo: list[Callable[[], None]] = []
    if settings.deepcache > 1:
        unet = denoiser.unet
        if not isinstance(unet, UNetModel):
            raise ValueError(f"DeepCache needs sdengine's UNetModel, not {type(unet).__name__}")
        cached = DeepCacheUNet(unet, settings.deepcache, settings.deepcache_branch)
        cached.set_step(guided.step)
        guided.denoiser = Denoiser(cached, denoiser.schedule, denoiser.prediction)
        guided.step_listeners.append(cached.set_step)
        undo += [lambda: guided.step_listeners.remove(cached.set_step), lambda: setattr(guided, "denoiser", denoiser)]
    if settings.cfg_skip > 0:
        before = guided.guidance_until
        guided.guidance_until = max(0, end_step - settings.cfg_skip)
        undo.append(lambda: setattr(guided, "guidance_until", before))

    def restore() -> None:
        for f in reversed(undo):
            f()

    return restore


@contextmanager
def accelerated(guided: CFGDenoiser, settings: Accelerations, end_step: int, tome_seed: int = 0
                ) -> Iterator[CFGDenoiser]:
    """`guided` with `settings` switched on for one sampling pass (see accelerate_denoiser), restored on exit.
    Token merging patches the UNet in place for the duration: the model serves no other request meanwhile."""
    with ExitStack() as stack:
        if settings.tome > 0:
            unet = guided.denoiser.unet
            if not isinstance(unet, UNetModel):
                raise ValueError(f"token merging needs sdengine's UNetModel, not {type(unet).__name__}")
            stack.enter_context(token_merging(unet, settings.tome, seed=tome_seed))
        stack.callback(accelerate_denoiser(guided, settings, end_step))
        yield guided


__all__ = ["Accelerations", "DeepCacheUNet", "ToMeSettings", "accelerate_denoiser", "accelerated",
           "bipartite_soft_matching_2d", "deepcache", "nonuniform_steps", "token_merging"]
