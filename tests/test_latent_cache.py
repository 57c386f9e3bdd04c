"""`sdengine train unet --cache-latents N`: the cache holds the VAE posterior and token ids of the training items,
is reused by --resume, and rebuilt when damaged or built from other inputs; bad arguments are one line."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import ARCH, TINY, logged, make_images, one_error, train

from sdengine.images import images_to_tensor
from sdengine.train.data import FolderSource
from sdengine.train.latent_cache import CACHE_FILE
from sdengine.weights.parts import assemble, read_part


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """A folder of 8 captioned images and the trained tiny VAE and text encoder a UNet run needs."""
    from sdengine import cli

    root = tmp_path_factory.mktemp("cache")
    data = make_images(root / "data")
    for stage in ("vae", "text"):
        assert cli.run(["train", stage, "--data", str(data), "--out", str(root / stage), *TINY, "--quiet",
                        "--steps", "2", "--batch", "4"]) == 0
    return data, root / "vae" / "vae.safetensors", root / "text" / "text.safetensors"


def unet_args(stages, *extra: str) -> list[str]:
    _, vae, text = stages
    return ["--vae", str(vae), "--text", str(text), "--batch", "4", *extra]


def test_cache_holds_the_vae_posterior_and_the_captions(capsys, tmp_path, stages):
    data, vae_path, text_path = stages
    rc, err = train(capsys, "unet", tmp_path / "run", data, *unet_args(stages, "--steps", "2", "--cache-latents", "5"))
    assert rc == 0, err
    cache = load_file(tmp_path / "run" / CACHE_FILE)
    assert cache["mean"].shape == cache["std"].shape == (5, 4, 16, 16) and cache["ids"].shape == (5, 77)
    vae = read_part(vae_path, "vae").module()
    tokenizer = read_part(text_path, "text").tokenizer
    source = FolderSource(data, 32, seed=0)  # the run's --seed 0: the same order
    items = [source.item(i) for i in range(5)]
    with torch.no_grad():
        post = vae.encode(images_to_tensor([im for im, _ in items], torch.device("cpu")))
    torch.testing.assert_close(cache["mean"].float(), post.mean, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(cache["std"].float(), post.std, atol=2e-3, rtol=2e-3)
    assert torch.equal(cache["ids"].long(), tokenizer([c for _, c in items], max_length=77))
    assert [r["step"] for r in logged(tmp_path / "run")] == [1, 2]


@pytest.mark.slow
def test_resume_reuses_the_cache_and_a_damaged_one_is_rebuilt(capsys, tmp_path, stages):
    data = stages[0]
    run = tmp_path / "run"
    args = unet_args(stages, "--cache-latents", "100", "--save-every", "1")  # 100 > the folder's 8: all of it
    assert train(capsys, "unet", run, data, *args, "--steps", "2")[0] == 0
    path = run / CACHE_FILE
    assert load_file(path)["mean"].shape[0] == 8
    built = path.stat().st_mtime_ns
    rc, err = train(capsys, "unet", run, data, *args, "--steps", "3", "--resume", quiet=False)
    assert rc == 0, err
    assert path.stat().st_mtime_ns == built and "reusing" in err
    path.write_bytes(path.read_bytes()[:1000])  # killed while written by hand, say: derived data, rebuilt
    rc, err = train(capsys, "unet", run, data, *args, "--steps", "4", "--resume", quiet=False)
    assert rc == 0, err
    assert "8/8 items encoded" in err and load_file(path)["mean"].shape[0] == 8
    assert [r["step"] for r in logged(run)] == [1, 2, 3, 4]


@pytest.mark.slow
def test_cache_built_from_other_inputs_is_not_used(capsys, tmp_path, stages):
    data = stages[0]
    rc, err = train(capsys, "unet", tmp_path / "a", data, *unet_args(stages, "--steps", "1", "--cache-latents", "4"))
    assert rc == 0, err
    os.makedirs(tmp_path / "b")
    (tmp_path / "b" / CACHE_FILE).write_bytes((tmp_path / "a" / CACHE_FILE).read_bytes())
    rc, err = train(capsys, "unet", tmp_path / "b", data, *unet_args(stages, "--steps", "1", "--cache-latents", "6"),
                    quiet=False)
    assert rc == 0 and "6/6 items encoded" in err and load_file(tmp_path / "b" / CACHE_FILE)["ids"].shape[0] == 6


@pytest.mark.slow
def test_a_cache_of_another_scene_mix_is_rebuilt(capsys, tmp_path, stages):
    """The shapes stream's mix is part of the cache key; its defaults spelt out are not another mix."""
    args = unet_args(stages, "--steps", "1", "--cache-latents", "4")
    assert train(capsys, "unet", tmp_path / "a", Path("shapes"), *args)[0] == 0
    built = load_file(tmp_path / "a" / CACHE_FILE)["ids"]
    for run, mix, rebuilt in (("same", ["--color-drop", "0.15"], False), ("pairs", ["--scene-kinds", "pair"], True)):
        os.makedirs(tmp_path / run)
        (tmp_path / run / CACHE_FILE).write_bytes((tmp_path / "a" / CACHE_FILE).read_bytes())
        rc, err = train(capsys, "unet", tmp_path / run, Path("shapes"), *args, *mix, quiet=False)
        assert rc == 0, err
        assert ("4/4 items encoded" in err) == rebuilt and ("reusing" in err) != rebuilt, err
        assert torch.equal(load_file(tmp_path / run / CACHE_FILE)["ids"], built) != rebuilt


@pytest.mark.parametrize("argv, words, status", [  # 2: a usage error, from argparse
    (["vae", "--cache-latents", "10"], ("--cache-latents", "train unet"), 2),
    (["unet", "--cache-latents", "0"], ("--cache-latents", "at least 1"), 2),
    (["unet", "--cache-latents", "4", "--scene-kinds", "pair"], ("--scene-kinds", "--data shapes"), 1),
    (["unet", "--cache-latents", "4", "--color-drop", "0.15"], ("--color-drop", "--data shapes"), 1),
])
def test_cache_arguments_refused(capsys, tmp_path, stages, argv, words, status):
    stage, *extra = argv
    rc, err = train(capsys, stage, tmp_path / "run", stages[0], *(unet_args(stages) if stage == "unet" else []),
                    *extra)
    assert rc == status
    one_error(err, *words)
    assert not (tmp_path / "run" / CACHE_FILE).exists()


def test_batch_positions_draw_the_same_numbers_however_the_batch_is_split(stages):
    """Processes and accumulation steps split a step's batch; each position must get the same row, timestep,
    noise and dropout either way (also across the generator blocks of DRAW_BLOCK positions)."""
    from sdengine.train.draws import DRAW_BLOCK
    from sdengine.train.latent_cache import LatentCache
    from sdengine.train.stages import UNetStage

    _, vae, text = stages
    stage = UNetStage(assemble(ARCH.unet, read_part(vae, "vae"), read_part(text, "text")), source=None, seed=5)
    g = torch.Generator().manual_seed(0)
    stage.use_cache(LatentCache(torch.randn(50, 4, 16, 16, generator=g).half(), torch.rand(50, 4, 16, 16).half(),
                                torch.randint(0, 100, (50, 77), dtype=torch.int32), "key"))
    cpu = torch.device("cpu")
    whole = stage.batch(3, range(0, 2 * DRAW_BLOCK), cpu)
    stage.draws.clear()
    parts = [stage.batch(3, range(a, b), cpu) for a, b in ((0, DRAW_BLOCK - 5), (DRAW_BLOCK - 5, 2 * DRAW_BLOCK))]
    for w, *p in zip(whole, *parts):
        torch.testing.assert_close(w, torch.cat(p), atol=1e-5, rtol=1e-5)  # the text encoder batched differently
    other_step = stage.batch(4, range(0, 2 * DRAW_BLOCK), cpu)
    assert not torch.equal(whole[3], other_step[3]) and whole[2].unique().numel() > 50  # fresh noise, varied t


def test_timestep_shift_draws_noisier_steps_and_leaves_the_other_draws(stages):
    """--timestep-shift S maps uniform draws u to t/T = S u / (1 + (S - 1) u): S = 1 is uniform, S = 3 puts
    half the steps above 750. The rows, noise and caption dropout of a batch are those of an unshifted run."""
    from sdengine.train.latent_cache import LatentCache
    from sdengine.train.stages import UNetStage
    from sdengine.train.stages.unet import shift_timesteps

    u = torch.linspace(0, 1, 10001)[:-1]
    assert torch.equal(shift_timesteps(u, 1.0), (u * 1000).long())
    shifted = shift_timesteps(u, 3.0)
    assert shifted.min() == 0 and shifted.max() == 999 and bool((shifted.diff() >= 0).all())
    assert (shifted >= 750).float().mean().item() == pytest.approx(0.5, abs=1e-3)
    _, vae, text = stages
    model = assemble(ARCH.unet, read_part(vae, "vae"), read_part(text, "text"))
    cache = LatentCache(torch.randn(50, 4, 16, 16).half(), torch.rand(50, 4, 16, 16).half(),
                        torch.randint(0, 100, (50, 77), dtype=torch.int32), "key")
    batches = {}
    for shift in (1.0, 3.0):
        stage = UNetStage(model, source=None, seed=5, timestep_shift=shift)
        stage.use_cache(cache)
        batches[shift] = stage.batch(2, range(0, 400), torch.device("cpu"))
    (z1, c1, t1, n1), (z3, c3, t3, n3) = batches[1.0], batches[3.0]
    assert torch.equal(z1, z3) and torch.equal(c1, c3) and torch.equal(n1, n3)
    assert t3.float().mean() > t1.float().mean() + 100
    with pytest.raises(ValueError, match="positive"):
        UNetStage(model, source=None, timestep_shift=0.0)


def test_snr_floor_raises_the_weight_of_noisy_steps_only(stages):
    """--snr-floor F: a step's weight on its x0 error is clamped to [F, 5] instead of [SNR, 5], so with eps
    prediction the loss of a step whose SNR is below F is multiplied by F / SNR and the others are unchanged."""
    from sdengine.diffusion.schedule import SD_SCHEDULE
    from sdengine.train.stages import UNetStage

    _, vae, text = stages
    model = assemble(ARCH.unet, read_part(vae, "vae"), read_part(text, "text"))
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 77, model.config.unet.context_dim, generator=g)
    losses = {}
    for floor in (0.0, 0.1):
        stage = UNetStage(model, source=None, snr_floor=floor)
        losses[floor] = [stage.loss((z0[i:i + 1], context[i:i + 1], torch.tensor([t]), noise[i:i + 1]), 0)[0].item()
                         for i, t in enumerate((999, 300))]
    abar = SD_SCHEDULE.alphas_cumprod[999].item()
    assert losses[0.1][0] / losses[0.0][0] == pytest.approx(0.1 / (abar / (1 - abar)), rel=1e-4)
    assert losses[0.1][1] == losses[0.0][1]


@pytest.mark.parametrize("stage, shift, words", [("vae", "3", ["--timestep-shift", "train unet"]),
                                                  ("unet", "0", ["--timestep-shift", "positive"])])
def test_timestep_shift_refused(capsys, tmp_path, stages, stage, shift, words):
    rc, err = train(capsys, stage, tmp_path / "run", stages[0], *(unet_args(stages) if stage == "unet" else []),
                    "--timestep-shift", shift)
    assert rc == 2  # usage errors
    one_error(err, *words)


# ---- the text encoder trained with the UNet (--train-text-encoder) -------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("cache", [[], ["--cache-latents", "8"]], ids=["stream", "cache"])
def test_text_encoder_trains_with_the_unet_only_when_asked(capsys, tmp_path, stages, cache):
    import sdengine

    data = stages[0]
    # A fresh UNet's zeroed output projections pass no gradient to the text: start from a model trained 3 steps.
    assert train(capsys, "unet", tmp_path / "base", data, *unet_args(stages, "--steps", "3"))[0] == 0
    base = sdengine.load(tmp_path / "base" / "model.safetensors")
    runs = {}
    for name, flag in (("frozen", []), ("trained", ["--train-text-encoder"])):
        run = tmp_path / name
        rc, err = train(capsys, "unet", run, data, "--init", str(tmp_path / "base" / "model.safetensors"), "--batch",
                        "4", "--steps", "2", "--ema", "0", *cache, *flag)
        assert rc == 0, err
        model = sdengine.load(run / "model.safetensors")
        text, before = model.text_encoder.state_dict(), base.text_encoder.state_dict()
        moved = max((text[k].float() - before[k].float()).abs().max().item() for k in before)
        assert (moved > 1e-4) if flag else (moved == 0), (name, moved)
        assert all(torch.equal(v, base.vae.state_dict()[k]) for k, v in model.vae.state_dict().items())
        runs[name] = logged(run)
    # the same weights see the same batch at step 1: the conditioning is the same function, frozen or not
    assert runs["frozen"][0]["loss"] == pytest.approx(runs["trained"][0]["loss"], rel=1e-5)


def test_resume_refuses_a_run_that_trained_other_modules(capsys, tmp_path, stages):
    data = stages[0]
    run = tmp_path / "run"
    args = unet_args(stages, "--save-every", "1", "--cache-latents", "8")
    assert train(capsys, "unet", run, data, *args, "--steps", "1", "--train-text-encoder")[0] == 0
    rc, err = train(capsys, "unet", run, data, *args, "--steps", "2", "--resume")
    assert rc == 1
    one_error(err, "--resume", "'text'", "--train-text-encoder")
    rc, err = train(capsys, "vae", tmp_path / "vae", data, "--train-text-encoder")
    assert rc == 2
    one_error(err, "--train-text-encoder", "train unet")


@pytest.mark.slow
def test_text_lr_is_the_text_encoders_own_step_size(capsys, tmp_path, stages):
    """--text-lr LR: the text encoder gets its own peak LR in its own optimizer group. Adam's first step moves
    each weight by about its LR (m/sqrt(v) = +-1), so the largest change of each module is its LR."""
    import sdengine

    data = stages[0]
    assert train(capsys, "unet", tmp_path / "base", data, *unet_args(stages, "--steps", "3"))[0] == 0
    base = sdengine.load(tmp_path / "base" / "model.safetensors")
    run = tmp_path / "run"
    rc, err = train(capsys, "unet", run, data, "--init", str(tmp_path / "base" / "model.safetensors"), "--batch", "4",
                    "--steps", "1", "--warmup", "1", "--ema", "0", "--precision", "fp32", "--lr", "1e-4",
                    "--train-text-encoder", "--text-lr", "3e-3", "--save-every", "1")
    assert rc == 0, err
    state = torch.load(next(run.glob("step-*")) / "state.pt", weights_only=True)
    assert [g["initial_lr"] for g in state["optimizer"]["param_groups"]] == [1e-4, 3e-3]
    for name, module, lr in (("unet", base.unet, 1e-4), ("text", base.text_encoder, 3e-3)):
        before = module.state_dict()
        moved = max((v.float() - before[k].float()).abs().max().item() for k, v in state["modules"][name].items())
        assert lr / 2 < moved <= lr * 1.001, (name, moved)
    # resuming without --text-lr would silently train the encoder at another rate: refused
    rc, err = train(capsys, "unet", run, data, "--init", str(tmp_path / "base" / "model.safetensors"), "--batch", "4",
                    "--steps", "2", "--train-text-encoder", "--resume")
    assert rc == 1
    one_error(err, "--resume", "--text-lr")
    rc, err = train(capsys, "unet", tmp_path / "frozen", data, *unet_args(stages, "--text-lr", "1e-3"))
    assert rc == 1
    one_error(err, "--text-lr", "--train-text-encoder")


@pytest.mark.slow  # a TorchInductor compile
def test_compiled_unet_trains_as_the_eager_one(capsys, tmp_path, stages, monkeypatch):
    """train unet --compile (TorchInductor, no freezing): the same losses step after step, up to float noise."""
    from sdengine.train.stages import UNetStage

    monkeypatch.setattr(UNetStage, "samples", lambda *a: None)  # the sample grid would compile a second graph
    data = stages[0]
    losses = {}
    for name, flag in (("eager", []), ("compiled", ["--compile"])):
        rc, err = train(capsys, "unet", tmp_path / name, data, *unet_args(stages, "--steps", "3", "--cache-latents",
                                                                         "8", *flag))
        assert rc == 0, err
        losses[name] = [r["loss"] for r in logged(tmp_path / name)]
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)
    rc, err = train(capsys, "vae", tmp_path / "vae", data, "--compile")
    assert rc == 2
    one_error(err, "--compile", "train unet")
