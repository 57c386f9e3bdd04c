"""OpenVINO runs the UNet on a CPU (`--compile openvino`; `compile_unet(model, backend="openvino")`).

Why: on this project's 2-core Zen4 (AVX512-BF16), an SD1.5-shape guided UNet step at 512² in bf16 takes 3.65 s in
PyTorch and 2.22 s through OpenVINO's CPU plugin (1.65x; TorchInductor with freezing: 3.51 s, 1.04x), and the
shipped model's UNet at eval batch runs 1.8x faster (benchmarks/compile_step.py). The attention kernel is no
faster there (benchmarks/attention_cpu.py); the convolutions, linears and the fused elementwise work around them
are. The price: converting the UNet on the first call of each input shape (seconds for the shipped model, about a
minute for SD1.5 at 512² on 2 cores) and bf16 rounding in more places than PyTorch's (the softmax and norms).

How: for each input signature (the shapes and dtypes of x, timesteps, context and y) the UNet is traced by
`openvino.convert_model` in its own dtype and compiled for the CPU plugin with that shape fixed (a static shape
runs ~1.3x faster than one dynamic graph, and tracing fixes Python-level shape arithmetic anyway), in bf16 when the
model runs in bf16, else f32, on torch's thread count. The weights become constants of the compiled graph: when any
UNet parameter changes in place (a LoRA merged or removed, new weights loaded) the graphs are dropped and the next
call converts again. Converted graphs are kept on disk ($SDENGINE_HOME/cache/openvino, the CACHE_ENTRIES most
recently used): a later process with the same weights (a SHA-256 of every UNet tensor), input shapes, network code,
torch and openvino releases reads one in a fraction of a second instead of tracing for up to a minute; an unwritable
or full disk costs a warning, never the image. Calls the graph does not hold run PyTorch's forward unchanged:
ControlNet residuals or T2I-Adapter features, gradients enabled, a device other than the CPU, an IP-Adapter term in
an attention, and any module patched or hooked (token merging, DeepCache's full calls). `fallbacks` counts them.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .home import sdengine_home
from .nn.attention import CrossAttention

if TYPE_CHECKING:
    from .model import StableDiffusion

Key = tuple[Any, ...]
MAX_GRAPHS = 2  # compiled shapes kept (each holds its own packed copy of the weights); the least used goes first
CACHE_ENTRIES = 4  # converted graphs kept on disk (an SD1.5 UNet's is ~1.7 GB in bf16)


def cache_dir() -> Path:
    return sdengine_home() / "cache" / "openvino"


def weights_digest(unet: nn.Module) -> str:
    """SHA-256 of every parameter and buffer, names and shapes included (~1 s for an SD1.5 UNet)."""
    h = hashlib.sha256()
    for name, t in unet.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _code_digest() -> str:
    """The network code the graph was traced from, and the releases that traced and converted it."""
    import openvino

    h = hashlib.sha256(f"{torch.__version__} {openvino.__version__}".encode())
    for path in sorted((Path(__file__).parent / "nn").glob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()


def openvino_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def _ov_tensor(t: torch.Tensor) -> Any:
    """A tensor OpenVINO reads in place (numpy has no bf16: its bits travel as int16, typed bf16 for OpenVINO)."""
    import openvino

    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return openvino.Tensor(t.view(torch.int16).numpy(), openvino.Shape(list(t.shape)), openvino.Type.bf16)
    return openvino.Tensor(t.numpy(), shared_memory=True)


class _Traced(nn.Module):
    """What the converter traces: the UNet's own forward (its instance attribute is the wrapper)."""

    def __init__(self, unet: nn.Module, fn: Callable[..., torch.Tensor]):
        super().__init__()
        self.unet, self.fn = unet, fn

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.fn(*args)


class _Graph:
    """One input signature's compiled UNet and its infer request; writes its output into a fresh torch tensor."""

    def __init__(self, traced: _Traced, args: tuple[torch.Tensor, ...], dtype: torch.dtype, cached: Path | None):
        import openvino

        self.converted = False
        model = _read_cached(cached)
        if model is None:
            with torch.no_grad(), warnings.catch_warnings():  # the tracer's notes on shapes taken as constants:
                warnings.simplefilter("ignore")  # meant here, since each graph has one fixed input shape
                model = openvino.convert_model(traced, example_input=args)
            for port, arg in zip(model.inputs, args):
                port.get_node().set_partial_shape(openvino.PartialShape(list(arg.shape)))
            model.validate_nodes_and_infer_types()
            self.converted = True
            _write_cached(model, cached)
        config = {"INFERENCE_PRECISION_HINT": "bf16" if dtype == torch.bfloat16 else "f32",
                  "INFERENCE_NUM_THREADS": torch.get_num_threads()}
        self.compiled = openvino.Core().compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.out_shape = tuple(self.compiled.output(0).get_shape())
        self.dtype = dtype

    def __call__(self, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        out = torch.empty(self.out_shape, dtype=self.dtype)
        self.request.set_output_tensor(0, _ov_tensor(out))
        self.request.infer([_ov_tensor(a) for a in args])
        return out


def _read_cached(path: Path | None) -> Any:
    if path is None or not path.exists() or not path.with_suffix(".bin").exists():
        return None
    import openvino

    try:
        model = openvino.Core().read_model(str(path))
    except Exception as e:  # a damaged entry: convert again (and overwrite it)
        warnings.warn(f"OpenVINO cache entry {path} unreadable ({e}); converting again", stacklevel=3)
        return None
    os.utime(path)  # most recently used
    return model


def _write_cached(model: Any, path: Path | None) -> None:
    """Save the converted graph atomically (both files under temporary names, then renamed, the .xml last: an
    entry exists only whole), then drop the least recently used entries beyond CACHE_ENTRIES."""
    if path is None:
        return
    import openvino

    tmp = path.with_name(f".{path.stem}.{os.getpid()}.xml")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        openvino.save_model(model, str(tmp), compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(tmp, path)
        entries = sorted(path.parent.glob("*.xml"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in entries[CACHE_ENTRIES:]:
            old.with_suffix(".bin").unlink(missing_ok=True)
            old.unlink(missing_ok=True)
    except OSError as e:  # a read-only or full disk: this process keeps its graph, later ones convert again
        warnings.warn(f"could not keep the OpenVINO graph in {path.parent}: {e}", stacklevel=3)
        for leftover in (tmp, tmp.with_suffix(".bin")):
            with contextlib.suppress(OSError):
                leftover.unlink(missing_ok=True)


class OpenVINOForward:
    """The UNet's forward through OpenVINO where the call allows it (see the module's docstring)."""

    def __init__(self, unet: nn.Module, fn: Callable[..., torch.Tensor], cache: bool = True):
        self.unet, self.fn, self.cache = unet, fn, cache
        self.reads = 0  # graphs read from the disk cache rather than converted
        self.graphs: OrderedDict[Key, _Graph] = OrderedDict()
        self.conversions = 0
        self.fallbacks = 0
        self._weights_version: tuple[int, float] | None = None
        self._digest: str | None = None  # weights_digest of the weights the graphs hold, computed when needed
        self._traced = _Traced(unet, fn)
        self._modules = [m for m in unet.modules() if m is not unet]  # the UNet's own forward is this wrapper
        self._attention = [m for m in self._modules if isinstance(m, CrossAttention)]

    def _weights_changed(self) -> bool:
        """Whether a parameter changed since the last call: the version counters of in-place updates, and for
        inference tensors (made under torch.inference_mode, which keeps no counter) a sum over a sample."""
        version, sampled = 0, []
        for p in self.unet.parameters():
            if p.is_inference():
                sampled.append(p.detach().reshape(-1)[::max(1, p.numel() // 16)].float().sum())
            else:
                version += p._version
        state = (version, float(torch.stack(sampled).sum()) if sampled else 0.0)
        changed = state != self._weights_version
        self._weights_version = state
        return changed

    def _cache_path(self, key: Key) -> Path | None:
        if not self.cache:
            return None
        if self._digest is None:
            self._digest = weights_digest(self.unet)
        name = hashlib.sha256(f"{self._digest} {key} {_code_digest()}".encode()).hexdigest()[:32]
        return cache_dir() / f"{name}.xml"

    def _plain(self) -> bool:
        """No module patched or hooked, no IP-Adapter term: the UNet computes what was converted."""
        if any(a.extra for a in self._attention):
            return False
        from torch.nn.modules import module as torch_module

        if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
            return False
        unet = self.unet
        if vars(unet).get("forward") is not self:  # someone replaced the forward after this wrapper
            return False
        return not any("forward" in vars(m) or m._forward_hooks or m._forward_pre_hooks for m in self._modules)

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                 y: torch.Tensor | None = None, control: list[torch.Tensor] | None = None,
                 adapter: list[torch.Tensor] | None = None) -> torch.Tensor:
        if control is not None or adapter is not None or torch.is_grad_enabled() or x.device.type != "cpu" \
                or not self._plain():
            self.fallbacks += 1
            return self.fn(x, timesteps, context, y, control, adapter)
        dtype = next(self.unet.parameters()).dtype
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        args = tuple(a for a in (x.to(dtype), timesteps, context.to(dtype), None if y is None else y.to(dtype))
                     if a is not None)
        if self._weights_changed():
            self.graphs.clear()
            self._digest = None
        key = tuple((tuple(a.shape), a.dtype) for a in args)
        graph = self.graphs.get(key)
        if graph is None:
            while len(self.graphs) >= MAX_GRAPHS:
                self.graphs.popitem(last=False)
            graph = self.graphs[key] = _Graph(self._traced, args, dtype, self._cache_path(key))
            self.conversions += graph.converted
            self.reads += not graph.converted
        self.graphs.move_to_end(key)
        return graph(args)


def use_openvino(model: StableDiffusion, cache: bool = True) -> OpenVINOForward:
    """Run the UNet's forward through OpenVINO, in place (the module, its parameters and state_dict unchanged);
    returns the wrapper (a second call returns the one in place). cache: keep converted graphs on disk."""
    unet = model.unet
    if isinstance(unet.forward, OpenVINOForward):
        return unet.forward
    if model.device.type != "cpu":
        raise ValueError(f"--compile openvino runs the UNet on the CPU; the model is on {model.device}")
    if not openvino_available():
        raise RuntimeError("--compile openvino needs the openvino package: pip install openvino")
    wrapper = OpenVINOForward(unet, unet.forward, cache)
    unet.forward = wrapper
    return wrapper


__all__ = ["CACHE_ENTRIES", "MAX_GRAPHS", "OpenVINOForward", "cache_dir", "openvino_available", "use_openvino",
           "weights_digest"]
