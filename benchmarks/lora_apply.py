"""What applying a LoRA costs: patching the weights in place and restoring them, on the full-size SD1.5 shape
(random weights), per LoRA, in fp32 and fp16 weights; and the same set asked again (no work: the patcher keeps it).

    python benchmarks/lora_apply.py [--rank 32] [--repeats 3]

The LoRA is kohya-style on every layer kohya's trainer targets by default (attention and feed-forward linears,
proj_in/out, and the text encoder's), plus a LoCon variant on the conv layers. Run by hand on an idle machine.
"""
from __future__ import annotations

import argparse
import time

import torch
from timing import best_seconds

from sdengine.config import SD15
from sdengine.lora import LoraPatcher, LoraUse, kohya_names, lora_from_tensors, lora_targets
from sdengine.model import StableDiffusion


def random_lora(model: StableDiffusion, rank: int, conv: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    targets = {t.key: t for t in lora_targets(model).values()}
    tensors = {}
    for key, name in kohya_names(model).items():
        w = targets[key].weight_tensor()
        if (w.ndim == 4) != conv or (w.ndim == 4 and w.shape[-1] == 1 and conv):
            continue
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, *w.shape[1:], generator=g) * 0.01
        tensors[f"{name}.lora_up.weight"] = torch.randn(w.shape[0], rank, *([1, 1] if w.ndim == 4 else []),
                                                        generator=g) * 0.01
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    return lora_from_tensors(tensors, f"{'locon' if conv else 'lora'}{seed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"SD1.5 shape, rank {args.rank}, {torch.get_num_threads()} threads; best of {args.repeats}")
    for dtype in (torch.float32, torch.float16):
        model = StableDiffusion(SD15).to(dtype).eval()
        patcher = LoraPatcher(model)
        a, b = random_lora(model, args.rank, False, 1), random_lora(model, args.rank, False, 2)
        locon = random_lora(model, args.rank, True, 3)
        print(f"{str(dtype).removeprefix('torch.')}: LoRA {len(a.layers)} layers, LoCon {len(locon.layers)} layers")
        for label, uses in (("one LoRA", [LoraUse(a)]), ("two LoRAs", [LoraUse(a), LoraUse(b, 0.5, 0.5)]),
                            ("one LoCon (convs)", [LoraUse(locon)])):
            def cycle(uses=uses, patcher=patcher) -> None:
                patcher.apply(uses)
                patcher.restore()

            seconds = best_seconds(cycle, args.repeats)
            patcher.apply(uses)
            again = best_seconds(lambda uses=uses, patcher=patcher: patcher.apply(uses), args.repeats)
            start = time.perf_counter()
            patcher.restore()
            restore = time.perf_counter() - start
            print(f"  {label:<18} apply+restore {seconds * 1e3:8.1f} ms ({seconds * 1e3 / len(uses):.1f} ms per "
                  f"LoRA), restore {restore * 1e3:6.1f} ms, same set again {again * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
