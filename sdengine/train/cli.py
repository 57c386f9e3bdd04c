"""`sdengine train vae | text | unet`: one stage per command, each resumable, each leaving a file the next reads.

    sdengine train vae  --data shapes --out runs/vae
    sdengine train text --data shapes --out runs/text
    sdengine train unet --data shapes --out runs/unet --vae runs/vae/vae.safetensors --text runs/text/text.safetensors
    sdengine train unet --data DIR --out runs/ft --init model.safetensors      (fine-tune a whole model)
    sdengine train vae --out runs/dec --init model.safetensors --decoder-only  (a sharper decoder, same latents)

Under `torchrun --nproc_per_node N` the same commands train data-parallel.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from ..config import TextConfig, UNetConfig, VAEConfig

# Architectures sized for the shapes world on a CPU: 64x64 images, f=4 latents (16x16x4).
ARCH = {
    "shapes": {
        # 48 channels at full resolution: with 16, and still with 32, the points of small stars and the arms of
        # small crosses were lost (they came back as circles and diamonds, failing the checker). 2.1 M parameters.
        "vae": VAEConfig(ch=48, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=16),
        "text": TextConfig(width=256, layers=4, heads=4, mlp_width=1024),
        # 9.0 M parameters, so the whole fp16 model (with the 3.3 M text encoder and the VAE) stays under 30 MB:
        # one res block per level, cross-attention at 16x16 and 8x8 (where colour-shape bindings and positions
        # are decided) and in the middle block; at 4x4 a 3x3 convolution already sees the whole latent.
        "unet": UNetConfig(model_channels=64, channel_mult=(1, 2, 3), num_res_blocks=(1, 1, 1),
                           attention_resolutions=(1, 2), num_heads=-1, num_head_channels=32,
                           use_linear_in_transformer=True),
    },
    "tiny": {  # for tests: seconds per hundred steps
        "vae": VAEConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1),
        "text": TextConfig(width=32, layers=1, heads=2, mlp_width=64),
        "unet": UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=(1, 1), attention_resolutions=(2,),
                           num_heads=-1, num_head_channels=16, use_linear_in_transformer=True),
    },
}
DEFAULTS = {  # steps, batch, lr per stage
    "vae": (6000, 32, 2e-4), "text": (3000, 128, 3e-4), "unet": (40000, 64, 2e-4),
}


def register(sub) -> None:
    p = sub.add_parser("train", help="train a stage: vae, text (encoder) or unet")
    p.add_argument("stage", choices=["vae", "text", "unet"])
    p.add_argument("--data", default="shapes", help="'shapes' (the procedural world) or a folder of images+captions")
    p.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, logs, pictures, result)")
    p.add_argument("--arch", default="shapes", choices=sorted(ARCH), help="architecture preset for fresh models")
    p.add_argument("--size", type=int, default=64, help="image size")
    p.add_argument("--scene-kinds", default=None,
                   help="shapes: the scene kinds the stream rotates through, comma-separated (a kind named twice has "
                        "twice the share; kinds: single, relation, counting, pair, combination, counted_pair, "
                        "counted_relation); default: SCENE_KINDS in sdengine/data/shapes.py")
    p.add_argument("--color-drop", type=float, default=None,
                   help="shapes: how often a caption leaves an object's colour unsaid (default: COLOR_DROP, 0.15)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="global batch size")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--ema", type=float, default=None, help="EMA decay (default: 0.999 for unet, off otherwise)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="autocast dtype; auto: bf16 on a GPU and on CPUs with bf16 instructions (AVX512-BF16, AMX), "
                        "else fp32 (emulated bf16 runs ~3x slower than fp32)")
    p.add_argument("--save-every", type=int, default=500, help="steps between checkpoints (0: only at the end)")
    p.add_argument("--log-every", type=int, default=20, help="steps between log.jsonl records")
    p.add_argument("--max-bad-steps", type=int, default=20, help="non-finite losses in a row before giving up")
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    p.add_argument("--sample-every", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--vae", type=Path, default=None, help="unet: the trained VAE (vae.safetensors)")
    p.add_argument("--text", type=Path, default=None,
                   help="unet: the trained text encoder (text.safetensors); with --init, it replaces the model's own")
    p.add_argument("--init", type=Path, default=None,
                   help="unet: fine-tune this whole model (any SD checkpoint); vae: start from this VAE (a VAE file "
                        "or a whole checkpoint's)")
    p.add_argument("--decoder-only", action="store_true",
                   help="vae: train the decoder alone; the latents, and so any UNet trained on them, stay valid")
    p.add_argument("--prediction", default="eps", choices=["eps", "v"])
    p.add_argument("--compile", action="store_true",
                   help="unet: compile the UNet with TorchInductor (fused kernels: 1.47x the images/s of the "
                        "shipped model's step on an H100; costs a minute or so of compilation first)")
    p.add_argument("--train-text-encoder", action="store_true",
                   help="unet: train the text encoder with the UNet (same optimizer) instead of freezing it")
    p.add_argument("--hard-negatives", action="store_true",
                   help="text: also contrast each shapes caption with captions worded alike that mean another scene "
                        "(relation turned round, colours exchanged), so the encoder must carry who is where")
    p.add_argument("--timestep-shift", type=float, default=1.0, metavar="S",
                   help="unet: draw training timesteps towards the noisy end, t/T = S u / (1 + (S - 1) u) for uniform "
                        "u (1: uniform, as SD; 3: half of them above t = 750, where the layout is decided)")
    p.add_argument("--snr-floor", type=float, default=0.0, metavar="F",
                   help="unet: weigh each step's error in x0 by at least F (min-SNR weighting clamps it to at most 5; "
                        "eps prediction weighs it by SNR, ~0.005-0.05 at the steps that settle the layout)")
    p.add_argument("--clip-skip", type=int, default=1, metavar="K",
                   help="unet: condition on the text encoder's K-th layer from the end of those the model reads now "
                        "(2: the one before, as kohya's --clip_skip); the saved model records it and reads that layer "
                        "by default, so fine-tune it further without --clip-skip")
    p.add_argument("--text-lr", type=float, default=None, metavar="LR",
                   help="with --train-text-encoder: the text encoder's peak LR (default: --lr); the same warmup "
                        "and cosine apply")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--workers", type=int, default=None,
                   help="processes preparing coming batches (default: 0 on CPU, where they would take cores from "
                        "training; up to 8 with a GPU)")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="end the run at this step and write its result, the LR schedule still running to --steps "
                        "(--resume later goes on from there as if never stopped)")
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="end the run (LR schedule included) within this wall time: the step count is fitted to the "
                        "measured speed, --steps becomes an upper bound")
    p.add_argument("--cache-latents", type=int, default=None, metavar="N",
                   help="unet: encode N training images with the VAE once (a folder: all of it at most) and train "
                        "on those latents; kept in the run folder for --resume")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)


def build_stage(args: argparse.Namespace):
    from . import stages
    from .data import ShapesSource, make_source

    kinds = None if args.scene_kinds is None else tuple(k.strip() for k in args.scene_kinds.split(",") if k.strip())
    source = make_source(args.data, args.size, args.seed, kinds, args.color_drop)
    arch = ARCH[args.arch]
    if args.stage == "vae":
        if args.init is None:
            return stages.VAEStage(arch["vae"], source, seed=args.seed, decoder_only=args.decoder_only)
        vae, cfg, model = stages.load_vae_init(args.init)
        return stages.VAEStage(cfg, source, seed=args.seed, init=vae, decoder_only=args.decoder_only, model=model)
    if args.stage == "text":
        captions = source.captions() if isinstance(source, ShapesSource) else [source.item(i)[1] for i in
                                                                                  range(len(source.items))]
        tokenizer_dir = args.out / "tokenizer"
        if args.resume and tokenizer_dir.exists():  # the vocabulary is part of the run: reuse it
            from ..tokenizer import CLIPTokenizer
            tokenizer = CLIPTokenizer.from_dir(tokenizer_dir)
        else:
            tokenizer = stages.train_tokenizer(captions)
            args.out.mkdir(parents=True, exist_ok=True)
            tokenizer.save(tokenizer_dir)
        return stages.TextStage(arch["text"], source, tokenizer, seed=args.seed, hard_negatives=args.hard_negatives)
    if args.init is not None:
        from ..weights import load
        if args.vae is not None:
            raise ValueError("--vae does not go with --init: the VAE is the checkpoint's (its latents are what the "
                             "UNet learnt)")
        model = load(args.init)
        if args.text is not None:  # fine-tune on another text encoder than the checkpoint's
            model = stages.replace_text_encoder(model, args.text)
        model.requires_grad_(True)
    else:
        if args.vae is None or args.text is None:
            raise ValueError("train unet needs --vae and --text (the trained stages), or --init CHECKPOINT")
        model = stages.assemble(arch["unet"], args.vae, args.text, args.prediction, sample_size=args.size)
    if args.clip_skip != 1:
        model = stages.read_text_layer(model, args.clip_skip)
    return stages.UNetStage(model, source, seed=args.seed, train_text=args.train_text_encoder,
                            timestep_shift=args.timestep_shift, snr_floor=args.snr_floor)


def cmd_train(args: argparse.Namespace) -> None:
    from .checkpoint import ResumeError, checkpoints
    from .trainer import TrainConfig, Trainer

    steps, batch, lr = DEFAULTS[args.stage]
    for name, value in (("--steps", args.steps), ("--batch", args.batch), ("--grad-accum", args.grad_accum),
                        ("--log-every", args.log_every), ("--max-bad-steps", args.max_bad_steps)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1 (got {value})")
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers must be 0 or more (got {args.workers})")
    if args.stop_at is not None and args.stop_at < 1:
        raise ValueError(f"--stop-at must be a step of 1 or more (got {args.stop_at})")
    if args.time_budget is not None and args.time_budget <= 0:
        raise ValueError(f"--time-budget must be positive minutes (got {args.time_budget})")
    if args.save_every < 0:
        raise ValueError(f"--save-every must be 0 or more (got {args.save_every})")
    if args.out.exists() and any(args.out.glob("step-*")) and not args.resume:
        raise ValueError(f"{args.out} already holds checkpoints: pass --resume to continue, or choose a new --out")
    if args.resume and not checkpoints(args.out):  # before building anything (the text stage writes a tokenizer)
        raise ResumeError(f"--resume: no complete checkpoint in {args.out} (nothing to resume; drop --resume "
                          "to start fresh)")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if device.type == "cuda":  # fixed shapes: let cuDNN pick its fastest kernels; TF32 for what runs in fp32
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    workers = args.workers if args.workers is not None else (
        min(8, max(0, (os.cpu_count() or 1) - 2)) if device.type == "cuda" else 0)
    if args.train_text_encoder and args.stage != "unet":
        raise ValueError("--train-text-encoder is for train unet (train text pretrains the encoder on its own)")
    if args.timestep_shift != 1.0 and args.stage != "unet":
        raise ValueError("--timestep-shift is for train unet")
    if args.timestep_shift <= 0:
        raise ValueError(f"--timestep-shift must be positive (got {args.timestep_shift})")
    if args.hard_negatives and args.stage != "text":
        raise ValueError("--hard-negatives is for train text (the contrastive pretraining)")
    if args.text_lr is not None and not args.train_text_encoder:
        raise ValueError("--text-lr needs --train-text-encoder (a frozen text encoder has no learning rate)")
    if args.text_lr is not None and args.text_lr <= 0:
        raise ValueError(f"--text-lr must be positive (got {args.text_lr})")
    if args.clip_skip != 1 and args.stage != "unet":
        raise ValueError("--clip-skip is for train unet (which text encoder layer the UNet reads)")
    if args.decoder_only and args.stage != "vae":
        raise ValueError("--decoder-only is for train vae")
    if args.cache_latents is not None and args.stage != "unet":
        raise ValueError("--cache-latents is for train unet (the VAE's latents are what the UNet learns from)")
    torch.manual_seed(args.seed)  # fresh weights depend on --seed only (and are the same in every process)
    stage = build_stage(args)
    if args.cache_latents is not None:
        from .latent_cache import prepare_cache

        data = args.data if args.data == "shapes" else str(Path(args.data).resolve())
        cache = prepare_cache(args.out, stage.source, {"data": data, "size": args.size, "seed": args.seed,
                                                       **getattr(stage.source, "mix", {})},
                              args.cache_latents, stage.model.vae, stage.model.tokenizer,
                              stage.model.config.text.max_positions, device, workers, args.quiet)
        stage.use_cache(cache)
        workers = 0  # the steps read the cache: nothing left to prepare in other processes
    if args.compile:
        if args.stage != "unet":
            raise ValueError("--compile is for train unet")
        from ..compile import compile_unet_for_training
        compile_unet_for_training(stage.model.to(device))
    if args.grad_checkpointing and hasattr(stage, "model"):
        stage.model.unet.gradient_checkpointing = True
    ema = args.ema if args.ema is not None else (0.999 if args.stage == "unet" else 0.0)
    cfg = TrainConfig(run_dir=args.out, steps=args.steps or steps, batch_size=args.batch or batch, lr=args.lr or lr,
                      warmup=args.warmup, grad_accum=args.grad_accum, ema_decay=ema, precision=args.precision,
                      save_every=args.save_every, keep=args.keep, log_every=args.log_every,
                      sample_every=args.sample_every, seed=args.seed, max_bad_steps=args.max_bad_steps,
                      quiet=args.quiet, workers=workers, time_budget=60 * (args.time_budget or 0),
                      module_lr={"text": args.text_lr} if args.text_lr is not None else {})
    trainer = Trainer(stage, cfg, device)
    modules = trainer.run(resume=args.resume, stop_at=args.stop_at)
    if trainer.stop_requested:
        return
    if trainer.rank == 0:
        stage.export(modules, args.out)
        print(f"trained {args.stage} for {trainer.step} steps ({trainer.skipped} skipped); wrote {args.out}")
