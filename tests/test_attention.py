"""nn.attention.attention: the same result as one scaled_dot_product_attention call, in memory that does not grow
with tokens² (issue 34, finding 1: a 1024² request on the shipped model needed a 16 GiB attention buffer)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sdengine.nn import attention as attention_module
from sdengine.nn.attention import CrossAttention, attention


def qkv(b=2, heads=2, n=300, m=None, d=16, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = m or n
    if strided:  # as the VAE takes them: a transposed view of (channels, pixels), last dimension not contiguous
        return tuple(torch.randn(b, heads, d, t, generator=g).transpose(-1, -2) for t in (n, m, m))
    return tuple(torch.randn(b, heads, t, d, generator=g) for t in (n, m, m))


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("m", [300, 77])  # self-attention, and cross-attention to a text context
def test_chunked_equals_one_call(monkeypatch, strided, m):
    q, k, v = qkv(m=m, strided=strided)
    whole = F.scaled_dot_product_attention(q, k, v)
    for limit in (2 * 2 * m * 7, 2 * 2 * m * 64, 1 << 30):  # 7-row chunks (the last one shorter), 64 rows, none
        monkeypatch.setattr(attention_module, "MAX_SCORES", limit)
        out = attention(q, k, v)
        assert out.shape == whole.shape and (out - whole).abs().max() <= 1e-6


def test_cross_attention_module_unchanged_by_chunking(monkeypatch):
    torch.manual_seed(0)
    self_attn, cross_attn = CrossAttention(64, None, 2, 32).eval(), CrossAttention(64, 32, 2, 32).eval()
    x, context = torch.randn(2, 256, 64), torch.randn(2, 77, 32)
    with torch.no_grad():
        whole = self_attn(x), cross_attn(x, context)
        monkeypatch.setattr(attention_module, "MAX_SCORES", 2 * 2 * 256 * 10)
        chunked = self_attn(x), cross_attn(x, context)
    for a, b in zip(whole, chunked):
        assert (a - b).abs().max() <= 1e-6


PEAK = """
import resource, torch
from sdengine.nn.attention import attention
n, d = 16384, 96
q, k, v = (torch.randn(1, d, n).transpose(1, 2)[:, None] for _ in range(3))  # the VAE's layout
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():
    attention(q, k, v)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
"""


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_tokens_squared():
    """16384 pixels (a 512² decode of the shipped model): the matrix alone would be 1 GiB; through the math kernel
    (a strided last dimension) the call took 2.3 GB more; now a few MB."""
    extra_mb = int(subprocess.run([sys.executable, "-c", PEAK], capture_output=True, text=True, check=True,
                                  timeout=120).stdout)
    assert extra_mb < 300, extra_mb
