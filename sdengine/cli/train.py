"""`sdengine train vae | text | unet`: one stage per command, each resumable, each leaving a file the next reads.

    sdengine train vae  --data shapes --out runs/vae
    sdengine train text --data shapes --out runs/text
    sdengine train unet --data shapes --out runs/unet --vae runs/vae/vae.safetensors --text runs/text/text.safetensors
    sdengine train unet --data DIR --out runs/ft --init model.safetensors      (fine-tune a whole model)
    sdengine train vae --out runs/dec --init model.safetensors --decoder-only  (a sharper decoder, same latents)
    sdengine train lora --init model.safetensors --data shapes:pink --rank 8 --out runs/pink-lora
    sdengine train embedding --init model.safetensors --data shapes:pink --token pink --vectors 2 --out runs/pink-ti
    sdengine train lcm --init model.safetensors --data shapes --out runs/lcm          (4-step LCM; --lora-rank R: LoRA)
    sdengine train controlnet --init model.safetensors --data shapes --hint layout --out runs/layout-cn

Each stage has its own options (an option of another stage is a usage error that names it); values are checked by
argparse as they are parsed. Under `torchrun --nproc_per_node N` the same commands train data-parallel. torch is
imported only when a command runs, so building the parser (`sdengine --help`) stays fast.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ..config import PRESETS
from ..runtime import DEVICES, PRECISIONS
from .options import decay, fraction, non_negative_float, non_negative_int, positive_float, positive_int

STAGES = {"vae": "the autoencoder (KL-regularized, SD's layout)",
          "text": "the text encoder (CLIP-style contrastive pretraining, own BPE vocabulary)",
          "unet": "the denoiser, on a trained VAE and text encoder or a whole model (--init)",
          "lora": "a LoRA (kohya-ss layout; LoCon with --conv-rank) on a whole model (--init), the model frozen",
          "embedding": "a textual inversion embedding (--token) on a whole model (--init), the model frozen",
          "lcm": "a few-step latent consistency model (LCM) distilled from a whole model (--init), or an LCM-LoRA",
          "taesd": "a tiny autoencoder (TAESD) distilled from a whole model's VAE (--init), for previews and fast "
                   "decodes",
          "controlnet": "a ControlNet (from the UNet's encoder, zero convolutions at zero) on a whole model (--init), "
                        "the model frozen"}
DEFAULTS = {  # per stage: steps, global batch, peak LR, EMA decay
    "vae": {"steps": 6000, "batch": 32, "lr": 2e-4, "ema": 0.0},
    "text": {"steps": 3000, "batch": 128, "lr": 3e-4, "ema": 0.0},
    "unet": {"steps": 40000, "batch": 64, "lr": 2e-4, "ema": 0.999},
    "lora": {"steps": 1500, "batch": 32, "lr": 1e-4, "ema": 0.0},
    "embedding": {"steps": 1500, "batch": 32, "lr": 5e-3, "ema": 0.0},
    "lcm": {"steps": 2000, "batch": 32, "lr": 5e-5, "ema": 0.0},  # the target network's EMA is --ema-decay
    "taesd": {"steps": 4000, "batch": 16, "lr": 1e-3, "ema": 0.0},
    "controlnet": {"steps": 3000, "batch": 32, "lr": 1e-4, "ema": 0.0},
}


def name_list(text: str) -> tuple[str, ...]:
    names = tuple(k.strip() for k in text.split(",") if k.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


class OtherStageOption(argparse.Action):
    """An option of another stage, hidden: using it is a usage error that says which stage it is for."""

    def __init__(self, option_strings: list[str], dest: str, stages: tuple[str, ...], **kwargs: Any):
        super().__init__(option_strings, argparse.SUPPRESS, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                         **kwargs)
        self.stages = stages

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f"{option_string} is for {' and '.join(f'train {s}' for s in self.stages)}")


# --- the parsers ------------------------------------------------------------------------------------------------

def configure(name: str, p: argparse.ArgumentParser) -> None:
    """Build `sdengine train`'s parser `p`: one subcommand per stage."""
    p.description = "Train one stage of Stable Diffusion; see `sdengine train STAGE --help`."
    stages = p.add_subparsers(dest="stage", required=True, metavar="STAGE")
    parsers = {name: stages.add_parser(name, help=text, description=f"Train {text}.")
               for name, text in STAGES.items()}
    for name, sp in parsers.items():
        add_shared_options(sp, name)
        sp.set_defaults(func=cmd_train)
    vae, text, unet = parsers["vae"], parsers["text"], parsers["unet"]
    vae.add_argument("--init", type=Path, help="start from this VAE: a VAE file (`train vae`'s or SD's) or a whole "
                     "checkpoint's (then with --decoder-only)")
    vae.add_argument("--decoder-only", action="store_true",
                     help="train the decoder alone; the latents, and so any UNet trained on them, stay valid")
    text.add_argument("--hard-negatives", action="store_true",
                      help="also contrast each shapes caption with captions worded alike that mean another scene "
                           "(relation turned round, colours exchanged), so the encoder must carry who is where")
    add_unet_options(unet)
    add_lora_options(parsers["lora"])
    add_embedding_options(parsers["embedding"])
    add_lcm_options(parsers["lcm"])
    add_taesd_options(parsers["taesd"])
    add_controlnet_options(parsers["controlnet"])
    refuse_other_stages_options(parsers)


def add_shared_options(p: argparse.ArgumentParser, stage: str) -> None:
    """The options every stage has: data, schedule, precision, checkpoints, devices."""
    d = DEFAULTS[stage]
    data = p.add_argument_group("data")
    data.add_argument("--data", default="shapes", help="'shapes' (the procedural world), 'shapes:pink[:SHARE]' (the "
                      "world with a colour the shipped model never saw: SHARE of the scenes, default 0.5, have a pink "
                      "object named in their caption, the rest are ordinary scenes; for teaching it a new concept) "
                      "or a folder of images with captions")
    data.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, logs, pictures, result)")
    data.add_argument("--arch", default="shapes", choices=sorted(PRESETS),
                      help="architecture of fresh models, a preset of sdengine.config (default: the shipped model's)")
    data.add_argument("--size", type=positive_int, default=None, help="image size (default: the preset's)")
    data.add_argument("--scene-kinds", type=name_list, default=None,
                      help="shapes: the scene kinds the stream rotates through, comma-separated (a kind named twice "
                           "has twice the share; kinds: single, relation, counting, pair, combination, counted_pair, "
                           "counted_relation); default: SCENE_KINDS in sdengine/data/shapes.py")
    data.add_argument("--color-drop", type=fraction, default=None,
                      help="shapes: how often a caption leaves an object's colour unsaid (default: COLOR_DROP, 0.15)")
    data.add_argument("--seed", type=int, default=0, help="fresh weights, data order and noise")
    data.add_argument("--workers", type=non_negative_int, default=None,
                      help="processes preparing coming batches (default: 0 on a CPU, where they would take cores "
                           "from training; up to 8 with a GPU)")
    sched = p.add_argument_group("schedule")
    sched.add_argument("--steps", type=positive_int, default=d["steps"], help=f"optimizer steps ({d['steps']})")
    sched.add_argument("--batch", type=positive_int, default=d["batch"], help=f"global batch size ({d['batch']})")
    sched.add_argument("--lr", type=positive_float, default=d["lr"], help=f"peak learning rate ({d['lr']:g})")
    sched.add_argument("--warmup", type=non_negative_int, default=200, help="linear warmup steps (200)")
    sched.add_argument("--grad-accum", type=positive_int, default=1, help="micro-steps per optimizer step")
    sched.add_argument("--ema", type=decay, default=d["ema"], help=f"EMA decay ({d['ema']:g}; 0: none)")
    sched.add_argument("--shard-optimizer", action="store_true", help="under torchrun: each process keeps the "
                       "AdamW state of 1/N of the weights (ZeRO-1; checkpoints hold it whole)")
    sched.add_argument("--precision", default="auto", choices=PRECISIONS,
                       help="autocast dtype; auto: bf16 on a GPU and on CPUs with bf16 instructions (AVX512-BF16, "
                            "AMX), else fp32 (emulated bf16 runs ~3x slower than fp32); fp16 scales the loss")
    sched.add_argument("--stop-at", type=positive_int, default=None, metavar="STEP",
                       help="end the run at this step and write its result, the LR schedule still running to "
                            "--steps (--resume later goes on from there as if never stopped)")
    sched.add_argument("--time-budget", type=positive_float, default=None, metavar="MINUTES",
                       help="end the run (LR schedule included) within this wall time: the step count is fitted to "
                            "the measured speed, --steps becomes an upper bound")
    run = p.add_argument_group("run")
    run.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    run.add_argument("--save-every", type=non_negative_int, default=500,
                     help="steps between checkpoints (0: only at the end)")
    run.add_argument("--keep", type=non_negative_int, default=3, help="checkpoints to keep (0: all)")
    run.add_argument("--log-every", type=positive_int, default=20, help="steps between log.jsonl records")
    run.add_argument("--sample-every", type=non_negative_int, default=0,
                     help="steps between sample grids (0: only at the end)")
    run.add_argument("--max-bad-steps", type=positive_int, default=20,
                     help="non-finite losses in a row before giving up")
    run.add_argument("--device", default="auto", choices=DEVICES)
    run.add_argument("--quiet", action="store_true")


def add_unet_options(p: argparse.ArgumentParser) -> None:
    model = p.add_argument_group("model")
    model.add_argument("--vae", type=Path, help="the trained VAE (vae.safetensors)")
    model.add_argument("--text", type=Path,
                       help="the trained text encoder (text.safetensors); with --init, it replaces the model's own")
    model.add_argument("--init", type=Path, help="fine-tune this whole model (any SD checkpoint)")
    model.add_argument("--prediction", default="eps", choices=["eps", "v"], help="a fresh UNet's target")
    model.add_argument("--clip-skip", type=positive_int, default=1, metavar="K",
                       help="condition on the text encoder's K-th layer from the end of those the model reads now "
                            "(2: the one before, as kohya's --clip_skip); the saved model records it and reads that "
                            "layer by default, so fine-tune it further without --clip-skip")
    model.add_argument("--train-text-encoder", action="store_true",
                       help="train the text encoder with the UNet (same optimizer) instead of freezing it")
    model.add_argument("--text-lr", type=positive_float, default=None, metavar="LR",
                       help="with --train-text-encoder: the text encoder's peak LR (default: --lr); the same warmup "
                            "and cosine apply")
    add_loss_options(p)
    speed = p.add_argument_group("speed")
    speed.add_argument("--cache-latents", type=positive_int, default=None, metavar="N",
                       help="encode N training images with the VAE once (a folder: all of it at most) and train on "
                            "those latents; kept in the run folder for --resume")
    speed.add_argument("--compile", action="store_true",
                       help="compile the UNet with TorchInductor (fused kernels: 1.47x the images/s of the shipped "
                            "model's step on an H100; costs a minute or so of compilation first)")
    speed.add_argument("--grad-checkpointing", action="store_true",
                       help="recompute the UNet's activations in backward instead of keeping them (less memory)")


def add_loss_options(p: argparse.ArgumentParser, snr_floor: bool = True) -> None:
    """Where a stage with the UNet's loss (unet, lora, embedding, controlnet; lcm: the shift only) puts its gradient
    along the noise levels."""
    loss = p.add_argument_group("loss")
    loss.add_argument("--timestep-shift", type=positive_float, default=1.0, metavar="S",
                      help="draw training timesteps towards the noisy end, t/T = S u / (1 + (S - 1) u) for uniform u "
                           "(1: uniform, as SD; 3: half of them above t = 750, where the layout is decided)")
    if not snr_floor:
        return
    loss.add_argument("--snr-floor", type=non_negative_float, default=0.0, metavar="F",
                      help="weigh each step's error in x0 by at least F (min-SNR weighting clamps it to at most 5; "
                           "eps prediction weighs it by SNR, ~0.005-0.05 at the steps that settle the layout; the "
                           "shipped model's last stages used 0.3)")


def add_adapter_model_options(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """What an adapter run (lora, embedding) shares: the frozen model it is trained on, and the speed options."""
    model = p.add_argument_group("model")
    model.add_argument("--init", type=Path, required=True,
                       help="the model to train on, frozen (any SD1/SD2 checkpoint)")
    speed = p.add_argument_group("speed")
    speed.add_argument("--cache-latents", type=positive_int, default=None, metavar="N",
                       help="encode N training images with the VAE once and train on those latents")
    speed.add_argument("--grad-checkpointing", action="store_true",
                       help="recompute the UNet's activations in backward instead of keeping them (less memory)")
    return model


def add_lora_options(p: argparse.ArgumentParser) -> None:
    model = add_adapter_model_options(p)
    add_loss_options(p)
    model.add_argument("--rank", type=positive_int, default=8, help="LoRA rank of the attention layers (8)")
    model.add_argument("--alpha", type=positive_float, default=None,
                       help="LoRA alpha: the output is scaled by alpha / rank (default: the rank, a scale of 1)")
    model.add_argument("--conv-rank", type=positive_int, default=None, metavar="R",
                       help="also the 3x3 convolutions of res blocks and samplers, at this rank (LoCon)")
    model.add_argument("--conv-alpha", type=positive_float, default=None, metavar="A",
                       help="with --conv-rank: their alpha (default: --conv-rank)")
    model.add_argument("--text-encoder-lr", type=non_negative_float, default=0.0, metavar="LR",
                       help="also a LoRA on the text encoder, at this peak LR (0: the UNet only, the default)")
    model.add_argument("--caption-dropout", type=fraction, default=0.1,
                       help="share of captions left empty, so guidance still works with the LoRA (0.1)")


def add_embedding_options(p: argparse.ArgumentParser) -> None:
    model = add_adapter_model_options(p)
    add_loss_options(p)
    model.add_argument("--token", required=True,
                       help="the embedding's name, the word prompts use; captions saying it train it (e.g. pink)")
    model.add_argument("--vectors", type=positive_int, default=1, help="vectors it takes in a prompt (1)")
    model.add_argument("--init-word", default=None,
                       help="start the vectors from this word's token embeddings (default: the token's own)")
    model.add_argument("--format", default="pt", choices=("pt", "safetensors"),
                       help="TOKEN.pt in A1111's layout (default) or TOKEN.safetensors with emb_params")


def guidance(text: str) -> tuple[float, float]:
    """'G' (a fixed guidance scale) or 'LOW:HIGH' (drawn uniformly per item) -> (low, high)."""
    try:
        values = [float(v) for v in text.split(":")]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or not all(1.0 <= v < float("inf") for v in values) or values[0] > values[-1]:
        raise argparse.ArgumentTypeError(f"expected a guidance scale G >= 1 or a range LOW:HIGH (1 <= LOW <= HIGH), "
                                         f"got {text!r}")
    return values[0], values[-1]


def add_lcm_options(p: argparse.ArgumentParser) -> None:
    model = add_adapter_model_options(p)
    add_loss_options(p, snr_floor=False)  # the start timesteps' draw (the loss itself is the consistency one)
    model.add_argument("--guidance", type=guidance, default=(5.0, 5.0), metavar="G[:G_MAX]",
                       help="the teacher's classifier-free guidance scale (A1111's CFG scale; diffusers' LCM scripts' "
                            "w is G - 1), or a range drawn from per item; the result is used at CFG 1 (5)")
    model.add_argument("--ema-decay", type=decay, default=None, metavar="D",
                       help="the target network is an EMA of the student with this decay (default 0.95); 0: the "
                            "student itself without gradients, the LCM-LoRA recipe (the default with --lora-rank)")
    model.add_argument("--lora-rank", type=positive_int, default=None, metavar="R",
                       help="distill an LCM-LoRA of this rank (kohya layout, lora.safetensors), not a whole model")
    model.add_argument("--lora-alpha", type=positive_float, default=None, metavar="A",
                       help="with --lora-rank: its alpha (default: the rank)")
    model.add_argument("--solver-steps", type=positive_int, default=50, metavar="N",
                       help="the teacher's DDIM schedule: N timesteps skipping 1000 // N (50, as LCM's "
                            "original_inference_steps)")
    model.add_argument("--huber-c", type=positive_float, default=0.001, help="the pseudo-Huber loss's c (0.001)")


def add_taesd_options(p: argparse.ArgumentParser) -> None:
    model = p.add_argument_group("model")
    model.add_argument("--init", type=Path, required=True,
                       help="the whole model whose VAE the tiny autoencoder learns (any SD checkpoint); its latent "
                            "space is kept")
    model.add_argument("--channels", type=positive_int, default=None,
                       help="channels of every layer (default: 64, madebyollin's, for a full-size VAE; 32 for a "
                            "small one like the shipped model's)")
    model.add_argument("--latent-weight", type=non_negative_float, default=1.0,
                       help="the encoder's latent MSE weight against the decoder's pixel MSE (1)")


def add_controlnet_options(p: argparse.ArgumentParser) -> None:
    model = p.add_argument_group("model")
    model.add_argument("--init", type=Path, required=True,
                       help="the model the ControlNet is for, frozen (any SD checkpoint); the ControlNet starts as a "
                            "copy of its UNet's encoder half")
    model.add_argument("--hint", default=None, choices=("layout", "canny", "file"),
                       help="the control images: layout (shapes: every object's silhouette white on black; the "
                            "default there), canny (edges of the training image) or file (a folder's NAME.control.png "
                            "beside NAME.png, or metadata.jsonl's conditioning_image; the default there)")
    model.add_argument("--caption-dropout", type=fraction, default=0.5,
                       help="share of captions left empty, so the ControlNet learns from the control image (0.5, "
                            "the paper's)")
    add_loss_options(p)


def refuse_other_stages_options(parsers: dict[str, argparse.ArgumentParser]) -> None:
    """Give each stage's parser the other stages' options as hidden refusals that name the stage they are for."""
    owners: dict[str, list[str]] = {}
    kinds: dict[str, int | str | None] = {}
    for name, sp in parsers.items():
        for action in sp._actions:
            for option in action.option_strings:
                owners.setdefault(option, []).append(name)
                kinds[option] = action.nargs
    for name, sp in parsers.items():
        for option, stages in owners.items():
            if name not in stages:
                sp.add_argument(option, action=OtherStageOption, stages=tuple(stages),
                                nargs=0 if kinds[option] == 0 else "?")


# --- building a stage -------------------------------------------------------------------------------------------

def build_vae(args: argparse.Namespace, source):
    from ..train.stages.vae import VAEStage, load_init

    if args.init is None:
        return VAEStage(PRESETS[args.arch].vae, source, seed=args.seed, decoder_only=args.decoder_only)
    vae, cfg, model = load_init(args.init)
    return VAEStage(cfg, source, seed=args.seed, init=vae, decoder_only=args.decoder_only, model=model)


def build_text(args: argparse.Namespace, source):
    from ..tokenizer import CLIPTokenizer
    from ..train.data import ShapesSource
    from ..train.stages.text import TextStage

    tokenizer_dir = args.out / "tokenizer"
    if args.resume and tokenizer_dir.exists():  # the vocabulary is part of the run: reuse it
        tokenizer = CLIPTokenizer.from_dir(tokenizer_dir)
    else:
        captions = (source.captions() if isinstance(source, ShapesSource)
                    else [source.item(i)[1] for i in range(len(source.items))])
        tokenizer = CLIPTokenizer.train(captions)
        args.out.mkdir(parents=True, exist_ok=True)
        tokenizer.save(tokenizer_dir)
    return TextStage(PRESETS[args.arch].text, source, tokenizer, seed=args.seed, hard_negatives=args.hard_negatives)


def build_unet(args: argparse.Namespace, source):
    from ..train.stages.unet import UNetStage, read_text_layer
    from ..weights import load
    from ..weights.parts import assemble, read_part, replace_text_encoder

    if args.text_lr is not None and not args.train_text_encoder:
        raise ValueError("--text-lr needs --train-text-encoder (a frozen text encoder has no learning rate)")
    if args.init is not None:
        if args.vae is not None:
            raise ValueError("--vae does not go with --init: the VAE is the checkpoint's (its latents are what the "
                             "UNet learnt)")
        model = load(args.init)
        if args.text is not None:  # fine-tune on another text encoder than the checkpoint's
            model = replace_text_encoder(model, read_part(args.text, "text"))
        model.requires_grad_(True)
    else:
        if args.vae is None or args.text is None:
            raise ValueError("train unet needs --vae and --text (the trained stages), or --init CHECKPOINT")
        model = assemble(PRESETS[args.arch].unet, read_part(args.vae, "vae"), read_part(args.text, "text"),
                         args.prediction, sample_size=args.size)
    if args.clip_skip != 1:
        model = read_text_layer(model, args.clip_skip)
    model.unet.gradient_checkpointing = args.grad_checkpointing
    return UNetStage(model, source, seed=args.seed, train_text=args.train_text_encoder,
                     timestep_shift=args.timestep_shift, snr_floor=args.snr_floor)


def build_lora(args: argparse.Namespace, source):
    from ..train.stages.lora import LoraStage
    from ..weights import load

    if args.conv_alpha is not None and args.conv_rank is None:
        raise ValueError("--conv-alpha needs --conv-rank (no convolution gets a LoRA without it)")
    model = load(args.init)
    model.unet.gradient_checkpointing = args.grad_checkpointing
    return LoraStage(model, source, rank=args.rank, alpha=args.alpha if args.alpha is not None else args.rank,
                     conv_rank=args.conv_rank or 0, conv_alpha=args.conv_alpha, text_lr=args.text_encoder_lr,
                     seed=args.seed, caption_dropout=args.caption_dropout, init_name=args.init.name,
                     timestep_shift=args.timestep_shift, snr_floor=args.snr_floor)


def build_embedding(args: argparse.Namespace, source):
    from ..train.stages.embedding import EmbeddingStage
    from ..weights import load

    model = load(args.init)
    model.unet.gradient_checkpointing = args.grad_checkpointing
    return EmbeddingStage(model, source, token=args.token, vectors=args.vectors, init_word=args.init_word,
                          seed=args.seed, init_name=args.init.name, fmt=args.format,
                          timestep_shift=args.timestep_shift, snr_floor=args.snr_floor)


def build_lcm(args: argparse.Namespace, source):
    from ..train.stages.lcm import LCMStage
    from ..weights import load

    if args.lora_alpha is not None and args.lora_rank is None:
        raise ValueError("--lora-alpha needs --lora-rank (without it the whole UNet is distilled)")
    ema_decay = args.ema_decay if args.ema_decay is not None else (0.0 if args.lora_rank else 0.95)
    model = load(args.init)
    model.unet.gradient_checkpointing = args.grad_checkpointing
    return LCMStage(model, source, guidance=args.guidance, ema_decay=ema_decay, solver_steps=args.solver_steps,
                    huber_c=args.huber_c, timestep_shift=args.timestep_shift, lora_rank=args.lora_rank or 0,
                    lora_alpha=args.lora_alpha, seed=args.seed, init_name=args.init.name)


def build_taesd(args: argparse.Namespace, source):
    from ..train.stages.taesd import build_taesd as build

    return build(args, source)


def build_controlnet(args: argparse.Namespace, source):
    from ..train.stages.controlnet import build_controlnet as build

    return build(args, source)


BUILDERS = {"vae": build_vae, "text": build_text, "unet": build_unet, "lora": build_lora,
            "embedding": build_embedding, "lcm": build_lcm, "taesd": build_taesd, "controlnet": build_controlnet}


def unet_extras(args: argparse.Namespace, stage, device, workers: int) -> int:
    """The latent cache and compilation of a UNet run; returns the data workers still needed."""
    if args.cache_latents is not None:
        from ..train.data import shapes_spec
        from ..train.latent_cache import prepare_cache

        stage.check_cache()  # before the cache is built

        # the shapes world by name (a concept and its share are in the source's mix), a folder by its full path
        data = "shapes" if shapes_spec(args.data) is not None else str(Path(args.data).resolve())
        cache = prepare_cache(args.out, stage.source, {"data": data, "size": args.size, "seed": args.seed,
                                                       **getattr(stage.source, "mix", {})},
                              args.cache_latents, stage.model.vae, stage.model.tokenizer,
                              stage.model.config.text.max_positions, device, workers, args.quiet)
        stage.use_cache(cache)
        workers = 0  # the steps read the cache: nothing left to prepare in other processes
    if getattr(args, "compile", False):
        from ..compile import compile_unet_for_training

        compile_unet_for_training(stage.model.to(device))
    return workers


def cmd_train(args: argparse.Namespace) -> None:
    import torch

    from ..runtime import pick_device
    from ..train.checkpoint import ResumeError, checkpoints
    from ..train.data import make_source
    from ..train.trainer import TrainConfig, Trainer

    if args.out.exists() and any(args.out.glob("step-*")) and not args.resume:
        raise ValueError(f"{args.out} already holds checkpoints: pass --resume to continue, or choose a new --out")
    if args.resume and not checkpoints(args.out):  # before building anything (the text stage writes a tokenizer)
        raise ResumeError(f"--resume: no complete checkpoint in {args.out} (nothing to resume; drop --resume "
                          "to start fresh)")
    device = pick_device(args.device)  # under torchrun, a CUDA process takes its LOCAL_RANK's GPU
    if device.type == "cuda":  # fixed shapes: let cuDNN pick its fastest kernels; TF32 for what runs in fp32
        if device.index is not None:
            torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    workers = args.workers if args.workers is not None else (
        min(8, max(0, (os.cpu_count() or 1) - 2)) if device.type == "cuda" else 0)
    if args.size is None:
        args.size = PRESETS[args.arch].image_size
    torch.manual_seed(args.seed)  # fresh weights depend on --seed only (and are the same in every process)
    if args.stage == "controlnet":  # items with their control images
        from ..train.stages.controlnet import make_control_source

        source = make_control_source(args.data, args.size, args.seed, args.hint, args.scene_kinds, args.color_drop)
    else:
        source = make_source(args.data, args.size, args.seed, args.scene_kinds, args.color_drop)
    stage = BUILDERS[args.stage](args, source)
    if args.stage in ("unet", "lora", "embedding", "lcm"):
        workers = unet_extras(args, stage, device, workers)
    cfg = TrainConfig(run_dir=args.out, steps=args.steps, batch_size=args.batch, lr=args.lr, warmup=args.warmup,
                      grad_accum=args.grad_accum, ema_decay=args.ema, precision=args.precision,
                      save_every=args.save_every, keep=args.keep, log_every=args.log_every,
                      sample_every=args.sample_every, seed=args.seed, max_bad_steps=args.max_bad_steps,
                      quiet=args.quiet, workers=workers, time_budget=60 * (args.time_budget or 0),
                      module_lr={"text": args.text_lr} if getattr(args, "text_lr", None) is not None
                      else getattr(stage, "module_lr", {}), shard_optimizer=args.shard_optimizer)
    trainer = Trainer(stage, cfg, device)
    modules = trainer.run(resume=args.resume, stop_at=args.stop_at)
    if not trainer.stop_requested:
        if hasattr(stage, "trained_steps"):  # adapters record their step count in the file
            stage.trained_steps = trainer.step
        if trainer.rank == 0:
            stage.export(modules, args.out)
            print(f"trained {args.stage} for {trainer.step} steps ({trainer.skipped} skipped); wrote {args.out}")
    trainer.close()
