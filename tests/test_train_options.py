"""Training options that change what a run is made of: --precision auto, --stop-at (a result from the middle of a
schedule), --init with --text (fine-tuning a model's UNet on another text encoder), --clip-skip (on another of
its layers) and train vae --init --decoder-only (a new decoder for a model's latents)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import TINY, logged, make_images, one_error, tiny_model, train

from sdengine import runtime
from sdengine.weights.parts import read_part


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("data"))


# ---- --precision auto ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_the_cpu_has_it(monkeypatch, native):
    """Emulated bf16 on a CPU without bf16 instructions is ~3x slower than fp32: auto picks fp32 there."""
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    autocast_dtype = runtime.training_autocast_dtype
    assert autocast_dtype("auto", cpu) == (torch.bfloat16 if native else None)
    assert autocast_dtype("bf16", cpu) == torch.bfloat16 and autocast_dtype("fp16", cpu) == torch.float16
    assert autocast_dtype("fp32", cpu) is None
    with pytest.raises(ValueError, match="precision"):
        autocast_dtype("int8", cpu)


def test_auto_is_the_default_precision(capsys, tmp_path, data, monkeypatch):
    seen = []
    real = runtime.training_autocast_dtype
    monkeypatch.setattr(runtime, "training_autocast_dtype", lambda p, d: seen.append(p) or real(p, d))
    args = [a for a in TINY if a not in ("--precision", "fp32")]
    from sdengine import cli
    assert cli.run(["train", "vae", "--data", str(data), "--out", str(tmp_path / "run"), *args, "--quiet",
                    "--steps", "1", "--batch", "4"]) == 0
    assert seen == ["auto"]


# ---- --stop-at ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_stop_at_writes_the_result_midway_and_resume_goes_on(capsys, tmp_path, data):
    """--steps 6 --stop-at 3: three steps on the 6-step LR schedule (not a 3-step one ending at its minimum), the
    stage's result written from step 3, and --resume then ends exactly where an unbroken 6-step run ends."""
    common = ["--steps", "6", "--batch", "4", "--warmup", "2", "--save-every", "100"]
    rc, err = train(capsys, "vae", tmp_path / "whole", data, *common)
    assert rc == 0, err
    rc, err = train(capsys, "vae", tmp_path / "split", data, *common, "--stop-at", "3")
    assert rc == 0, err
    split, whole = logged(tmp_path / "split"), logged(tmp_path / "whole")
    assert [r["step"] for r in split] == [1, 2, 3]
    assert [r["lr"] for r in split] == pytest.approx([r["lr"] for r in whole[:3]], rel=1e-9)
    assert split[-1]["lr"] > 2e-4  # mid-schedule: a 3-step cosine would be at its floor (1e-4)
    midway = load_file(tmp_path / "split" / "vae.safetensors")
    rc, err = train(capsys, "vae", tmp_path / "split", data, *common, "--resume")
    assert rc == 0, err
    assert [r["step"] for r in logged(tmp_path / "split")] == [1, 2, 3, 4, 5, 6]
    end, unbroken = load_file(tmp_path / "split" / "vae.safetensors"), load_file(tmp_path / "whole" / "vae.safetensors")
    assert all(torch.equal(end[k], unbroken[k]) for k in unbroken)
    assert any(not torch.equal(midway[k], end[k]) for k in end)
    rc, err = train(capsys, "vae", tmp_path / "bad", data, "--stop-at", "0")
    assert rc == 2  # a usage error
    one_error(err, "--stop-at")


# ---- --init with --text -------------------------------------------------------------------------------------------

@pytest.mark.slow  # five training runs, two text vocabularies from the shapes stream
def test_init_with_text_puts_another_encoder_under_the_unet(capsys, tmp_path, data):
    """train unet --init MODEL --text TEXT: the model's text encoder and tokenizer are replaced by TEXT's (its own
    vocabulary included), the VAE stays the model's, and the UNet trains on the new encoder's features."""
    import sdengine
    from sdengine import cli

    root = tmp_path
    for stage, src in (("vae", data), ("text", data)):
        assert cli.run(["train", stage, "--data", str(src), "--out", str(root / stage), *TINY, "--quiet", "--steps",
                        "2", "--batch", "4"]) == 0
    assert train(capsys, "unet", root / "base", data, "--vae", str(root / "vae" / "vae.safetensors"), "--text",
                 str(root / "text" / "text.safetensors"), "--steps", "2", "--batch", "4")[0] == 0
    # another encoder, pretrained on the shapes world: another vocabulary
    assert train(capsys, "text", root / "other", "shapes", "--steps", "2", "--batch", "4")[0] == 0
    other = read_part(root / "other" / "text.safetensors", "text")
    other_text, other_tokenizer = other.module(), other.tokenizer
    base = sdengine.load(root / "base" / "model.safetensors")
    assert base.tokenizer.vocab != other_tokenizer.vocab
    rc, err = train(capsys, "unet", root / "ft", data, "--init", str(root / "base" / "model.safetensors"), "--text",
                    str(root / "other" / "text.safetensors"), "--steps", "2", "--batch", "4", "--ema", "0")
    assert rc == 0, err
    model = sdengine.load(root / "ft" / "model.safetensors")
    assert model.tokenizer.vocab == other_tokenizer.vocab
    expected = other_text.state_dict()  # the model file is fp16
    assert all(torch.equal(v, expected[k].half().to(v.dtype)) for k, v in model.text_encoder.state_dict().items())
    assert all(torch.equal(v, base.vae.state_dict()[k]) for k, v in model.vae.state_dict().items())
    assert any(not torch.equal(v, base.unet.state_dict()[k]) for k, v in model.unet.state_dict().items())
    # an encoder of another width than the UNet reads, and a VAE beside --init, are refused in one line
    assert train(capsys, "text", root / "wide", data, "--steps", "1", "--batch", "4", "--arch", "shapes")[0] == 0
    rc, err = train(capsys, "unet", root / "bad", data, "--init", str(root / "base" / "model.safetensors"), "--text",
                    str(root / "wide" / "text.safetensors"), "--steps", "1", "--batch", "4")
    assert rc == 1
    one_error(err, "wide")
    rc, err = train(capsys, "unet", root / "bad2", data, "--init", str(root / "base" / "model.safetensors"), "--vae",
                    str(root / "vae" / "vae.safetensors"), "--steps", "1", "--batch", "4")
    assert rc == 1
    one_error(err, "--vae", "--init")


# ---- --clip-skip --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_clip_skip_trains_the_unet_on_an_earlier_text_layer_and_the_model_keeps_reading_it(capsys, tmp_path, data):
    """train unet --init MODEL --clip-skip 2: the saved model's config says skip_last_layers 1, so it reads layer 1 of
    its 2 by default (what clip skip 2 gave before); with --train-text-encoder only the layers it reads learn."""
    import sdengine

    sdengine.save(tiny_model(2), tmp_path / "base.safetensors", dtype=torch.float16)  # fp16, as results are
    base = sdengine.load(tmp_path / "base.safetensors")
    prompt = ["a red square"]
    for extra in ([], ["--train-text-encoder"]):
        out = tmp_path / f"ft{len(extra)}"
        rc, err = train(capsys, "unet", out, data, "--init", str(tmp_path / "base.safetensors"), "--clip-skip", "2",
                        "--steps", "6", "--batch", "4", "--ema", "0", *extra)  # zeroed projections: 1 step is not seen
        assert rc == 0, err
        model = sdengine.load(out / "model.safetensors")
        assert model.config.text.skip_last_layers == 1 and model.config.text.layers == 2
        last = [k for k in base.text_encoder.state_dict() if ".layers.1." in k]
        first = [k for k in base.text_encoder.state_dict() if ".layers.0." in k]
        assert last and first
        new, old = model.text_encoder.state_dict(), base.text_encoder.state_dict()
        assert all(torch.equal(new[k], old[k]) for k in last)  # unread: never trained
        assert all(torch.equal(new[k], old[k]) for k in first) == (not extra)
        if not extra:  # the frozen encoder: the model reads by default what clip skip 2 read before
            assert torch.equal(model.encode_prompt(prompt), base.encode_prompt(prompt, clip_skip=2))
            assert not torch.allclose(model.encode_prompt(prompt), base.encode_prompt(prompt), atol=1e-3)
    rc, err = train(capsys, "unet", tmp_path / "bad", data, "--init", str(tmp_path / "base.safetensors"),
                    "--clip-skip", "3", "--steps", "1", "--batch", "4")
    assert rc == 1
    one_error(err, "--clip-skip", "1 to 2")
    rc, err = train(capsys, "vae", tmp_path / "bad2", data, "--clip-skip", "2", "--steps", "1", "--batch", "4")
    assert rc == 2  # a usage error: train vae has no such option
    one_error(err, "--clip-skip", "train unet")


# ---- train vae --init --decoder-only ------------------------------------------------------------------------------

def test_decoder_only_moves_the_decoder_and_keeps_the_latents_and_the_rest_of_the_model(capsys, tmp_path, data):
    """train vae --init MODEL --decoder-only: only the decoder side learns, so the encoder, its scaling factor and
    every other part of MODEL come back bit for bit in the model.safetensors written beside vae.safetensors."""
    import sdengine

    sdengine.save(tiny_model(1), tmp_path / "base.safetensors", dtype=torch.float16)
    base = sdengine.load(tmp_path / "base.safetensors")
    rc, err = train(capsys, "vae", tmp_path / "dec", data, "--init", str(tmp_path / "base.safetensors"),
                    "--decoder-only", "--steps", "3", "--batch", "4")
    assert rc == 0, err
    assert "kl" not in logged(tmp_path / "dec")[0]  # the encoder's KL is not this run's to move
    model = sdengine.load(tmp_path / "dec" / "model.safetensors")
    assert model.config.vae == base.config.vae
    old, new = base.vae.state_dict(), model.vae.state_dict()
    fixed = [k for k in old if k.startswith(("encoder.", "quant_conv."))]
    moved = [k for k in old if k.startswith(("decoder.", "post_quant_conv."))]
    assert fixed and moved and len(fixed) + len(moved) == len(old)
    assert all(torch.equal(new[k], old[k]) for k in fixed)
    assert sum(not torch.equal(new[k], old[k]) for k in moved) > len(moved) // 2
    for part in ("unet", "text_encoder"):
        assert all(torch.equal(v, getattr(base, part).state_dict()[k])
                   for k, v in getattr(model, part).state_dict().items())
    # the VAE file beside it starts a further decoder-only run (the encoder still fixed)
    vae_file = tmp_path / "dec" / "vae.safetensors"
    assert train(capsys, "vae", tmp_path / "dec2", data, "--init", str(vae_file), "--decoder-only", "--steps", "1",
                 "--batch", "4")[0] == 0
    again = read_part(tmp_path / "dec2" / "vae.safetensors", "vae").module().state_dict()
    assert all(torch.equal(again[k], old[k].float()) for k in fixed)
    # a whole model's encoder is not retrained (its UNet reads those latents); --decoder-only needs --init
    rc, err = train(capsys, "vae", tmp_path / "bad", data, "--init", str(tmp_path / "base.safetensors"), "--steps",
                    "1", "--batch", "4")
    assert rc == 1
    one_error(err, "--decoder-only", "latent")
    rc, err = train(capsys, "vae", tmp_path / "bad2", data, "--decoder-only", "--steps", "1", "--batch", "4")
    assert rc == 1
    one_error(err, "--decoder-only", "--init")
    rc, err = train(capsys, "unet", tmp_path / "bad3", data, "--init", str(tmp_path / "base.safetensors"),
                    "--decoder-only", "--steps", "1", "--batch", "4")
    assert rc == 2  # a usage error: train unet has no such option
    one_error(err, "--decoder-only", "train vae")
