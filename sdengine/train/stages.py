"""The three training stages of Stable Diffusion, as the trainer sees them: modules, batches, a loss, pictures and
what each leaves behind.

  vae:  KL autoencoder; L1 reconstruction weighted up on foreground pixels (objects, not the background that
        fills most of the image) + KL to N(0, I). Leaves vae.safetensors (with the latent scaling factor); a
        decoder-only fine-tune of a whole model's VAE also leaves that model, its UNet untouched.
  text: CLIP-style contrastive pretraining of the text encoder against a small image encoder, on its own BPE
        vocabulary. Leaves text.safetensors with the tokenizer inside; the image encoder is discarded.
  unet: the denoiser on latents of the frozen VAE, conditioned on the frozen text encoder, captions dropped 10%
        of the time so classifier-free guidance works; eps or v target, min-SNR weighting. Leaves model.safetensors:
        the whole model in the original single-file layout.
Random draws inside a loss come from per-item generators, so results do not depend on how a batch is split.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, TextConfig, UNetConfig, VAEConfig
from ..diffusion.schedule import SD_SCHEDULE
from ..model import StableDiffusion
from ..nn.clip import CLIPTextEncoder
from ..nn.vae import AutoencoderKL
from ..tokenizer import CLIPTokenizer
from ..weights.checkpoint import TOKENIZER_METADATA, tokenizer_metadata
from ..weights.io import atomic_path, read_tensors, write_safetensors
from ..weights.keys import TEXT, VAE
from .data import Source, batch_items, item_seed
from .plots import image_grid

if TYPE_CHECKING:
    from .latent_cache import LatentCache


def to_pixels(images: list[np.ndarray], device: torch.device) -> torch.Tensor:
    # uint8 crosses to the device (4x fewer bytes) and is converted there: the same values, less host work
    return torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def to_pil(pixels: torch.Tensor) -> list:
    from PIL import Image
    arr = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def generators(seed: int, step: int, indices: range, salt: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(item_seed(seed + salt, step * 1_000_003 + i)) for i in indices]


def randn(gens: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.cat([torch.randn((1, *shape), generator=g) for g in gens]).to(device)


def save_part(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    with atomic_path(path, force=True) as tmp:
        write_safetensors(tensors, tmp, metadata=metadata)


# --- VAE ----------------------------------------------------------------------------------------------------


class VAEStage:
    name = "vae"

    def __init__(self, cfg: VAEConfig, source: Source, seed: int = 0, fg_weight: float = 10.0,
                 kl_weight: float = 1e-6, init: AutoencoderKL | None = None, decoder_only: bool = False,
                 model: StableDiffusion | None = None):
        """init: start from these weights instead of fresh ones. decoder_only: train the decoder alone, the
        encoder and so the latent space fixed, as SD's ft-EMA/ft-MSE VAEs were made: every UNet trained on the
        old latents works with the new decoder. model: the whole checkpoint `init` is the VAE of; export then
        writes it again with the new decoder."""
        if decoder_only and init is None:
            raise ValueError("--decoder-only fine-tunes a trained VAE: give it with --init")
        if model is not None and not decoder_only:
            raise ValueError("a whole model's VAE is fine-tuned with --decoder-only: a retrained encoder would move "
                             "the latent space its UNet learnt")
        self.cfg, self.source, self.seed = cfg, source, seed
        self.fg_weight, self.kl_weight = fg_weight, kl_weight
        self.decoder_only, self.checkpoint_model = decoder_only, model
        self.vae = (init if init is not None else AutoencoderKL(cfg)).float().requires_grad_(True)
        if decoder_only:
            self.vae.encoder.requires_grad_(False)
            self.vae.quant_conv.requires_grad_(False)

    def trainable(self) -> dict[str, nn.Module]:
        return {"vae": self.vae}

    def batch(self, step: int, indices: range, device: torch.device, items: list | None = None):
        items = items if items is not None else batch_items(self.source, step, indices)
        images = [image for image, _ in items]
        return to_pixels(images, device), generators(self.seed, step, indices, 1)

    @staticmethod
    def foreground(x: torch.Tensor) -> torch.Tensor:
        """Pixels that differ from the image's background, taken as its corner colour (b, 1, h, w)."""
        corner = x[:, :, :1, :1]
        return ((x - corner).abs().amax(dim=1, keepdim=True) > 0.1).float()

    def loss(self, batch, step: int):
        x, gens = batch
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.decoder_only):
            post = self.vae.encode(x)
        # a posterior sample, not its mean: the decoder also meets latents the UNet made, never exactly a mean
        z = post.mean + post.std * randn(gens, tuple(post.mean.shape[1:]), x.device).to(post.mean.dtype)
        rec = self.vae.decode(z)
        weight = 1 + self.fg_weight * self.foreground(x)
        rec_loss = ((rec.float() - x).abs() * weight).mean()
        if self.decoder_only:  # the KL term is the encoder's: nothing trained here moves it
            return rec_loss, {"rec": rec_loss.item()}
        kl = post.kl().float().mean() / x[0].numel()  # LDM's ratio: summed KL vs summed reconstruction error
        return rec_loss + self.kl_weight * kl, {"rec": rec_loss.item(), "kl": kl.item()}

    def eval_images(self, n: int = 16) -> list[np.ndarray]:
        return [self.source.item(10 ** 12 + i)[0] for i in range(n)]  # far from any training index

    @torch.no_grad()
    def samples(self, modules: dict[str, nn.Module], step: int, out: Path) -> None:
        vae = modules["vae"]
        was = vae.training
        vae.eval()
        x = to_pixels(self.eval_images(), next(vae.parameters()).device)
        rec = vae.decode(vae.encode(x).mode())
        image_grid(to_pil(x) + to_pil(rec), columns=len(x)).save(out)
        vae.train(was)

    @torch.no_grad()
    def scaling_factor(self, vae: AutoencoderKL, n: int = 256) -> float:
        """1 / std of the latents, SD's recipe, so diffused latents have unit variance."""
        x = to_pixels([self.source.item(10 ** 12 + i)[0] for i in range(n)], next(vae.parameters()).device)
        return float(1.0 / vae.encode(x).mode().float().std())

    def export(self, modules: dict[str, nn.Module], out: Path) -> None:
        vae = modules["vae"]
        # an untrained encoder keeps its latents, so its scaling factor too (a whole model's stays exact)
        scale = self.cfg.scaling_factor if self.decoder_only else round(self.scaling_factor(vae), 5)
        cfg = dataclasses.replace(self.cfg, scaling_factor=scale)
        tensors = {VAE + k: v for k, v in vae.state_dict().items()}
        save_part(tensors, out / "vae.safetensors", {"sdengine_vae_config": json.dumps(dataclasses.asdict(cfg))})
        if self.checkpoint_model is not None:  # its VAE is the module trained here (EMA weights copied in)
            from ..weights import save

            save(self.checkpoint_model, out / "model.safetensors", dtype=torch.float16, force=True)


def load_vae_init(path: Path) -> tuple[AutoencoderKL, VAEConfig, StableDiffusion | None]:
    """The VAE to fine-tune from PATH: one `sdengine train vae` wrote, a standalone SD VAE file, or a whole
    checkpoint's (single file or diffusers folder; the model comes back too, to be written again)."""
    from ..weights import load
    from ..weights.single import standalone_vae

    path = Path(path)
    if path.is_file():
        tensors, meta = read_tensors(path)
        if "sdengine_vae_config" in meta:
            return (*_trained_vae(tensors, meta, path), None)
        if not any(k.startswith(("model.diffusion_model.", "cond_stage_model.", "conditioner.")) for k in tensors):
            sd, cfg = standalone_vae(tensors)
            vae = AutoencoderKL(cfg)
            vae.load_state_dict({k[len(VAE):]: v.float() for k, v in sd.items()})
            return vae, cfg, None
    model = load(path)  # a second read, for whole checkpoints only: `load` also settles their config and tokenizer
    return model.vae, model.config.vae, model


def load_vae(path: Path) -> tuple[AutoencoderKL, VAEConfig]:
    return _trained_vae(*read_tensors(path), path)


def _trained_vae(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: Path) -> tuple[AutoencoderKL, VAEConfig]:
    if "sdengine_vae_config" not in meta:
        raise ValueError(f"{path}: not a VAE written by `sdengine train vae`")
    fields = json.loads(meta["sdengine_vae_config"])
    cfg = VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    vae = AutoencoderKL(cfg)
    vae.load_state_dict({k[len(VAE):]: v for k, v in tensors.items()})
    return vae.eval().requires_grad_(False), cfg


# --- text encoder -------------------------------------------------------------------------------------------


def train_tokenizer(captions: list[str], extra_words: list[str] = ()) -> CLIPTokenizer:
    """A small byte-level BPE vocabulary in CLIP's format, learned from the captions (whole words become
    single tokens; anything else still encodes, byte by byte)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    from ..tokenizer import _SPLIT_PATTERN, vocab_from_merges

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    words = sorted({w for c in captions for w in c.lower().split()} | set(extra_words))
    trainer = trainers.BpeTrainer(vocab_size=100_000, min_frequency=1, show_progress=False, end_of_word_suffix="</w>",
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(captions) + words * 2, trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    return CLIPTokenizer(vocab_from_merges(merges), merges)


def meaning(caption: str) -> str:
    """What a caption says, independent of phrasing: the shapes world's parsed scene when it parses, else the
    text itself."""
    from ..data.shapes import PromptError, parse_prompt

    try:
        return repr(parse_prompt(caption).normalized())
    except (PromptError, ValueError):
        return caption.strip().lower()


class ImageEncoder(nn.Module):
    """A small CNN for contrastive pretraining only: image -> embedding of the text width."""

    def __init__(self, width: int, channels: int = 64):
        super().__init__()
        c = channels
        self.net = nn.Sequential(
            nn.Conv2d(3, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.SiLU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * c), nn.SiLU(),
            nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1), nn.GroupNorm(8, 4 * c), nn.SiLU(),
            nn.Conv2d(4 * c, 4 * c, 3, padding=1), nn.GroupNorm(8, 4 * c), nn.SiLU())
        self.pos = nn.Parameter(torch.zeros(1, 4 * c, 8, 8))  # where things are matters in this world
        self.proj = nn.Linear(4 * c * 4, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net(x)
        h = h + F.interpolate(self.pos, size=h.shape[-2:], mode="bilinear", align_corners=False)
        h = F.adaptive_avg_pool2d(h, 2).flatten(1)
        return self.proj(h)


class ContrastiveHead(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.text_proj = nn.Linear(width, width, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))


class TextStage:
    name = "text"

    def __init__(self, cfg: TextConfig, source: Source, tokenizer: CLIPTokenizer, seed: int = 0,
                 hard_negatives: bool = False):
        """hard_negatives: add, for each caption of the shapes world, captions worded alike that mean another
        scene (data.shapes.hard_negatives) as extra texts that no image of the batch matches."""
        self.cfg = dataclasses.replace(cfg, vocab_size=len(tokenizer.vocab), eos_token_id=tokenizer.eos_id)
        self.source, self.tokenizer, self.seed = source, tokenizer, seed
        self.hard_negatives = hard_negatives
        self.text = CLIPTextEncoder(self.cfg)
        self.image = ImageEncoder(cfg.width)
        self.head = ContrastiveHead(cfg.width)

    def trainable(self) -> dict[str, nn.Module]:
        return {"text": self.text, "image": self.image, "head": self.head}

    def batch(self, step: int, indices: range, device: torch.device, items: list | None = None):
        from ..data.shapes import hard_negatives

        items = items if items is not None else batch_items(self.source, step, indices)
        captions = [c for _, c in items]
        owners = []  # the item each hard negative was made from
        if self.hard_negatives:
            for i, c in enumerate(list(captions)):
                negatives = hard_negatives(c)
                captions += negatives
                owners += [i] * len(negatives)
        ids = self.tokenizer(captions, max_length=self.cfg.max_positions)
        # The pooled output is read at the end token and attention is causal, so positions after the longest
        # caption's end cannot change it: cut them (captions here are far shorter than 77 tokens).
        length = int((ids == self.tokenizer.eos_id).int().argmax(dim=1).max()) + 1
        keys = [meaning(c) for c in captions]
        return to_pixels([im for im, _ in items], device), ids[:, :length].to(device), keys, owners

    def loss(self, batch, step: int):
        x, ids, keys, owners = batch
        n = len(x)  # texts 0..n-1 are the images' captions, the rest hard negatives
        text = F.normalize(self.head.text_proj(self.text(ids)[1]).float(), dim=-1)
        image = F.normalize(self.image(x).float(), dim=-1)
        logits = self.head.logit_scale.clamp(max=np.log(100)).exp() * image @ text.T
        # Captions that mean the same scene are positives too (soft targets), not false negatives; a hard negative
        # that happens to mean another item's scene is a positive of that item.
        same = torch.tensor([[a == b for b in keys] for a in keys[:n]], dtype=torch.float32, device=x.device)
        loss = 0.5 * (torch.sum(-same / same.sum(1, keepdim=True) * F.log_softmax(logits, 1), 1).mean()
                      + torch.sum(-same[:, :n].T / same[:, :n].sum(0)[:, None] * F.log_softmax(logits[:, :n].T, 1),
                                  1).mean())
        parts = {"acc": (logits[:, :n].argmax(1) == torch.arange(n, device=x.device)).float().mean().item()}
        if owners:  # how often an image prefers its caption to the same words meaning another scene
            own = torch.tensor(owners, device=x.device)
            parts["neg_acc"] = (logits[own, own] > logits[own, n + torch.arange(len(owners), device=x.device)]
                                ).float().mean().item()
        return loss, parts

    def samples(self, modules: dict[str, nn.Module], step: int, out: Path) -> None:
        return None  # nothing to look at; the retrieval accuracy is in the log

    def export(self, modules: dict[str, nn.Module], out: Path) -> None:
        tensors = {TEXT + k: v for k, v in modules["text"].state_dict().items()}
        meta = {"sdengine_text_config": json.dumps(dataclasses.asdict(self.cfg)), **tokenizer_metadata(self.tokenizer)}
        save_part(tensors, out / "text.safetensors", meta)
        self.tokenizer.save(out / "tokenizer")


def load_text(path: Path) -> tuple[CLIPTextEncoder, TextConfig, CLIPTokenizer]:
    tensors, meta = read_tensors(path)
    if "sdengine_text_config" not in meta:
        raise ValueError(f"{path}: not a text encoder written by `sdengine train text`")
    cfg = TextConfig(**json.loads(meta["sdengine_text_config"]))
    if TOKENIZER_METADATA in meta:  # its own vocabulary
        spec = json.loads(meta[TOKENIZER_METADATA])
        tokenizer = CLIPTokenizer(spec["vocab"], spec["merges"], pad_with_eos=cfg.pad_with_eos)
    else:
        tokenizer = CLIPTokenizer.default(pad_with_eos=cfg.pad_with_eos)
    text = CLIPTextEncoder(cfg)
    text.load_state_dict({k[len(TEXT):]: v for k, v in tensors.items()})
    return text.eval().requires_grad_(False), cfg, tokenizer


# --- UNet ----------------------------------------------------------------------------------------------------


DRAW_BLOCK = 64  # batch positions per generator in cached-latent batches (UNetStage._draws)


def shift_timesteps(u: torch.Tensor, shift: float, steps: int = 1000) -> torch.Tensor:
    """Timesteps from uniform u in [0, 1) under the shift SD3 applies to its sampling schedule, t/T = s u /
    (1 + (s - 1) u): s = 1 is uniform, s = 3 puts half the draws above t = 750. The layout of a scene (which
    object goes left) is settled at high noise, where the eps loss barely sees it (an x0 error counts
    sqrt(SNR) ~ 0.1 there), so drawing more of those steps gives it more of the gradient."""
    x = shift * u / (1 + (shift - 1) * u)
    return (x * steps).long().clamp(0, steps - 1)


class UNetStage:
    name = "unet"

    def __init__(self, model: StableDiffusion, source: Source, seed: int = 0, caption_dropout: float = 0.1,
                 snr_gamma: float = 5.0, sample_prompts: list[str] | None = None, train_text: bool = False,
                 timestep_shift: float = 1.0, snr_floor: float = 0.0):
        """train_text: train the text encoder with the UNet (one optimizer, same LR) instead of keeping it frozen;
        batches then carry token ids and the loss runs the encoder with gradients. timestep_shift: draw
        timesteps towards the noisy end (shift_timesteps); 1 draws them uniformly, as SD's trainer does."""
        if timestep_shift <= 0:
            raise ValueError(f"the timestep shift must be positive (got {timestep_shift})")
        self.model, self.source, self.seed, self.train_text = model, source, seed, train_text
        self.timestep_shift, self.snr_floor = timestep_shift, snr_floor
        self.caption_dropout, self.snr_gamma = caption_dropout, snr_gamma
        self.sample_prompts = sample_prompts or ["a red circle", "two blue squares", "a green triangle above a "
                                                 "yellow circle", "a big purple square on a black background"]
        model.vae.requires_grad_(False).eval()
        model.text_encoder.requires_grad_(train_text).train(train_text)
        for layer in model.text_encoder.layer_list()[model.config.text.hidden_layers_used:]:
            layer.requires_grad_(False)  # the layers after the one the UNet reads get no gradient (SD2, clip skip)
        self.alphas_cumprod = SD_SCHEDULE.alphas_cumprod
        self.cache: LatentCache | None = None  # set by use_cache: batches come from it instead of the source

    def use_cache(self, cache: LatentCache) -> None:
        """Train on pre-encoded latents (latent_cache.py): each batch position draws a row of the cache, its
        timestep, noise and caption dropout from (seed, step, position) alone (see _draws), so batches stay
        deterministic and independent of the number of processes."""
        self.cache = cache
        self._block_cache: dict[tuple, dict[str, torch.Tensor]] = {}
        self.empty_ids = self.model.tokenizer([""], max_length=cache.ids.shape[1])[0].to(cache.ids.device)

    def trainable(self) -> dict[str, nn.Module]:
        return {"unet": self.model.unet, **({"text": self.model.text_encoder} if self.train_text else {})}

    def _condition(self, ids: torch.Tensor) -> torch.Tensor:
        """What a batch carries for the text: the frozen encoder's features, or the ids when it is trained."""
        return ids if self.train_text else self.model.text_encoder.to(ids.device)(ids)[0].float()

    @torch.no_grad()
    def batch(self, step: int, indices: range, device: torch.device, items: list | None = None):
        if self.cache is not None:
            return self._cached_batch(step, indices, device)
        items = items if items is not None else batch_items(self.source, step, indices)
        gens = generators(self.seed, step, indices, 2)
        # caption dropout decided per item, deterministically
        captions = ["" if torch.rand((), generator=g).item() < self.caption_dropout else c
                    for g, (_, c) in zip(gens, items)]
        vae = self.model.vae
        vae.to(device)
        post = vae.encode(to_pixels([im for im, _ in items], device).to(next(vae.parameters()).dtype))
        z0 = (post.mean + post.std * randn(gens, tuple(post.mean.shape[1:]), device)).float()
        z0 = z0 * self.model.config.vae.scaling_factor
        ids = self.model.tokenizer(captions, max_length=self.model.config.text.max_positions).to(device)
        if self.timestep_shift == 1:
            t = torch.cat([torch.randint(0, 1000, (1,), generator=g) for g in gens]).to(device)
        else:
            t = shift_timesteps(torch.cat([torch.rand(1, generator=g) for g in gens]), self.timestep_shift).to(device)
        noise = randn(gens, tuple(z0.shape[1:]), device)
        return z0, self._condition(ids), t, noise

    def _cached_batch(self, step: int, indices: range, device: torch.device):
        cache = self.cache
        draws = self._draws(step, indices, device)
        rows = draws["row"].to(cache.mean.device)
        mean, std = cache.mean[rows].to(device).float(), cache.std[rows].to(device).float()
        z0 = (mean + std * draws["posterior"]) * self.model.config.vae.scaling_factor
        ids = cache.ids[rows].to(device).long()
        ids = torch.where((draws["drop"] < self.caption_dropout)[:, None], self.empty_ids.to(device), ids)
        t = draws["t"] if self.timestep_shift == 1 else shift_timesteps(draws["u"], self.timestep_shift)
        return z0, self._condition(ids), t, draws["noise"]

    def _draws(self, step: int, indices: range, device: torch.device) -> dict[str, torch.Tensor]:
        """The random numbers of batch positions `indices` of step `step`, drawn on the device in blocks of
        DRAW_BLOCK positions, each block from its own generator: a position's numbers depend on (seed, step,
        position) only, so any split over processes and accumulation steps sees the same ones, and a batch of
        thousands costs a few generator calls instead of one per item (~45 ms of host time per 1,024 items)."""
        shape = tuple(self.cache.mean.shape[1:])
        blocks = []
        for b in range(indices.start // DRAW_BLOCK, (indices.stop - 1) // DRAW_BLOCK + 1):
            key = (step, b, str(device))
            if key not in self._block_cache:
                g = torch.Generator(device=device).manual_seed(item_seed(self.seed + 3, step * 1_000_003 + b))
                self._block_cache = {k: v for k, v in self._block_cache.items() if k[0] == step}  # this step's only
                self._block_cache[key] = {
                    "drop": torch.rand(DRAW_BLOCK, generator=g, device=device),
                    "row": torch.randint(0, len(self.cache), (DRAW_BLOCK,), generator=g, device=device),
                    "t": torch.randint(0, 1000, (DRAW_BLOCK,), generator=g, device=device),
                    "posterior": torch.randn((DRAW_BLOCK, *shape), generator=g, device=device),
                    "noise": torch.randn((DRAW_BLOCK, *shape), generator=g, device=device),
                    "u": torch.rand(DRAW_BLOCK, generator=g, device=device)}  # last: the others stay as they were
            blocks.append(self._block_cache[key])
        lo = indices.start % DRAW_BLOCK
        return {k: torch.cat([blk[k] for blk in blocks])[lo: lo + len(indices)] for k in blocks[0]}

    def loss(self, batch, step: int):
        z0, cond, t, noise = batch
        context = self.model.text_encoder(cond)[0].float() if self.train_text else cond
        x_t = SD_SCHEDULE.q_sample(z0, t, noise)
        target = noise if self.model.config.prediction == "eps" else SD_SCHEDULE.velocity(z0, t, noise)
        out = self.model.unet(x_t, t, context)
        per_item = (out.float() - target).pow(2).mean(dim=(1, 2, 3))
        if self.snr_gamma > 0:  # min-SNR weighting (Hang et al. 2023): no step dominates the gradient
            abar = self.alphas_cumprod.to(z0.device)[t]
            snr = abar / (1 - abar)
            # snr_floor: an x0 error at high noise weighs at least snr_floor (eps alone weighs it SNR ~ 0.005-0.05
            # there, so the layout, settled at those steps, gets almost no gradient)
            weight = snr.clamp(min=self.snr_floor, max=self.snr_gamma) / (
                snr if self.model.config.prediction == "eps" else snr + 1)
            per_item = per_item * weight
        return per_item.mean(), {}

    @torch.no_grad()
    def samples(self, modules: dict[str, nn.Module], step: int, out: Path) -> None:
        from ..pipeline import Pipeline

        unet = modules["unet"]
        was = unet.training
        unet.eval()
        # The pipeline runs the whole model on one device; with a latent cache the VAE never left the CPU.
        self.model.to(next(unet.parameters()).device)
        size = self.source.size
        images = []
        for prompt in self.sample_prompts:
            images += Pipeline(self.model).generate(prompt, steps=20, cfg_scale=5.0, seed=0, width=size, height=size,
                                                    batch_size=2)
        image_grid(images, columns=len(images) // 2 if len(images) > 4 else len(images),
                   labels=[p for p in self.sample_prompts for _ in range(2)]).save(out)
        unet.train(was)

    def export(self, modules: dict[str, nn.Module], out: Path) -> None:
        from ..weights import save

        save(self.model, out / "model.safetensors", dtype=torch.float16, force=True)


def assemble(unet_cfg: UNetConfig, vae_path: Path, text_path: Path, prediction: str = "eps",
             sample_size: int | None = None) -> StableDiffusion:
    """A StableDiffusion from a trained VAE and text encoder and a fresh UNet with the given config; sample_size
    (the training image size) is recorded in the model's config, so generation defaults to it."""
    vae, vae_cfg = load_vae(vae_path)
    text, text_cfg, tokenizer = load_text(text_path)
    unet_cfg = dataclasses.replace(unet_cfg, context_dim=text_cfg.width)
    cfg = ModelConfig(unet=unet_cfg, vae=vae_cfg, text=text_cfg, prediction=prediction, sample_size=sample_size)
    model = StableDiffusion(cfg, tokenizer)
    model.init_weights()
    model.first_stage_model.load_state_dict(vae.state_dict())
    model.cond_stage_model.load_state_dict(text.state_dict())
    return model


def replace_text_encoder(model: StableDiffusion, text_path: Path) -> StableDiffusion:
    """Put a `train text` result (encoder and its tokenizer) into model in place of its own: to fine-tune a
    model's UNet on a newly pretrained encoder. The UNet reads the encoder's hidden states, so the widths must
    agree; the UNet has to learn the new encoder's features, which is what the fine-tune is for."""
    text, text_cfg, tokenizer = load_text(text_path)
    if text_cfg.width != model.config.unet.context_dim:
        raise ValueError(f"{text_path}: the text encoder is {text_cfg.width} wide, but the model's UNet reads "
                         f"{model.config.unet.context_dim}-wide text features")
    dtype = next(model.cond_stage_model.parameters()).dtype
    model.cond_stage_model = text.to(dtype)
    model.tokenizer = tokenizer
    model.config = dataclasses.replace(model.config, text=text_cfg)
    return model


def read_text_layer(model: StableDiffusion, clip_skip: int) -> StableDiffusion:
    """Condition the UNet on the text encoder's layer `clip_skip` from the end of those it reads now (1: the same;
    2: the one before, as kohya's --clip_skip and A1111's "Clip skip"). The choice goes into the config as
    skip_last_layers, so the saved model reads that layer by default in sdengine (other programs need their clip
    skip set to match); the layers after it stay in the file, unread."""
    text = model.config.text
    if clip_skip < 1 or clip_skip > text.hidden_layers_used:
        raise ValueError(f"--clip-skip must be 1 to {text.hidden_layers_used}, the text encoder's layers in use "
                         f"(got {clip_skip})")
    text = dataclasses.replace(text, skip_last_layers=text.skip_last_layers + clip_skip - 1)
    model.config = dataclasses.replace(model.config, text=text)
    model.cond_stage_model.config = text
    return model


__all__ = ["VAEStage", "TextStage", "UNetStage", "assemble", "replace_text_encoder", "read_text_layer",
           "train_tokenizer", "load_vae", "load_vae_init", "load_text"]
