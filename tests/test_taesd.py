"""TAESD (sdengine/nn/taesd.py): random-weight diffusers AutoencoderTiny models, saved by diffusers and rewritten in
madebyollin's nn.Sequential layout (.pth and .safetensors), load and encode/decode as diffusers does; bad files are
one-line errors; `train taesd` distils one from a tiny model and writes files diffusers' layout maps onto."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from diffusers import AutoencoderTiny
from safetensors.torch import save_file
from train_helpers import make_images, tiny_model

import sdengine
from sdengine.cli import run
from sdengine.nn.taesd import TAESDConfig, TinyAutoencoder, load_taesd, taesd_from_tensors
from sdengine.train.stages import taesd as stage_module
from sdengine.weights.io import CheckpointError, read_tensors

TOL = 1e-4
SHAPES = {"sd": ((1, 3, 3, 3), (3, 3, 3, 1)), "f4": ((1, 3, 3), (3, 3, 1))}  # madebyollin's; the shipped model's f=4


def reference(levels: str, channels: int = 16, seed: int = 0) -> AutoencoderTiny:
    enc, dec = SHAPES[levels]
    torch.manual_seed(seed)
    return AutoencoderTiny(encoder_block_out_channels=(channels,) * len(enc),
                           decoder_block_out_channels=(channels,) * len(dec), num_encoder_blocks=enc,
                           num_decoder_blocks=dec).eval()


def madebyollin(ref: AutoencoderTiny) -> dict[str, dict[str, torch.Tensor]]:
    """The reference's weights under madebyollin's taesd.py keys: the decoder's Sequential starts with a Clamp
    layer diffusers folds into its forward, so its indices are one more (diffusers' convert script does the same)."""
    sd = ref.state_dict()
    halves: dict[str, dict[str, torch.Tensor]] = {"encoder": {}, "decoder": {}}
    for key, value in sd.items():
        half, _, rest = key.partition(".layers.")
        index, _, name = rest.partition(".")
        halves[half][f"{int(index) + (half == 'decoder')}.{name}"] = value.clone()
    return halves


def inputs(ref: AutoencoderTiny, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    f = 2 ** (len(ref.config.num_encoder_blocks) - 1)
    return torch.rand(2, 3, size, size, generator=g) * 2 - 1, torch.randn(2, 4, size // f, size // f, generator=g) * 2


def assert_parity(ours: TinyAutoencoder, ref: AutoencoderTiny, encoder: bool = True, decoder: bool = True) -> None:
    x, z = inputs(ref)
    with torch.no_grad():
        if encoder:
            want = ref.encode(x).latents
            assert want.abs().max() > 0.01 and (ours.encode(x) - want).abs().max() <= TOL
        if decoder:
            want = ref.decode(z).sample
            assert want.std() > 0.01 and (ours.decode(z) - want).abs().max() <= TOL


@pytest.mark.parametrize("levels", ["sd", "f4"])
def test_diffusers_folder_matches_autoencoder_tiny(tmp_path, levels):
    ref = reference(levels)
    ref.save_pretrained(tmp_path / "taesd")
    ours = load_taesd(tmp_path / "taesd")
    assert ours.cfg == TAESDConfig(4, 16, *SHAPES[levels]) and not ours.training
    assert_parity(ours, ref)


def test_madebyollin_files_match_autoencoder_tiny(tmp_path):
    ref = reference("sd", seed=3)
    halves = madebyollin(ref)
    pth, st = tmp_path / "pth", tmp_path / "st"
    pth.mkdir()
    st.mkdir()
    for half, sd in halves.items():  # the file names say nothing: the layouts are told by their keys
        torch.save(sd, pth / f"taesd_{half}.pth")
        save_file(sd, st / f"taesd_{half}.safetensors")
    for folder in (pth, st):
        assert_parity(load_taesd(folder), ref)
        decoder_only = load_taesd(next(folder.glob("*decoder*")))
        assert decoder_only.encoder is None
        assert_parity(decoder_only, ref, encoder=False)
        assert_parity(load_taesd(next(folder.glob("*encoder*"))), ref, decoder=False)
        with pytest.raises(ValueError, match="no encoder"):
            decoder_only.encode(torch.zeros(1, 3, 16, 16))
    # taesdxl is the same network with other weights; bf16 loads at the asked dtype
    half = load_taesd(st / "taesd_decoder.safetensors", dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_bad_files_are_clear_errors(tmp_path):
    ref = reference("sd", channels=8)
    halves = madebyollin(ref)
    cases = {
        "other.safetensors": ({"model.weight": torch.zeros(2, 2)}, "not a TAESD file"),
        "missing.safetensors": ({k: v for k, v in halves["decoder"].items() if not k.startswith("3.conv.2")},
                                "do not fit"),
        "wide.safetensors": ({**halves["decoder"], "1.weight": torch.zeros(16, 4, 3, 3)}, "do not fit"),
    }
    for name, (sd, message) in cases.items():
        save_file(sd, tmp_path / name)
        with pytest.raises(CheckpointError, match=message):
            load_taesd(tmp_path / name)
    # a pickle that would run code is refused before it runs
    torch.save({"0.weight": torch.zeros(1), "obj": argparse.Namespace(a=1)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused"):
        load_taesd(tmp_path / "evil.pth")
    with pytest.raises(FileNotFoundError):
        load_taesd(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no TAESD files"):
        load_taesd(tmp_path / "empty")
    # a diffusers config our fixed layers would compute differently with: refused, not silently misread
    ref.save_pretrained(tmp_path / "gelu")
    config = json.loads((tmp_path / "gelu" / "config.json").read_text())
    (tmp_path / "gelu" / "config.json").write_text(json.dumps({**config, "act_fn": "gelu"}))
    with pytest.raises(CheckpointError, match="act_fn"):
        load_taesd(tmp_path / "gelu")
    # halves of different models
    other = madebyollin(reference("f4", channels=8))
    with pytest.raises(CheckpointError, match="do not fit each other"):
        taesd_from_tensors({**{f"taesd_encoder.{k}": v for k, v in other["encoder"].items()},
                            **{f"taesd_decoder.{k}": v for k, v in halves["decoder"].items()}})


def test_train_taesd_distils_and_writes_readable_files(tmp_path, monkeypatch, capsys):
    """`sdengine train taesd` (wired as sdengine/cli/train.py will) on a tiny model: the loss falls, and the files
    it writes hold what it trained, in madebyollin's layout (diffusers' AutoencoderTiny computes the same)."""
    model = tiny_model(1)
    sdengine.save(model, tmp_path / "tiny.safetensors")
    out = tmp_path / "run"
    code = run(["train", "taesd", "--init", str(tmp_path / "tiny.safetensors"), "--data",
                str(make_images(tmp_path / "img")), "--out", str(out), "--size", "32", "--steps", "12", "--batch",
                "4", "--warmup", "1", "--lr", "2e-3", "--precision", "fp32", "--log-every", "1", "--quiet",
                "--channels", "8"])
    assert code == 0, capsys.readouterr().err
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 12 and log[-1]["dec"] < log[0]["dec"] and log[-1]["enc"] < log[0]["enc"]
    report = json.loads((out / "eval.json").read_text())
    assert report["images"] == 64 and math.isfinite(report["decoder_psnr"])

    ours = load_taesd(out / stage_module.RESULT)
    assert ours.cfg == TAESDConfig(4, 8, (1, 3), (3, 1))  # f=2 VAE: one halving
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(),
                                                  load_taesd(out).state_dict().values(), strict=True))
    # madebyollin's two files, mapped onto diffusers' AutoencoderTiny as its convert script does
    ref = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                          num_encoder_blocks=(1, 3), num_decoder_blocks=(3, 1)).eval()
    sd = {}
    for half in ("encoder", "decoder"):
        file_sd = read_tensors(out / stage_module.HALVES[half])[0]
        sd.update({f"{half}.layers.{int(k.split('.')[0]) - (half == 'decoder')}.{k.split('.', 1)[1]}": v
                   for k, v in file_sd.items()})
    ref.load_state_dict(sd, strict=True)
    assert_parity(ours, ref)
    # the stage's own eval agrees with decoding the VAE's latents by hand
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = model.vae.encode(x).mean * model.config.vae.scaling_factor
        want = stage_module.psnr(ours.decode(z), model.vae.decode(z / model.config.vae.scaling_factor))
    assert stage_module.decoder_psnr(ours, model, z) == pytest.approx(want)
