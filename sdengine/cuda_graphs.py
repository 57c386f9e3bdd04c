"""CUDA graphs for the UNet: each input shape's forward captured once, then replayed (`use_cuda_graphs`).

Why: at 512x512 and batch 1 on a fast GPU, an SD1.5 UNet call is ~1,000 kernel launches of a few microseconds of
work each, so the host's Python and launch overhead, not the GPU, sets the step time. A captured graph launches
them all in one call. It composes with `compile.compile_unet`: the compiled forward (inductor's default mode,
which launches no graphs itself) is what gets captured, so no second compilation is paid, as
torch.compile(mode="reduce-overhead") would.

Each call is keyed by its tensors' shapes, dtypes and devices; a new key is captured (a few warm-up calls on a
side stream, then the capture), a known one replays on copies of the arguments into the graph's static inputs.
Calls with arguments other than tensors (ControlNet residual lists, ...) run the wrapped forward as it is.
`graphs=False` keeps the static-buffer plumbing without capturing: the same code path on a CPU, for tests.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .model import StableDiffusion

Key = tuple[Any, ...]


def call_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Key | None:
    """What identifies a captured graph: each argument's (shape, dtype, device), kwargs by name; None when an
    argument is not a tensor (or None), since a graph cannot take it."""
    key: list[Any] = []
    for name, value in [(None, a) for a in args] + sorted(kwargs.items()):
        if value is None:
            key.append((name, None))
        elif isinstance(value, torch.Tensor):
            key.append((name, tuple(value.shape), value.dtype, value.device))
        else:
            return None
    return tuple(key)


class _Captured:
    """One shape's static inputs, its graph (or none, with graphs=False) and its static output."""

    def __init__(self, fn: Callable[..., torch.Tensor], args: tuple[Any, ...], kwargs: dict[str, Any],
                 graphs: bool, warmup: int) -> None:
        self.fn, self.graphs = fn, graphs
        self.args = tuple(None if a is None else a.clone() for a in args)
        self.kwargs = {k: None if v is None else v.clone() for k, v in kwargs.items()}
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None
        if not graphs:
            return
        # Warm-up on a side stream, as torch.cuda.graphs asks: lazy initialisation (cuBLAS handles, inductor's
        # first-call freezing and autotuning) must not happen inside the capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(*self.args, **self.kwargs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # its own memory pool: shapes may replay in any order
            self.output = fn(*self.args, **self.kwargs)

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        for static, value in zip(self.args, args):
            if static is not None:
                static.copy_(value)
        for name, value in kwargs.items():
            if value is not None:
                self.kwargs[name].copy_(value)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.output = self.fn(*self.args, **self.kwargs)
        # a copy: the next replay overwrites the static output, and samplers keep earlier steps' outputs
        assert self.output is not None
        return self.output.clone()


class GraphedForward:
    """A forward replaced by per-shape CUDA graphs; `captures` counts the shapes captured (for tests and logs)."""

    def __init__(self, fn: Callable[..., torch.Tensor], graphs: bool, warmup: int = 2) -> None:
        self.fn, self.graphs, self.warmup = fn, graphs, warmup
        self.cache: dict[Key, _Captured] = {}
        self.passed_through = 0

    @property
    def captures(self) -> int:
        return len(self.cache)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        key = call_key(args, kwargs)
        if key is None or torch.is_grad_enabled():  # graphs hold no autograd history: training runs as it is
            self.passed_through += 1
            return self.fn(*args, **kwargs)
        captured = self.cache.get(key)
        if captured is None:
            captured = self.cache[key] = _Captured(self.fn, args, kwargs, self.graphs, self.warmup)
        return captured(args, kwargs)


def use_cuda_graphs(model: StableDiffusion, graphs: bool = True, warmup: int = 2) -> GraphedForward:
    """Replace the UNet's forward (compiled or not) by per-shape CUDA graphs, in place; returns the wrapper.

    Load or change weights first: a graph replays the kernels it captured, on the tensors it captured. The UNet
    must stay on its device. graphs=False: the same static buffers without capturing (any device). A second call
    returns the wrapper already in place."""
    unet = model.unet
    if isinstance(unet.forward, GraphedForward):
        return unet.forward
    if graphs and (model.device.type != "cuda" or not torch.cuda.is_available()):
        raise ValueError(f"CUDA graphs need the model on a CUDA device; it is on {model.device}")
    wrapper = GraphedForward(unet.forward, graphs, warmup)
    unet.forward = wrapper
    return wrapper


__all__ = ["GraphedForward", "call_key", "use_cuda_graphs"]
