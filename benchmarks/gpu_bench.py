"""it/s of txt2img sampling on a CUDA GPU, sdengine vs diffusers with the same random SD1.5-shape weights (issue 33,
target 7): 512x512, 50 Euler steps, CFG 7.5 (the UNet runs on 2 x batch), fp16, batch 1 and 8, for

    diffusers eager | sdengine eager | sdengine compiled (compile_unet) | + CUDA graphs (cuda_graphs) | diffusers
    compiled (torch.compile default mode, fullgraph: max-autotune's tuning would not fit the 8 minutes)

    bash benchmarks/gpu.sh [--steps 50] [--batches 1,8] [--repeats 2] [--budget 400]
    bash benchmarks/gpu.sh --dry-run      # the whole flow on a CPU, tiny model, seconds (tests/test_gpu_bench.py)

Timing: every call is made once untimed first with 3 steps (its seconds are printed as warm-up: compilation,
CUDA graph capture, cuDNN autotuning), then `--repeats` timed calls at batch 1 (one at larger batches, where one
call is seconds), best kept. A CUDA event is recorded at the call's start, after each step (the pipelines' step
callbacks) and at its end, and read after one synchronize, so the host's timing never stalls the queue:
it/s = (steps - 1) / (first step's end -> last step's end), the sampler's steady rate as a progress bar shows it
(what stable-fast's 104.6 it/s is); s/call = the whole call (text encoding + all steps, no VAE decode). Each
case's final latents are compared with diffusers eager's at the same batch (max abs difference), its first image
decoded by its own VAE (PSNR against diffusers eager's image).
"""
from __future__ import annotations

import argparse
import copy
import math
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import sdengine
from sdengine.compile import compile_unet
from sdengine.config import PRESETS
from sdengine.cuda_graphs import GraphedForward, use_cuda_graphs
from sdengine.model import StableDiffusion
from sdengine.pipeline import Pipeline
from sdengine.request import Request

PROMPT, CFG, SEED = "a photograph of an astronaut riding a horse", 7.5, 0
TARGET_RATIO, TARGET_H100_ITS, STABLE_FAST_ITS = 2.0, 110.0, 104.6
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
CASES = ("diffusers eager", "sdengine eager", "sdengine compiled", "sdengine compiled + CUDA graphs",
         "diffusers compiled")
Run = Callable[[int, int, Callable[[], None]], torch.Tensor]  # (batch, steps, mark) -> final latents


class StepClock:
    """Timestamps on the device's own timeline: CUDA events recorded into the stream (read after one synchronize
    at the end, so marking never waits for the GPU), or perf_counter on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self, i: int, j: int) -> float:
        """Seconds from mark i to mark j."""
        if self.cuda:
            torch.cuda.synchronize()
            return self.marks[i].elapsed_time(self.marks[j]) / 1000
        return self.marks[j] - self.marks[i]


@dataclass
class Row:
    case: str
    batch: int
    its: float | None = None  # steady steps per second (one step = one CFG UNet call on 2 x batch)
    seconds: float | None = None  # one whole call
    warm: float | None = None  # the untimed first call: compilation, capture, autotuning
    latents: torch.Tensor | None = None
    image: torch.Tensor | None = None
    max_diff: float | None = None
    psnr: float | None = None
    note: str = ""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(run: Run, batch: int, steps: int, warm_steps: int, repeats: int, device: torch.device) -> Row:
    """One case: an untimed warm-up call of `warm_steps`, then the best of `repeats` timed calls of `steps`."""
    sync(device)
    start = time.perf_counter()
    run(batch, warm_steps, lambda: None)
    sync(device)
    row = Row("", batch, warm=time.perf_counter() - start)
    for _ in range(repeats):
        clock = StepClock(device)
        clock.mark()
        latents = run(batch, steps, clock.mark)
        clock.mark()
        if len(clock.marks) != steps + 2:
            raise RuntimeError(f"expected {steps} step callbacks, got {len(clock.marks) - 2}")
        its = (steps - 1) / clock.seconds(1, steps)
        row.its = max(row.its or 0.0, its)
        row.seconds = min(row.seconds or math.inf, clock.seconds(0, steps + 1))
        row.latents = latents.float().cpu()
    return row


# ---- the two engines --------------------------------------------------------------------------------------------

def build_models(folder: Path, tiny: bool, device: torch.device, dtype: torch.dtype, diffusers: bool) -> tuple:
    """(diffusers pipeline, sdengine Pipeline, image size) with the same random weights: the references the other
    benchmarks and tests build, saved as a diffusers folder and loaded from it by sdengine. Without diffusers:
    (None, sdengine's own freshly initialised model, size): its speed alone."""
    if not diffusers:
        model = StableDiffusion(PRESETS["tiny" if tiny else "sd15"]).init_weights(SEED)
        with torch.no_grad():  # off the zeroed output layers, as the references do, so that outputs can differ
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        return None, Pipeline(model.to(device, dtype).eval()), 64 if tiny else 512
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    if tiny:  # the tests' tiny oracle (tests/reference.py): milliseconds per step on a CPU
        tests = str(Path(__file__).resolve().parents[1] / "tests")
        if tests not in sys.path:
            sys.path.append(tests)
        from reference import save_pipeline
        parts, size = save_pipeline("sd1", folder), 32
    else:
        from parity_full_size import build_reference
        parts, size = build_reference("sd15", folder), 512
    parts["scheduler"] = EulerDiscreteScheduler.from_config(parts["scheduler"].config)  # sdengine's "euler"
    ref = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                  requires_safety_checker=False).to(device, dtype)
    ref.set_progress_bar_config(disable=True)
    ours = Pipeline(sdengine.load(folder, device=device, dtype=dtype))
    return ref, ours, size


def diffusers_run(pipe, size: int) -> Run:
    def run(batch: int, steps: int, mark: Callable[[], None]) -> torch.Tensor:
        def on_step(_pipe, _i, _t, kwargs: dict) -> dict:
            mark()
            return kwargs

        generators = [torch.Generator().manual_seed(SEED + i) for i in range(batch)]  # sdengine's seeds
        return pipe(PROMPT, negative_prompt="", num_inference_steps=steps, guidance_scale=CFG, height=size,
                    width=size, generator=generators, num_images_per_prompt=batch, output_type="latent",
                    callback_on_step_end=on_step).images
    return run


def sdengine_run(pipe: Pipeline, size: int) -> Run:
    def run(batch: int, steps: int, mark: Callable[[], None]) -> torch.Tensor:
        req = Request(prompt=PROMPT, negative_prompt="", steps=steps, sampler="euler", cfg_scale=CFG, seed=SEED,
                      width=size, height=size, batch_size=batch)
        return pipe.sample(req, callback=lambda *_: mark())
    return run


@torch.no_grad()
def decode_first(case: str, ref, ours: Pipeline, latents: torch.Tensor) -> torch.Tensor:
    """The batch's first image in [0, 1] (CPU, fp32), decoded by the engine that made it (fp32 where fp16
    overflows, as both pipelines do)."""
    if case.startswith("sdengine"):
        return ours.decode(latents[:1]).float().cpu()
    vae = ref.vae
    z = latents[:1].to(vae.device) / vae.config.scaling_factor
    pixels = vae.decode(z.to(vae.dtype)).sample.float()
    if not torch.isfinite(pixels).all():
        pixels = copy.deepcopy(vae).float().decode(z.float()).sample
    return (pixels / 2 + 0.5).clamp(0, 1).cpu()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a - b).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


# ---- the cases ---------------------------------------------------------------------------------------------------

class Forwards:
    """The UNet forwards the cases run, each made once and swapped in before its case, so that the cases can go
    batch by batch (all of batch 1 first: the targets') with every model as its case wants it."""

    def __init__(self, ref, ours: Pipeline, backend: str, graphs: bool) -> None:
        self.ref, self.ours, self.backend, self.graphs = ref, ours, backend, graphs
        self.eager_ours, self.eager_ref = ours.model.unet.forward, None if ref is None else ref.unet
        self.compiled_ours: Callable | None = None
        self.graphed: GraphedForward | None = None
        self.compiled_ref = None

    def ours_eager(self) -> None:
        self.ours.model.unet.forward = self.eager_ours

    def ours_compiled(self) -> None:
        unet = self.ours.model.unet
        if self.compiled_ours is None:
            self.ours_eager()
            if self.backend == "inductor":  # the engine's own: compile.compile_unet (inductor, freezing)
                compile_unet(self.ours.model)
                self.compiled_ours = unet.forward
            else:  # the dry run: dynamo's tracing without inductor's code generation, seconds on a CPU
                self.compiled_ours = torch.compile(self.eager_ours, backend=self.backend)
        unet.forward = self.compiled_ours

    def ours_graphed(self) -> None:
        self.ours_compiled()
        if self.graphed is None:
            self.graphed = use_cuda_graphs(self.ours.model, graphs=self.graphs)
        self.ours.model.unet.forward = self.graphed

    def ref_eager(self) -> None:
        self.ref.unet = self.eager_ref

    def ref_compiled(self) -> None:
        if self.compiled_ref is None:  # as diffusers' docs do it; default mode
            self.compiled_ref = torch.compile(self.eager_ref, fullgraph=True, backend=self.backend)
        self.ref.unet = self.compiled_ref


@dataclass
class Stage:
    case: str
    run: Run
    use: Callable[[], None]  # puts the case's forward in place (cheap: compilation waits for the first call)
    compiles: bool = False  # its warm-up compiles: reserve more of the budget before starting it


def stages(ref, ours: Pipeline, size: int, forwards: Forwards) -> list[Stage | None]:
    """The CASES, in their order (None for diffusers' without diffusers)."""
    theirs, mine = (None if ref is None else diffusers_run(ref, size)), sdengine_run(ours, size)
    return [theirs and Stage(CASES[0], theirs, forwards.ref_eager), Stage(CASES[1], mine, forwards.ours_eager),
            Stage(CASES[2], mine, forwards.ours_compiled, compiles=True), Stage(CASES[3], mine, forwards.ours_graphed),
            theirs and Stage(CASES[4], theirs, forwards.ref_compiled, compiles=True)]


HEADER = ("case", "batch", "it/s", "speedup", "s/call", "warm-up s", "lat. diff", "img PSNR")
WIDTHS = (34, 6, 9, 9, 9, 11, 11, 10)


def run_all(ref, ours: Pipeline, size: int, args: argparse.Namespace, device: torch.device,
            forwards: Forwards, began: float) -> list[Row]:
    rows: list[Row] = []
    chosen = [stage for index, stage in enumerate(stages(ref, ours, size, forwards), 1)
              if index in args.cases and stage is not None]
    print("".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, (h, w) in enumerate(zip(HEADER, WIDTHS))), flush=True)
    spent: dict[str, float] = {}  # each case's last warm-up + timed calls: a guess of what its next batch needs
    for batch in args.batches:
        for stage in chosen:
            reserve = spent.get(stage.case, 120 if stage.compiles else 20)  # compilation included
            if time.perf_counter() - began + reserve > args.budget:
                row = Row(stage.case, batch, note="skipped: time budget")
            else:
                try:
                    stage.use()
                    repeats = args.repeats if batch == 1 else 1
                    started = time.perf_counter()
                    row = measure(stage.run, batch, args.steps, min(args.steps, 3), repeats, device)
                    spent[stage.case] = time.perf_counter() - started
                    row.case = stage.case
                    row.image = decode_first(stage.case, ref, ours, row.latents)
                except Exception as e:  # noqa: BLE001 - one failing case (out of memory, a compiler error) must not end the rest
                    traceback.print_exc()  # on stderr: a GPU run is rare, its failures must be readable afterwards
                    row = Row(stage.case, batch, note=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                compare(row, rows)
            rows.append(row)
            print(format_row(row, rows), flush=True)
    return rows


def baseline(rows: list[Row], batch: int) -> Row | None:
    """What the batch's other cases are compared with: diffusers eager, or without it sdengine eager."""
    for case in CASES[:2]:
        found = [r for r in rows if r.case == case and r.batch == batch and r.latents is not None]
        if found:
            return found[0]
    return None


def compare(row: Row, rows: list[Row]) -> None:
    """Latents and first image against the baseline's at the same batch (when it ran)."""
    base = baseline(rows, row.batch)
    if base is not None and row.latents is not None and row is not base:
        row.max_diff = (row.latents - base.latents).abs().max().item()
        row.psnr = psnr(row.image, base.image)


def cells(row: Row, rows: list[Row]) -> list[str]:
    if row.its is None or row.seconds is None or row.warm is None:
        return [row.case, str(row.batch), row.note]
    base = baseline(rows, row.batch)
    speedup = "" if base is None or base.its is None else f"{row.its / base.its:.2f}x"
    return [row.case, str(row.batch), f"{row.its:.2f}", speedup, f"{row.seconds:.2f}", f"{row.warm:.1f}",
            "" if row.max_diff is None else f"{row.max_diff:.3g}", "" if row.psnr is None else f"{row.psnr:.1f}"]


def format_row(row: Row, rows: list[Row]) -> str:
    values = cells(row, rows)
    if len(values) == 3:
        return f"{values[0]:<{WIDTHS[0]}}{values[1]:>{WIDTHS[1]}}  {values[2]}"
    return "".join(f"{v:<{w}}" if i == 0 else f"{v:>{w}}" for i, (v, w) in enumerate(zip(values, WIDTHS)))


def markdown(rows: list[Row], title: str) -> str:
    """The table for the README, under the card's name."""
    lines = [title, "", "| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    for row in rows:
        values = cells(row, rows)
        lines.append("| " + " | ".join(values + [""] * (len(HEADER) - len(values))) + " |")
    return "\n".join(lines)


def verdicts(rows: list[Row], device_name: str) -> list[str]:
    """The issue's targets, judged on this run's batch-1 rows."""
    def its(case_prefix: str) -> float | None:
        found = [r.its for r in rows if r.batch == 1 and r.its is not None and r.case.startswith(case_prefix)]
        return max(found) if found else None

    ours, eager = its("sdengine"), its("diffusers eager")
    if ours is None:
        return ["targets: not judged (no sdengine case at batch 1)"]
    if eager is None:
        lines = [f"target sdengine >= {TARGET_RATIO:.1f}x diffusers eager at batch 1: not judged (no diffusers eager)"]
    else:
        ratio = ours / eager
        lines = [f"target sdengine >= {TARGET_RATIO:.1f}x diffusers eager at batch 1: {ratio:.2f}x "
                 f"({ours:.1f} vs {eager:.1f} it/s) -> {'met' if ratio >= TARGET_RATIO else 'NOT met'}"]
    if "H100" in device_name:
        lines.append(f"target >= {TARGET_H100_ITS:.0f} it/s at batch 1 on an H100 (stable-fast: {STABLE_FAST_ITS}): "
                     f"{ours:.1f} -> {'met' if ours >= TARGET_H100_ITS else 'NOT met'}")
    else:
        lines.append(f"target >= {TARGET_H100_ITS:.0f} it/s at batch 1 is for an H100 (stable-fast: "
                     f"{STABLE_FAST_ITS}); this device ({device_name}): {ours:.1f} it/s, not judged")
    return lines


# ---- the command -------------------------------------------------------------------------------------------------

def parse_batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",")]
    except ValueError:
        raise ValueError(f"--batches takes comma-separated integers, not {text!r}") from None
    if not batches or min(batches) < 1:
        raise ValueError(f"--batches must be positive integers, not {text!r}")
    return batches


def parse_cases(text: str | None) -> list[int]:
    if text is None:
        return list(range(1, len(CASES) + 1))
    try:
        cases = sorted({int(c) for c in text.split(",")})
    except ValueError:
        raise ValueError(f"--cases takes comma-separated numbers 1-{len(CASES)}, not {text!r}") from None
    if cases[0] < 1 or cases[-1] > len(CASES):
        raise ValueError(f"--cases takes numbers 1-{len(CASES)} ({', '.join(CASES)}), not {text!r}")
    return cases


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="sampling steps per call (default 50; dry run 3)")
    ap.add_argument("--batches", default=None, help="comma-separated (default 1,8; dry run 1,2)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="timed calls per case at batch 1, the best kept (larger batches: one, for the 8 minutes)")
    ap.add_argument("--cases", default=None,
                    help="which to measure, comma-separated: " + ", ".join(f"{i} {c}" for i, c in enumerate(CASES, 1))
                    + " (default all; to finish a run the budget cut short)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default fp16 (dry run: fp32)")
    ap.add_argument("--budget", type=float, default=400.0,
                    help="seconds: cases that would end past it are skipped (gpu.sh stops all at 470)")
    ap.add_argument("--dry-run", action="store_true", help="on the CPU with a tiny model: checks the flow only")
    ap.add_argument("--sdengine-only", action="store_true",
                    help="without diffusers (also when it is missing): sdengine's cases on its own random weights")
    ap.add_argument("--workdir", type=Path, default=None, help="where the random model is written (a temp dir)")
    args = ap.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (3 if args.dry_run else 50)
    args.dtype = args.dtype or ("fp32" if args.dry_run else "fp16")
    args.batches = args.batches or ("1,2" if args.dry_run else "1,8")
    if args.steps < 2:
        ap.error("--steps must be at least 2 (it/s is timed between the first and the last step)")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    try:
        args.batches = parse_batches(args.batches)
        args.cases = parse_cases(args.cases)
    except ValueError as e:
        ap.error(str(e))
    return args


def environment(device: torch.device, diffusers_version: str | None) -> tuple[str, str]:
    """(the device's name, a line of versions)."""
    versions = f"python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers_version}"
    if device.type != "cuda":
        return "CPU", versions
    props = torch.cuda.get_device_properties(device)
    return props.name, (f"{versions}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
                        f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2 ** 30:.0f} GiB)")


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    began = time.perf_counter()
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit(f"gpu_bench: no CUDA device: torch {torch.__version__} (CUDA build: {torch.version.cuda}) "
                         f"from {torch.__file__} sees none; --dry-run checks the flow on a CPU")
    args.diffusers = None
    if not args.sdengine_only:
        try:  # the references: test-only dependencies, maybe absent from a GPU box's Python
            import diffusers
            import transformers  # noqa: F401
            args.diffusers = diffusers.__version__
        except ImportError as e:
            print(f"gpu_bench: {sys.executable} lacks {e.name}, which builds the reference models: sdengine's cases "
                  "only, on its own random weights (no comparison; PYTHON=... for gpu.sh picks another Python)",
                  flush=True)
    device = torch.device("cpu" if args.dry_run else "cuda")
    threads = torch.get_num_threads()
    if args.dry_run:
        torch.set_num_threads(1)  # tiny tensors: more threads only add synchronisation on a busy machine
    try:
        # one static graph per batch size, as compiled serving uses: not a batch-dynamic one after the second shape
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
            return run(args, device, began)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace, device: torch.device, began: float) -> list[Row]:
    dtype = DTYPES[args.dtype]
    name, versions = environment(device, args.diffusers)
    print(versions, flush=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # both engines' convolutions get the fastest cuDNN algorithms
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        ref, ours, size = build_models(Path(tmp) / "pipe", args.dry_run, device, dtype, args.diffusers is not None)
    print(f"{'DRY RUN (tiny model on the CPU: checks the flow, measures nothing); ' if args.dry_run else ''}"
          f"{size}x{size}, {args.steps} Euler steps, CFG {CFG} (UNet on 2 x batch), {args.dtype}, random "
          f"{'tiny' if args.dry_run else 'SD1.5-shape'} weights{'' if ref is None else ' shared by both'}; "
          f"models ready after {time.perf_counter() - began:.0f} s; diffusers compiled: torch.compile default mode, "
          "fullgraph", flush=True)
    forwards = Forwards(ref, ours, "eager" if args.dry_run else "inductor", graphs=not args.dry_run)
    rows = run_all(ref, ours, size, args, device, forwards, began)
    if forwards.graphed is not None:
        print(f"CUDA graphs: {forwards.graphed.captures} shapes captured"
              f"{'' if forwards.graphed.graphs else ' (dry run: static buffers, not captured)'}")
    bases = [(b, base) for b in args.batches if (base := baseline(rows, b)) is not None]
    if bases:
        print(f"speedup (it/s), lat. diff (max abs), img PSNR (the first image, pixels in [0, 1]): against "
              f"{bases[0][1].case} at the same batch; its latents' own max abs: "
              + ", ".join(f"batch {b}: {base.latents.abs().max().item():.3g}" for b, base in bases))
    print("\n".join(verdicts(rows, name)))
    print("\n" + markdown(rows, f"{name}: {versions}; {size}x{size}, {args.steps} steps, {args.dtype}") + "\n")
    print(f"total {time.perf_counter() - began:.0f} s (warm-up s = the first call's, compilation included; "
          f"excluded from it/s)", flush=True)
    return rows


if __name__ == "__main__":
    main()
