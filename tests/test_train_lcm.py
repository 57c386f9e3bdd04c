"""`sdengine train lcm`: the consistency distillation loss is diffusers' recipe (DDIM solver step, boundary
scalings, pseudo-Huber), the target network is an EMA moved once per step, runs resume exactly, and what it writes
(a whole model, or an LCM-LoRA in kohya's layout) loads and generates with the `lcm` sampler."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sampler_harness import SD15_SCHEDULER_CONFIG
from train_helpers import make_images, one_error, tiny_model, train

import sdengine
from sdengine.lora import LoraLibrary, read_lora
from sdengine.networks import Networks
from sdengine.pipeline import Pipeline
from sdengine.train.stages.lcm import LCMStage, boundary_scalings, skipping_timesteps
from sdengine.weights.io import read_tensors


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("lcm")
    model = tiny_model(1)
    torch.manual_seed(0)
    with torch.no_grad():  # a fresh model's zeroed output layers would make every prediction the same
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sdengine.save(model, root / "base.safetensors")
    return root / "base.safetensors", make_images(root / "data")


def _batch(model, g: float):
    gen = torch.Generator().manual_seed(3)
    z0 = torch.randn(3, 4, 8, 8, generator=gen)
    with torch.no_grad():
        cond = model.text_encoder(model.tokenizer(["a red square", "two stars", "a blue circle"]))[0].float()
    t = torch.tensor([5, 530, 999])  # solver indices 0 (steps to t = 0), 26 and 49 (the top)
    return z0, cond, t, torch.randn(z0.shape, generator=gen), torch.full((3,), g)


def test_loss_is_diffusers_recipe(base):
    """The loss at step 0 (target = student = teacher) recomputed with diffusers' DDIMScheduler (trailing, 50 steps:
    the solver's 999, 979, ..., 19) for noising, x0 and the guided DDIM step, and LCMScheduler's boundary scalings."""
    from diffusers import DDIMScheduler, LCMScheduler

    model = sdengine.load(base[0])
    stage = LCMStage(model, None, guidance=(3.0, 3.0), ema_decay=0.95)
    batch = _batch(model, 3.0)
    loss, _ = stage.loss(batch, 0)

    z0, cond, t, noise, _ = batch
    ddim = DDIMScheduler.from_config({**SD15_SCHEDULER_CONFIG, "timestep_spacing": "trailing"})
    ddim.set_timesteps(50)
    lcm = LCMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    uncond = model.text_encoder(model.tokenizer([""]))[0].float()
    unet = model.unet
    parts = []
    with torch.no_grad():
        for i, start in enumerate([19, 539, 999]):
            assert start in ddim.timesteps.tolist()
            ts = torch.tensor([start])
            x = ddim.add_noise(z0[i:i + 1], noise[i:i + 1], ts)
            c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(start)
            f_student = c_skip * x + c_out * ddim.step(unet(x, ts, cond[i:i + 1]), start, x).pred_original_sample
            eps_c, eps_u = unet(x, ts, cond[i:i + 1]), unet(x, ts, uncond)
            x_prev = ddim.step(eps_u + 3.0 * (eps_c - eps_u), start, x).prev_sample
            prev = max(start - 20, 0)
            x0_prev = ddim.step(unet(x_prev, torch.tensor([prev]), cond[i:i + 1]), prev, x_prev).pred_original_sample
            c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(prev)
            parts.append(f_student - (c_skip * x_prev + c_out * x0_prev))
    diff = torch.cat(parts)
    ref = ((diff ** 2 + 0.001 ** 2).sqrt() - 0.001).mean()
    assert abs(loss.item() - ref.item()) < 1e-5 * ref.item()
    assert skipping_timesteps(1000, 50).tolist() == ddim.timesteps.flip(0).tolist()
    c_skip, c_out = boundary_scalings(torch.tensor([0, 19]))
    assert c_skip.tolist()[0] == 1.0 and c_out.tolist()[0] == 0.0


def test_target_is_an_ema_moved_once_per_step(base):
    model = sdengine.load(base[0])
    stage = LCMStage(model, None, ema_decay=0.9)
    assert set(stage.trainable()) == {"unet", "target"}
    assert not any(p.requires_grad for p in stage.target.parameters())
    assert not any(p.requires_grad for p in stage.teacher.parameters())
    before = {k: v.clone() for k, v in stage.target.state_dict().items()}
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(1.0)
    stage._update_target(0)  # step 0: the student is still the target
    assert all(torch.equal(before[k], v) for k, v in stage.target.state_dict().items())
    stage._update_target(1)
    stage._update_target(1)  # a second micro-batch of the same step
    key = next(k for k, v in before.items() if v.is_floating_point())
    torch.testing.assert_close(stage.target.state_dict()[key], before[key] + 0.1)
    teacher = dict(stage.teacher.named_parameters())[key]
    torch.testing.assert_close(teacher, before[key])  # the teacher stays the model it was


def test_timestep_shift_draws_start_steps_towards_the_noisy_end(base):
    model = sdengine.load(base[0])
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0))

    def share_above_750(stage: LCMStage) -> float:
        return (stage._timesteps(u) >= 750).float().mean().item()

    assert abs(share_above_750(LCMStage(model, None)) - 0.25) < 0.02
    assert abs(share_above_750(LCMStage(model, None, timestep_shift=3.0)) - 0.5) < 0.02


def test_train_lcm_resumes_exactly_loads_and_generates(capsys, tmp_path, base):
    init, data = base
    args = ["--init", str(init), "--steps", "4", "--batch", "4", "--save-every", "2", "--guidance", "2:4",
            "--timestep-shift", "3"]
    rc, err = train(capsys, "lcm", tmp_path / "straight", data, *args)
    assert rc == 0, err
    rc, err = train(capsys, "lcm", tmp_path / "paused", data, *args, "--stop-at", "2")
    assert rc == 0, err
    rc, err = train(capsys, "lcm", tmp_path / "paused", data, *args, "--resume")
    assert rc == 0, err
    a, b = (read_tensors(tmp_path / run / "model.safetensors")[0] for run in ("straight", "paused"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    start = read_tensors(init)[0]
    unet_keys = [k for k in a if k.startswith("model.diffusion_model.") and a[k].is_floating_point()]
    assert any(not torch.equal(a[k].float(), start[k].float()) for k in unet_keys)  # it trained
    model = sdengine.load(tmp_path / "straight" / "model.safetensors")
    images = Pipeline(model).generate("a red square", steps=2, sampler="lcm", cfg_scale=1.0, seed=0, width=32,
                                      height=32)
    assert images[0].size == (32, 32) and np.asarray(images[0]).std() > 0


def test_train_lcm_lora_is_applied_by_a_prompt_tag(capsys, tmp_path, base):
    init, data = base
    rc, err = train(capsys, "lcm", tmp_path / "lora", data, "--init", str(init), "--lora-rank", "2", "--steps", "2",
                    "--batch", "4")
    assert rc == 0, err
    path = tmp_path / "lora" / "lora.safetensors"
    lora = read_lora(path)
    assert lora.layers and all(k.startswith("lora_unet_") for k in lora.layers)
    assert lora.metadata["ss_network_dim"] == "2" and lora.metadata["ss_steps"] == "2"
    assert any(layer.tensors["up"].abs().max() > 0 for layer in lora.layers.values())  # it trained
    model = sdengine.load(init)
    library = LoraLibrary()
    name = library.add(path)
    pipe = Pipeline(model, networks=Networks(model, loras=library))
    fields = {"steps": 2, "sampler": "lcm", "cfg_scale": 1.0, "seed": 0, "width": 32, "height": 32}
    plain = np.asarray(pipe.generate("a red square", **fields)[0], dtype=np.float32)
    tagged = np.asarray(pipe.generate(f"a red square <lora:{name}:1>", **fields)[0], dtype=np.float32)
    assert np.abs(plain - tagged).max() > 0


def test_bad_options(capsys, tmp_path, base):
    init, data = base
    rc, err = train(capsys, "lcm", tmp_path / "a", data, "--init", str(init), "--guidance", "0.5")
    assert rc == 2 and "--guidance" in err
    rc, err = train(capsys, "lcm", tmp_path / "b", data, "--init", str(init), "--guidance", "6:3")
    assert rc == 2 and "LOW:HIGH" in err
    rc, err = train(capsys, "lcm", tmp_path / "c", data, "--init", str(init), "--lora-alpha", "2")
    one_error(err, "--lora-alpha", "--lora-rank")
    rc, err = train(capsys, "lcm", tmp_path / "d", data, "--init", str(init), "--lora-rank", "2", "--ema-decay", "0.9")
    one_error(err, "--ema-decay 0")
    rc, err = train(capsys, "lcm", tmp_path / "f", data, "--init", str(init), "--timestep-shift", "0")
    assert rc == 2 and "--timestep-shift" in err
    rc, err = train(capsys, "lcm", tmp_path / "e", data, "--init", str(init), "--rank", "2")
    assert rc == 2 and "train lora" in err
