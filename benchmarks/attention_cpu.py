"""The attention that bounds a 512² UNet step on a CPU, kernel against kernel: one self-attention of SD1.5's first
level (4,096 tokens, 8 heads of 40, batch 2 for guidance) in bf16, each way of computing it that PyTorch or its
ecosystem offers on a CPU.

    python benchmarks/attention_cpu.py [--tokens 4096] [--heads 8] [--head-dim 40] [--batch 2] [--repeats 3]

Rows: PyTorch's CPU flash kernel (what sdengine and diffusers both call), the same with the head padded to 64
(zeros in q, k, v: the same result, a wider GEMM), the math formulation in query chunks (bf16 products, fp32
softmax), FlexAttention compiled by inductor, and OpenVINO's torch.compile backend when `openvino` is installed.
Effective GFLOP/s count the two products only (4 n² d per head); the softmax's n² exponentials are not FLOPs but
take much of the time. Max |diff| is against an fp32 reference.
"""
from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timing import best_seconds


def chunked_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    scale = q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    for i in range(0, q.shape[-2], rows):
        scores = torch.matmul(q[:, :, i:i + rows], k.transpose(-1, -2)).float() * scale
        out[:, :, i:i + rows] = torch.softmax(scores, -1).to(q.dtype) @ v
    return out


def padded(width: int) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        d = q.shape[-1]
        q, k, v = (F.pad(t, (0, width - d)) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, scale=d ** -0.5)[..., :d]
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=40)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads, args.tokens, args.head_dim)
    q, k, v = (torch.randn(shape, generator=g).to(torch.bfloat16) for _ in range(3))
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    flops = 4 * args.batch * args.heads * args.tokens ** 2 * args.head_dim
    ways: dict[str, Callable] = {
        "flash (F.scaled_dot_product_attention)": F.scaled_dot_product_attention,
        "flash, head padded to 64": padded(64),
        "math, 1024-row query chunks": chunked_math,
    }
    from torch.nn.attention.flex_attention import flex_attention
    ways["FlexAttention, inductor"] = torch.compile(flex_attention)
    if importlib.util.find_spec("openvino") is not None:
        import openvino.torch  # noqa: F401  (registers the backend)

        ways["OpenVINO backend"] = torch.compile(lambda a, b, c: F.scaled_dot_product_attention(a, b, c),
                                                 backend="openvino")
    print(f"self-attention {shape} bf16, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'kernel':<40}{'seconds':>9}{'GFLOP/s':>9}{'max |diff|':>12}")
    with torch.inference_mode():
        for name, fn in ways.items():
            diff = (fn(q, k, v).float() - reference).abs().max().item()  # also the compilation, before timing
            seconds = best_seconds(lambda fn=fn: fn(q, k, v), args.repeats)
            print(f"{name:<40}{seconds:>9.3f}{flops / seconds / 1e9:>9.0f}{diff:>12.2e}", flush=True)
    if importlib.util.find_spec("openvino") is None:
        print("OpenVINO backend: not installed (pip install openvino)")


if __name__ == "__main__":
    main()
