"""The A1111 masked-img2img work around the sampler (sdengine/server/inpaint.py): crop boxes, fills, paste-back,
and Pipeline.sample's latent fills. The HTTP round trip is in test_server.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdengine.server import inpaint


def box_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def test_crop_region_pads_inside_the_image():
    mask = box_mask((100, 80), (10, 20, 30, 25))
    assert inpaint.crop_region(mask, 0) == (10, 20, 30, 25)
    assert inpaint.crop_region(mask, 15) == (0, 5, 45, 40)
    assert inpaint.crop_region(Image.new("L", (8, 8)), 4) is None


@pytest.mark.parametrize("region,size,image,expected", [
    ((10, 20, 30, 25), (64, 64), (100, 80), (10, 13, 30, 33)),   # wide box: 15 rows added, 7 above, 8 below
    ((40, 10, 50, 70), (64, 32), (100, 80), (0, 10, 100, 70)),   # tall box at 2:1 wants 120 columns: all 100
    ((0, 0, 40, 10), (64, 64), (100, 80), (0, 0, 40, 40)),       # at the top edge: shifted down, not cut
    ((0, 30, 100, 40), (64, 64), (100, 80), (0, 0, 100, 80)),    # 100 rows wanted, 80 there: the whole height
    ((10, 10, 20, 50), (64, 32), (100, 80), (0, 10, 80, 50)),    # 80 columns from x=-25: shifted right
])
def test_fit_aspect(region, size, image, expected):
    assert inpaint.fit_aspect(region, *size, *image) == expected


def test_fill_paints_the_hole_with_the_colours_around_it():
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[:, :32] = (200, 20, 20)   # red left half
    pixels[:, 32:] = (20, 20, 200)   # blue right half
    image, mask = Image.fromarray(pixels), box_mask((64, 64), (24, 24, 40, 40))
    out = np.asarray(inpaint.fill_masked(image, mask)).astype(int)
    known = np.asarray(mask) == 0
    assert (out[known] == pixels[known]).all()           # known pixels untouched
    assert out[32, 25, 0] > out[32, 25, 2] and out[32, 38, 2] > out[32, 38, 0]  # each side takes its neighbour
    assert np.abs(out[~known].astype(int) - 0).max() > 0  # the hole is no longer black


def test_whole_picture_plan_pastes_the_original_back():
    rng = np.random.default_rng(0)
    original = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = box_mask((64, 64), (16, 16, 48, 48))
    warnings: list[str] = []
    inits, work_mask, plan = inpaint.plan([original], mask, 64, 64, 0, only_masked=False, padding=0, fill=1,
                                          blur=0, inverted=False, warnings=warnings)
    assert inits[0] is not None and work_mask.size == (64, 64) and plan.paste_to == [None] and not warnings
    generated = Image.new("RGB", (64, 64), (0, 255, 0))
    generated.info["parameters"] = "p"
    out = plan.finish(generated, 0)
    arr, orig = np.asarray(out), np.asarray(original)
    inside = np.asarray(mask) > 0
    assert (arr[~inside] == orig[~inside]).all() and (arr[inside] == (0, 255, 0)).all()
    assert out.info["parameters"] == "p" and plan.extra == {"Masked content": "original"}


def test_only_masked_plan_generates_the_crop_and_returns_the_original_size():
    rng = np.random.default_rng(1)
    original = Image.fromarray(rng.integers(0, 255, (80, 120, 3), dtype=np.uint8))  # 120 wide, 80 high
    mask = box_mask((120, 80), (50, 30, 60, 40))
    inits, work_mask, plan = inpaint.plan([original], mask, 64, 64, 0, only_masked=True, padding=6, fill=0,
                                          blur=4, inverted=True, warnings=[])
    assert inits[0].size == (64, 64) and work_mask.size == (64, 64)
    assert plan.paste_to == [(44, 24, 22, 22)]  # the 10x10 box, padded by 6, is square already
    assert plan.extra == {"Mask blur": 4, "Mask mode": "Inpaint not masked", "Inpaint area": "Only masked",
                          "Masked area padding": 6, "Masked content": "fill"}
    # the crop is what was generated: its mask covers the middle (10 of 22 pixels, scaled to 64)
    assert np.asarray(work_mask)[32, 32] == 255 and np.asarray(work_mask)[2, 2] == 0
    out = plan.finish(Image.new("RGB", (64, 64), (0, 255, 0)), 0)
    arr, orig = np.asarray(out), np.asarray(original)
    assert out.size == (120, 80)
    outside = np.asarray(mask) == 0
    assert (arr[outside] == orig[outside]).all() and (arr[35, 55] == (0, 255, 0)).all()


def test_a_blank_mask_in_only_masked_mode_is_plain_img2img():
    warnings: list[str] = []
    original = Image.new("RGB", (32, 32), (9, 9, 9))
    inits, mask, plan = inpaint.plan([original], Image.new("L", (32, 32)), 64, 64, 0, only_masked=True, padding=0,
                                     fill=0, blur=4, inverted=False, warnings=warnings)
    assert inits[0].size == (64, 64) and mask is None and plan is None and "blank" in warnings[0]


def test_latent_fills_change_only_the_masked_start(sd1_folder):
    """'zeros' and 'noise' differ from 'original' under the mask only; the known region comes back as encoded."""
    import sdengine
    from sdengine.pipeline import Pipeline, Request, image_to_tensor, mask_to_tensor
    pipe = Pipeline(sdengine.load(sd1_folder))
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = mask_to_tensor(box_mask((64, 64), (0, 0, 32, 64)), 64, 64)
    req = Request(prompt="a red circle", steps=3, cfg_scale=3.0, seed=5, width=64, height=64, strength=0.6)
    init = image_to_tensor(image, 64, 64)
    out = {fill: pipe.sample(req, init=init, mask=mask, masked_latents=fill) for fill in ("original", "noise", "zeros")}
    f = out["original"].shape[-1] // 2
    for fill in ("noise", "zeros"):
        assert torch.equal(out[fill][..., f:], out["original"][..., f:])
        assert not torch.allclose(out[fill][..., :f], out["original"][..., :f])
    with pytest.raises(ValueError, match="masked_latents"):
        pipe.sample(req, init=init, mask=mask, masked_latents="blur")


@pytest.mark.parametrize("round_mask", [True, False])
def test_latent_mask_is_rounded_unless_mask_round_is_off(round_mask):
    """A1111's latent mask: the blurred work mask resized bicubic to latent size, then 0/1 (mask_round) or soft."""
    from PIL import ImageFilter
    mask = box_mask((128, 128), (32, 32, 96, 96)).filter(ImageFilter.GaussianBlur(4))
    _, work_mask, plan = inpaint.plan([Image.new("RGB", (128, 128))], mask, 128, 128, 0, only_masked=False,
                                      padding=0, fill=1, blur=4, inverted=False, warnings=[], round_mask=round_mask)
    latent = plan.latent_mask(work_mask, 8)
    assert latent.shape == (1, 1, 16, 16) and latent[0, 0, 8, 8] > 0.99 and latent[0, 0, 0, 0] < 0.01
    soft = ((latent > 0.01) & (latent < 0.99)).any()
    assert bool(soft) is not round_mask
    assert set(latent.unique().tolist()) <= {0.0, 1.0} or not round_mask


def test_sample_blends_with_a_given_latent_mask(sd1_folder):
    """Pipeline.sample(latent_mask=...) overrides the nearest-resized mask: known latents come back where it is 0,
    and a wrong size is a clear error."""
    import sdengine
    from sdengine.pipeline import Pipeline, Request, image_to_tensor, mask_to_tensor
    pipe = Pipeline(sdengine.load(sd1_folder))
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    init, mask = image_to_tensor(image, 64, 64), mask_to_tensor(box_mask((64, 64), (0, 0, 64, 64)), 64, 64)
    req = Request(prompt="a red circle", steps=3, cfg_scale=3.0, seed=5, width=64, height=64, strength=0.6)
    f = pipe.model.config.vae.downscale
    known = torch.ones(1, 1, 64 // f, 64 // f)
    known[..., : 64 // f // 2] = 0   # the whole image is masked, but the latent mask keeps the left half
    out = pipe.sample(req, init=init, mask=mask, latent_mask=known)
    plain = pipe.sample(req, init=init, mask=mask * 0)  # nothing repainted: the encoded image itself
    half = 64 // f // 2
    assert torch.equal(out[..., :half], plain[..., :half]) and not torch.allclose(out[..., half:], plain[..., half:])
    with pytest.raises(ValueError, match="latent_mask"):
        pipe.sample(req, init=init, mask=mask, latent_mask=torch.ones(1, 1, 3, 3))
