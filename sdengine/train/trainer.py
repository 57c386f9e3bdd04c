"""The training loop shared by every stage: optimizer, warmup + cosine LR, bf16 autocast (fp16 with a loss scaler),
accumulation, EMA, atomic checkpoints with resume, SIGTERM, NaN/inf guards, logs and pictures, and data parallelism
under torchrun (DistributedDataParallel).

A stage (stages/) supplies the modules to train, a loss over a batch, and a deterministic batch stream:
batch(step, indices) returns the items `indices` of global step `step`, so under torchrun each rank takes its
slice of the same global batch and N processes compute what one process with the same global batch computes.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from .. import runtime
from .checkpoint import ResumeError, checkpoints, load_latest, rng_state, save_checkpoint, set_rng_state
from .data import Prefetcher, Source
from .plots import write_loss_curve


class TrainingAborted(RuntimeError):
    pass


@dataclass
class TrainConfig:
    run_dir: Path
    steps: int = 1000
    batch_size: int = 32  # global batch, over all processes and accumulation steps
    lr: float = 1e-4
    warmup: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of lr
    weight_decay: float = 0.0
    grad_accum: int = 1
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # 0 disables the EMA
    precision: str = "auto"  # autocast dtype: auto | bf16 | fp16 | fp32 (runtime.training_autocast_dtype)
    save_every: int = 500  # 0: only at the end (and on SIGTERM)
    keep: int = 3
    log_every: int = 20
    sample_every: int = 0  # 0: only at the end
    seed: int = 0
    max_bad_steps: int = 20  # consecutive non-finite losses before aborting
    quiet: bool = False
    workers: int = 0  # processes preparing the data of coming steps (0: in the training process)
    time_budget: float = 0.0  # seconds; > 0 fits the step count to the measured speed (see Trainer.run)
    module_lr: dict[str, float] = field(default_factory=dict)  # a trained module's own peak LR (else lr)
    shard_optimizer: bool = False  # under torchrun, each process keeps the AdamW state of 1/world of the weights


class Stage(Protocol):
    name: str
    source: Source

    def trainable(self) -> dict[str, nn.Module]: ...

    def batch(self, step: int, indices: range, device: torch.device, items: list | None = None) -> Any:
        """The batch of global step `step`, items `indices`; `items` are those items when a worker prepared them."""
        ...

    def loss(self, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]: ...

    def samples(self, modules: dict[str, nn.Module], step: int, out: Path) -> None: ...

    def export(self, modules: dict[str, nn.Module], out: Path) -> None: ...


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine from 1 down to min_lr_ratio at the last step."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class EMA:
    """Exponential moving average of parameters, with the usual warmup of the decay (1 + n) / (10 + n)."""

    def __init__(self, modules: dict[str, nn.Module], decay: float):
        self.decay = decay
        self.shadow = {name: {k: v.detach().clone().float() for k, v in m.state_dict().items()}
                       for name, m in modules.items()}

    @torch.no_grad()
    def update(self, modules: dict[str, nn.Module], step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        shadows, values = [], []
        for name, m in modules.items():
            for k, v in m.state_dict().items():
                s = self.shadow[name][k]
                if v.is_floating_point():
                    shadows.append(s)
                    values.append(v.detach().float())
                else:
                    s.copy_(v)
        if shadows:  # one fused update instead of two kernels per tensor (it matters on a GPU)
            torch._foreach_mul_(shadows, d)
            torch._foreach_add_(shadows, values, alpha=1 - d)

    def copy_to(self, modules: dict[str, nn.Module]) -> None:
        for name, m in modules.items():
            m.load_state_dict({k: v.to(m.state_dict()[k].dtype) for k, v in self.shadow[name].items()})


class StageLoss(nn.Module):
    """A stage's trainable modules as one module whose forward is the stage's loss: what DistributedDataParallel
    wraps, so every parameter the loss uses is seen by its gradient hooks."""

    def __init__(self, stage: Stage):
        super().__init__()
        self.parts = nn.ModuleDict(stage.trainable())
        self.stage = [stage]  # in a list: not a submodule

    def forward(self, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        return self.stage[0].loss(batch, step)


def distributed(device: torch.device | None = None) -> tuple[int, int]:
    """(rank, world size); initializes the process group when launched by torchrun (NCCL for CUDA, else gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
        dist.init_process_group("nccl" if cuda else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


class Trainer:
    def __init__(self, stage: Stage, cfg: TrainConfig, device: torch.device):
        self.stage, self.cfg, self.device = stage, cfg, device
        self.autocast = runtime.training_autocast_dtype(cfg.precision, device)
        # fp16's range is narrow: small gradients underflow unless the loss is scaled (bf16 has fp32's range)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast == torch.float16)
        self.rank, self.world = distributed(device)
        per_step = cfg.batch_size // cfg.grad_accum
        if cfg.batch_size % (cfg.grad_accum * self.world) or per_step < self.world:
            raise ValueError(f"batch size {cfg.batch_size} must divide into {cfg.grad_accum} accumulation steps "
                             f"x {self.world} processes")
        self.micro = per_step // self.world  # items per process per micro-step
        # Forked before any module moves to the device (the workers never touch torch).
        self.prefetcher = Prefetcher(stage.source, cfg.workers) if cfg.workers > 0 else None
        torch.manual_seed(cfg.seed)
        self.modules = stage.trainable()
        for m in self.modules.values():
            m.to(device).train()
        self.loss_module: nn.Module = StageLoss(stage)
        if self.world > 1:  # averages gradients in buckets during backward; broadcasts rank 0's weights first
            self.loss_module = DistributedDataParallel(
                self.loss_module, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False)
        adamw = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "betas": (0.9, 0.999)}
        if cfg.shard_optimizer and self.world > 1:
            # ZeRO stage 1: each process steps its shard of the parameters and broadcasts them; the gradients are
            # still all-reduced whole by DDP. Checkpoints hold the whole state (gathered on rank 0 by save), so a run
            # resumes under any world size, sharded or not.
            self.optimizer: torch.optim.Optimizer = ZeroRedundancyOptimizer(
                self._param_groups(), optimizer_class=torch.optim.AdamW, **adamw)
        else:
            self.optimizer = torch.optim.AdamW(self._param_groups(), **adamw)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.ema = EMA(self.modules, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.step = 0
        self.saved_step = -1  # the step of the newest checkpoint written or resumed from
        self.bad_steps = 0
        self.skipped = 0
        self.sigterm = False  # set by the signal handler, in this process
        self.clock = time.monotonic  # seconds, for cfg.time_budget; replaceable so tests can fix the speed
        self.stop_requested = False  # agreed by all processes: stop after this step
        self.history: list[dict[str, float]] = []

    def _param_groups(self) -> list[dict[str, Any]]:
        """One optimizer group per distinct peak LR (cfg.module_lr), in module order: a run without per-module
        LRs has a single group, as its checkpoints always had. The schedule scales every group alike."""
        unknown = set(self.cfg.module_lr) - set(self.modules)
        if unknown:
            raise ValueError(f"a learning rate was given for {sorted(unknown)}, which this run does not train")
        groups: dict[float, list[nn.Parameter]] = {}
        for name, m in self.modules.items():
            lr = self.cfg.module_lr.get(name, self.cfg.lr)
            groups.setdefault(lr, []).extend(p for p in m.parameters() if p.requires_grad)
        return [{"params": params, "lr": lr} for lr, params in groups.items()]

    # --- state -------------------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {"step": self.step, "skipped": self.skipped,
                "modules": {n: m.state_dict() for n, m in self.modules.items()},
                "ema": self.ema.shadow if self.ema else None, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": rng_state(),
                **({"scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}),
                "config": {k: str(v) for k, v in asdict(self.cfg).items()}}

    def resume(self) -> None:
        path, state = load_latest(self.cfg.run_dir, quiet=self.rank != 0)
        saved = set(state.get("modules", {}))
        if saved != set(self.modules):  # another stage's run, or the text encoder trained in one run and not the other
            raise ResumeError(f"--resume: {path} holds the state of {sorted(saved)}, this run trains "
                              f"{sorted(self.modules)} (another stage's run, or --train-text-encoder changed?)")
        for name, m in self.modules.items():
            m.load_state_dict(state["modules"][name])
        if self.ema and state.get("ema"):
            self.ema.shadow = {n: {k: v.to(self.device) for k, v in sd.items()} for n, sd in state["ema"].items()}
        if len(state["optimizer"]["param_groups"]) != len(self.optimizer.param_groups):
            raise ResumeError(f"--resume: {path} was trained with {len(state['optimizer']['param_groups'])} "
                              f"learning-rate group(s), this run has {len(self.optimizer.param_groups)} "
                              "(was --text-lr added or dropped?)")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.step, self.skipped = state["step"], state.get("skipped", 0)
        self.saved_step = self.step
        if self.rank == 0:  # log records past the checkpoint are from steps that will be trained again
            log_path = self.cfg.run_dir / "log.jsonl"
            if log_path.exists():
                kept = [line for line in log_path.read_text().splitlines() if _logged_step(line) <= self.step]
                log_path.write_text("".join(line + "\n" for line in kept))
        self.log(f"resumed from {path} at step {self.step}")

    def save(self) -> None:
        if self.step == self.saved_step:
            return
        if isinstance(self.optimizer, ZeroRedundancyOptimizer):
            self.optimizer.consolidate_state_dict(to=0)  # every process sends rank 0 its shard of the state
        if self.rank == 0:
            save_checkpoint(self.cfg.run_dir, self.step, self.state(), keep=self.cfg.keep)
        if self.world > 1:
            dist.barrier()
        self.saved_step = self.step

    def log(self, message: str) -> None:
        if self.rank == 0 and not self.cfg.quiet:
            print(message, file=sys.stderr)

    # --- the loop ----------------------------------------------------------------------------------------------

    def _on_sigterm(self, signum, frame) -> None:  # finish the step, save, leave
        self.sigterm = True

    def train_step(self) -> tuple[float, dict[str, float]]:
        """One optimizer step over the global batch; returns the mean loss (NaN if it was skipped: a non-finite
        loss or gradient leaves the weights, the optimizer state and the EMA as they were)."""
        cfg = self.cfg
        autocast = self.autocast
        self.optimizer.zero_grad(set_to_none=True)
        total, logs = 0.0, {}
        finite = True
        if self.prefetcher is not None:  # queue the coming steps' slices, enough to keep every worker busy
            ahead = max(2, -(-2 * self.prefetcher.workers // cfg.grad_accum))
            self.prefetcher.request([k for s in range(self.step + 1, min(cfg.steps, self.step + 1 + ahead))
                                     for k in self._slices(s)])
        slices = self._slices(self.step)
        for i, key in enumerate(slices):
            items = self.prefetcher.take(key) if self.prefetcher is not None else None
            batch = self.stage.batch(self.step, range(key[1], key[2]), self.device, items)
            # DDP averages gradients on the last micro-step only; the others accumulate locally
            last = i == len(slices) - 1
            with (contextlib.nullcontext() if last or self.world == 1 else self.loss_module.no_sync()):
                with torch.autocast(self.device.type, dtype=autocast, enabled=autocast is not None):
                    loss, parts = self.loss_module(batch, self.step)
                finite &= bool(torch.isfinite(loss).item())
                self.scaler.scale(loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
            for k, v in parts.items():
                logs[k] = logs.get(k, 0.0) + v / cfg.grad_accum
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.world > 1:  # average loss and logged parts; agree on finiteness and on a SIGTERM
            keys = sorted(logs)
            flags = torch.tensor([0.0 if finite else 1.0, float(self.sigterm), total if finite else 0.0,
                                  *(logs[k] if finite else 0.0 for k in keys)], dtype=torch.float64, device=self.device)
            dist.all_reduce(flags)
            finite, total = flags[0].item() == 0, flags[2].item() / self.world
            logs = {k: flags[3 + i].item() / self.world for i, k in enumerate(keys)}
            self.stop_requested = flags[1].item() > 0  # torchrun signals all; they stop after the same step
        self.scaler.unscale_(self.optimizer)  # true gradients for the clip (a no-op unless fp16)
        if finite:  # also catches inf/NaN gradients from a finite loss (fp16 overflow included); clips when > 0
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            finite = bool(torch.isfinite(norm).item())
        if finite:
            self.scaler.step(self.optimizer)
        self.scaler.update()  # an overflow lowers the fp16 loss scale for the next step
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # (a skipped first step: "scheduler.step() before optimizer.step()")
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()  # the LR follows the step count, skipped steps included
        if not finite:
            return float("nan"), logs
        if self.ema:
            self.ema.update(self.modules, self.step)
        return total, logs

    def _optimizer_memory(self) -> str:
        """--shard-optimizer: the optimizer state the process holding most holds, and all together (a collective)."""
        if self.world == 1:
            return "--shard-optimizer: one process, nothing to shard"
        local = getattr(self.optimizer, "optim", self.optimizer).state  # ZeRO's local optimizer
        held = torch.tensor([float(sum(v.numel() * v.element_size() for s in local.values() for v in s.values()
                                       if torch.is_tensor(v)))] * 2, dtype=torch.float64, device=self.device)
        dist.all_reduce(held[:1], op=dist.ReduceOp.MAX)
        dist.all_reduce(held[1:])
        return (f"optimizer state sharded over {self.world} processes: {held[0].item() / 2**20:.2f} MiB at most on "
                f"one, {held[1].item() / 2**20:.2f} MiB in all")

    def _slices(self, step: int) -> list[tuple[int, int, int]]:
        """(step, start, stop) of this process's micro-batches of global step `step`."""
        per_step = self.cfg.batch_size // self.cfg.grad_accum
        starts = [micro * per_step + self.rank * self.micro for micro in range(self.cfg.grad_accum)]
        return [(step, start, start + self.micro) for start in starts]

    def _fit_to_budget(self, requested: int, started: tuple[int, float], deadline: float) -> None:
        """Set cfg.steps so the run ends at the deadline, from the speed measured since `started` (step, time);
        never above the requested steps, never below the current step. All processes take the smallest."""
        now = self.clock()
        rate = (self.step - started[0]) / max(now - started[1], 1e-9)
        fit = torch.tensor(self.step + int(rate * (deadline - now)), dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(fit, op=dist.ReduceOp.MIN)
        self.cfg.steps = max(self.step, min(requested, int(fit.item())))

    def run(self, resume: bool = False, stop_at: int | None = None) -> dict[str, nn.Module]:
        """Train to cfg.steps (from the newest checkpoint with resume=True). stop_at pauses earlier, as SIGTERM
        does: a checkpoint of that step, and a later run(resume=True) goes on exactly as if never paused.

        A step whose loss or gradients are not finite is skipped (its batch is passed over, the weights are left
        as they were, and `skipped` counts it); cfg.max_bad_steps of them in a row raise TrainingAborted.

        With cfg.time_budget, the step count is refitted at every log step from the speed measured so far (after
        a few warm-up steps), so the run, its LR schedule included, ends within the budget: cfg.steps is then an
        upper bound, and the count reached is in the log."""
        cfg = self.cfg
        requested = cfg.steps
        deadline = self.clock() + cfg.time_budget if cfg.time_budget > 0 else None
        timing_from: tuple[int, float] | None = None
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self.resume()
        elif checkpoints(cfg.run_dir):
            raise ResumeError(f"{cfg.run_dir} already holds checkpoints: resume from them, or choose a new folder")
        log_path = cfg.run_dir / "log.jsonl"
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        bar = None
        if self.rank == 0 and not cfg.quiet:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, initial=self.step, unit="step", file=sys.stderr, dynamic_ncols=True,
                       desc=self.stage.name)
        last_time, images = time.perf_counter(), 0
        end = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
        start_step = self.step
        try:
            while self.step < end and not self.stop_requested:
                if deadline is not None and timing_from is None and self.step >= start_step + 5:
                    timing_from = (self.step, self.clock())  # after warm-up (allocations, autotuning)
                loss, parts = self.train_step()
                if self.world == 1:
                    self.stop_requested = self.sigterm
                images += cfg.batch_size
                self.step += 1  # a skipped step still uses up its batch: the same data would fail again
                if self.step == start_step + 1 and cfg.shard_optimizer:  # AdamW makes its state in its first step
                    message = self._optimizer_memory()
                    if bar is not None:
                        bar.write(message, file=sys.stderr)
                    else:
                        self.log(message)
                if math.isfinite(loss):
                    self.bad_steps = 0
                else:
                    self.bad_steps += 1
                    self.skipped += 1
                    if self.bad_steps >= cfg.max_bad_steps:
                        last = checkpoints(cfg.run_dir) if self.rank == 0 else []
                        raise TrainingAborted(
                            f"{self.bad_steps} non-finite losses in a row (steps {self.step - self.bad_steps + 1}.."
                            f"{self.step}); training stopped: "
                            + (f"the last good checkpoint {last[-1]} is intact" if last else
                               "no checkpoint had been saved yet") + " (lower --lr, or check the data)")
                if deadline is not None and timing_from is not None and self.step % cfg.log_every == 0:
                    self._fit_to_budget(requested, timing_from, deadline)
                    end = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
                    if bar is not None:
                        bar.total = cfg.steps
                if (cfg.log_every and self.step % cfg.log_every == 0) or self.step == cfg.steps:
                    now = time.perf_counter()
                    record = {"step": self.step, "loss": loss if math.isfinite(loss) else None,
                              "lr": self.scheduler.get_last_lr()[0], "images_per_s": images / (now - last_time),
                              "skipped": self.skipped, **parts}
                    if deadline is not None:
                        record["planned_steps"] = cfg.steps
                    last_time, images = now, 0
                    self.history.append(record)
                    if self.rank == 0:
                        with open(log_path, "a") as f:
                            f.write(json.dumps(record) + "\n")
                        if bar is not None:
                            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{record['images_per_s']:.0f}")
                if bar is not None:
                    bar.update(1)
                # checkpoints only after a good step: the last one before a run of bad steps stays the newest
                if cfg.save_every and self.step % cfg.save_every == 0 and self.bad_steps == 0:
                    self.save()
                if cfg.sample_every and self.step % cfg.sample_every == 0 and self.rank == 0:
                    self.pictures()
        finally:
            signal.signal(signal.SIGTERM, previous)
            if bar is not None:
                bar.close()
            if self.prefetcher is not None:
                self.prefetcher.close()
                self.prefetcher = None
        self.save()
        if self.rank == 0:
            self.pictures(samples=self.step >= cfg.steps)  # a pause (SIGTERM, stop_at) leaves promptly
        if self.stop_requested:
            self.log(f"stopped by SIGTERM at step {self.step}; checkpoint saved, resume with --resume")
        return self.final_modules()

    def close(self) -> None:
        """Under torchrun, leave the process group together once all is written: a process that exits with the
        group's threads still running aborts ("terminate called without an active exception", seen under
        --shard-optimizer), and torchrun then fails the whole run."""
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def final_modules(self) -> dict[str, nn.Module]:
        """The trained modules, with EMA weights when an EMA is kept."""
        if self.ema:
            self.ema.copy_to(self.modules)
        for m in self.modules.values():
            m.eval()
        return self.modules

    def pictures(self, samples: bool = True) -> None:
        """The loss curve and a grid of samples. Only pictures: a failure is reported, never costs the run."""
        try:
            write_loss_curve(self.cfg.run_dir / "log.jsonl", self.cfg.run_dir / "loss.png")
            if samples:
                self.stage.samples(self.modules, self.step, self.cfg.run_dir / f"samples-{self.step:09d}.png")
        except Exception as e:  # noqa: BLE001 - any failure to draw must leave training alone
            print(f"sdengine: could not write pictures at step {self.step}: {type(e).__name__}: {e}", file=sys.stderr)


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf  # a line cut by a kill: dropped

