"""Tiled VAE decode (sdengine/vae_tiling.py): peak memory and seconds of big decodes, and how far the tiled image is
from the untiled one.

    python benchmarks/vae_tiling.py [memory|quality|all] [--size 2048] [--untiled-size 1024] [--compare]
                                    [--dtype fp32|bf16] [--tile 512] [--overlap 0.25]

memory: an SD1.5-shape VAE (config preset sd15, random weights) decodes one size x size image tiled, and one
untiled-size image untiled, each in a fresh subprocess; each prints its peak RSS (getrusage ru_maxrss: the whole
process, weights, Python and torch included), the RSS once the VAE was built, seconds, and memory_estimate's
figure. --compare also decodes the untiled-size latents tiled and prints the difference (random weights: far
bigger than a trained VAE's, see quality). The issue's target: a 2048x2048 decode within 8 GB peak RSS.

quality: the shipped model's trained VAE (f=4) re-decodes the latents of a 512x512 shapes-world scene untiled,
tiled (256- and 128-pixel tiles) and tiled without overlap; prints max/mean abs error and PSNR against the untiled
decode, and the seam metric: how much the error (tiled - untiled) jumps between neighbouring pixels across the
lines where tiles meet, against how much it does elsewhere (equal: no visible seam).

Heavy (a 2048² SD1.5 decode is many minutes on 2 shared cores): run by hand, niced, on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sdengine.config import PRESETS
from sdengine.memory_estimate import readable, tiled_decode_bytes, vae_decode_bytes
from sdengine.nn.vae import AutoencoderKL
from sdengine.vae_tiling import DEFAULT_OVERLAP, DEFAULT_TILE, decode_tiled, tile_geometry

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child(mode: str, size: int, dtype_name: str, tile: int, overlap: float, out: str) -> None:
    """One decode in this (fresh) process; prints one JSON line."""
    dtype = DTYPES[dtype_name]
    cfg = PRESETS["sd15"].vae
    torch.manual_seed(0)
    vae = AutoencoderKL(cfg).to(dtype).eval().requires_grad_(False)
    built = rss_bytes()
    n = size // cfg.downscale
    z = torch.randn(1, cfg.embed_dim, n, n, generator=torch.Generator().manual_seed(1)).to(dtype)
    start = time.perf_counter()
    with torch.no_grad():
        pixels = decode_tiled(vae, z, tile=tile, overlap=overlap) if mode == "tiled" else vae.decode(z)
    seconds = time.perf_counter() - start
    element = torch.finfo(dtype).bits // 8
    estimate = (tiled_decode_bytes(cfg, size, size, 1, element, tile) if mode == "tiled"
                else vae_decode_bytes(cfg, size, size, 1, element))
    print(json.dumps({"mode": mode, "size": size, "dtype": dtype_name, "seconds": round(seconds, 1),
                      "peak_rss": rss_bytes(), "rss_after_build": built, "estimate": estimate}), flush=True)
    if out:
        torch.save(pixels.float(), out)


def run_child(mode: str, size: int, args: argparse.Namespace, out: str = "") -> dict:
    cmd = [sys.executable, __file__, "child", "--mode", mode, "--size", str(size), "--dtype", args.dtype,
           "--tile", str(args.tile), "--overlap", str(args.overlap), "--out", out]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{mode} {size}² failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{mode:>8} {size}x{size} {args.dtype}: {result['seconds']:7.1f} s, peak RSS {readable(result['peak_rss'])}"
          f" (after building the VAE {readable(result['rss_after_build'])}; decode estimate "
          f"{readable(result['estimate'])})", flush=True)
    return result


def memory(args: argparse.Namespace) -> None:
    print(f"SD1.5-shape VAE, random weights, tile {args.tile} px, overlap {args.overlap}, "
          f"{torch.get_num_threads()} threads", flush=True)
    run_child("tiled", args.size, args)
    if not args.untiled_size:
        return
    if not args.compare:
        run_child("untiled", args.untiled_size, args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        paths = {m: str(Path(tmp) / f"{m}.pt") for m in ("untiled", "tiled")}
        for m in ("untiled", "tiled"):
            run_child(m, args.untiled_size, args, paths[m])
        untiled, tiled = (torch.load(paths[m]) for m in ("untiled", "tiled"))
    side, stride = tile_geometry(8, args.tile, args.overlap)
    print(f"tiled vs untiled at {args.untiled_size}² (random weights): " + compare(tiled, untiled, stride * 8,
                                                                                    (side - stride) * 8))


def seam_steps(err: torch.Tensor, keep: int, blend: int) -> tuple[float, float]:
    """The tiling error's jumps, in 8-bit levels: mean |step| of (tiled - untiled) between neighbouring pixels
    across the lines where tiles meet (the crop line and the end of the cross-fade), and everywhere else. The
    untiled image has no seams, so a seam is a step in the error that the rest of the image does not have."""
    at, off = [], []
    for dim in (2, 3):
        step = err.diff(dim=dim).abs() * 127.5  # step[..., i]: between pixels i and i + 1; [-1, 1] -> 0..255
        lines = {k * keep + d - 1 for k in range(1, math.ceil(err.shape[dim] / keep)) for d in (0, blend)}
        mask = torch.zeros(step.shape[dim], dtype=torch.bool)
        mask[sorted(i for i in lines if i < step.shape[dim])] = True
        at.append(step.index_select(dim, mask.nonzero()[:, 0]).mean().item())
        off.append(step.index_select(dim, (~mask).nonzero()[:, 0]).mean().item())
    return max(at), max(off)


def compare(tiled: torch.Tensor, untiled: torch.Tensor, keep: int, blend: int) -> str:
    err = tiled - untiled
    mse = ((tiled.clamp(-1, 1) - untiled.clamp(-1, 1)) / 2).pow(2).mean().item()
    psnr = 10 * math.log10(1 / mse) if mse else float("inf")
    at, off = seam_steps(err, keep, blend)
    return (f"max abs {err.abs().max().item():.4f}, mean abs {err.abs().mean().item():.4f} (of [-1, 1]), "
            f"PSNR {psnr:.1f} dB; seam: the error steps {at:.2f}/255 across tile lines, {off:.2f}/255 elsewhere")


def quality(args: argparse.Namespace) -> None:
    from sdengine.data.shapes import SceneSampler
    from sdengine.runtime import default_model
    from sdengine.weights import load

    path = default_model()
    if path is None:
        raise SystemExit("the shipped model is not installed")
    vae = load(path).vae
    f = vae.config.downscale
    scene = SceneSampler(seed=123, resolution=512).sample(0).image  # one scene drawn at 512²: no borders inside
    x = torch.from_numpy(scene.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        z = vae.encode(x).mode()
        untiled = vae.decode(z)
        for tile, overlap in ((256, args.overlap), (128, args.overlap), (128, 0.0)):
            side, stride = tile_geometry(f, tile, overlap)
            tiled = decode_tiled(vae, z, tile=tile, overlap=overlap)
            print(f"shipped VAE (f={f}), a 512² shapes scene, tile {tile} px, overlap {overlap}: "
                  + compare(tiled, untiled, stride * f, (side - stride) * f), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", nargs="?", default="all", choices=["memory", "quality", "all", "child"])
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--untiled-size", type=int, default=1024, help="0: skip the untiled comparison")
    p.add_argument("--compare", action="store_true", help="also decode the untiled size tiled and compare the two")
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--tile", type=int, default=DEFAULT_TILE)
    p.add_argument("--overlap", type=float, default=DEFAULT_OVERLAP)
    p.add_argument("--mode", default="tiled", choices=["tiled", "untiled"])  # child only
    p.add_argument("--out", default="")  # child only: where to save the pixels
    args = p.parse_args()
    if args.what == "child":
        child(args.mode, args.size, args.dtype, args.tile, args.overlap, args.out)
        return
    if args.what in ("quality", "all"):
        quality(args)
    if args.what in ("memory", "all"):
        memory(args)


if __name__ == "__main__":
    main()
