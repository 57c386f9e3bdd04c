"""Seamless tiling (sdengine/nn/seamless.py, `tiling=True`): circular padding makes the VAE decoder and the UNet
equivariant to rolls, and generation with it changes the image and leaves the model as it was."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import sdengine
from sdengine.nn.seamless import circular_padding
from sdengine.pipeline import Pipeline

W, H = 24, 16  # the tiny VAE downsamples by 2


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return Pipeline(sdengine.load(sd1_folder))


def test_circular_padding_makes_the_decoder_roll_equivariant(pipe):
    vae = pipe.model.vae
    z = torch.randn(1, 4, 8, 10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with circular_padding([vae]):
            out, rolled = vae.decode(z), vae.decode(z.roll((3, 1), dims=(2, 3)))
        torch.testing.assert_close(rolled, out.roll((6, 2), dims=(2, 3)), atol=1e-4, rtol=1e-4)  # f = 2
        plain = vae.decode(z.roll((3, 1), dims=(2, 3)))
    assert (plain - rolled).abs().max() > 1e-2  # zero padding breaks it at the borders
    assert all(m.padding_mode == "zeros" for m in vae.modules() if isinstance(m, torch.nn.Conv2d))


def test_circular_padding_makes_the_unet_roll_equivariant_by_its_stride(pipe):
    model = pipe.model
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    context = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([500.0])
    with torch.no_grad(), circular_padding([model.unet]):
        out, rolled = model.unet(x, t, context), model.unet(x.roll(2, dims=3), t, context)  # one downsample: 2
    torch.testing.assert_close(rolled, out.roll(2, dims=3), atol=1e-4, rtol=1e-4)


def test_tiled_generation(pipe):
    kw = dict(steps=3, cfg_scale=5, seed=2, width=W, height=H)
    tiled = pipe.generate("a red circle", **kw, tiling=True)[0]
    plain = pipe.generate("a red circle", **kw)[0]
    assert "Tiling: True" in tiled.info["parameters"] and "Tiling" not in plain.info["parameters"]
    assert np.abs(np.asarray(tiled, np.int16) - np.asarray(plain, np.int16)).max() > 0
    again = pipe.generate("a red circle", **kw)[0]  # the model is back to zero padding afterwards
    assert np.array_equal(np.asarray(again), np.asarray(plain))
