"""Tiled VAE decode/encode (sdengine/vae_tiling.py) against diffusers' own tiling (AutoencoderKL.enable_tiling:
tiled_decode, _tiled_encode) with the same random weights, tile size and overlap; its memory bound (a spy on the
tensors the decoder makes, never a clock); the automatic rule; bad arguments."""
from __future__ import annotations

import pytest
import torch

from sdengine.config import PRESETS, VAEConfig
from sdengine.memory_estimate import tiled_decode_bytes, vae_decode_bytes
from sdengine.nn.seamless import circular_padding
from sdengine.nn.vae import DiagonalGaussian
from sdengine.vae_tiling import decode_tiled, encode_tiled, should_tile, wraps_around
from sdengine.weights.parts import read_vae

GB = 1 << 30
# f=2 (the reference pipelines' VAE) and f=8 (SD's four levels, at toy width)
SHAPES = {"f2": dict(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=32),
          "f8": dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4)}


@pytest.fixture(scope="module", params=list(SHAPES))
def vaes(request, tmp_path_factory):
    """(diffusers AutoencoderKL, the same weights loaded by sdengine from the folder diffusers wrote)."""
    from diffusers import AutoencoderKL

    spec = SHAPES[request.param]
    levels = len(spec["block_out_channels"])
    torch.manual_seed(3)
    ref = AutoencoderKL(latent_channels=4, down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, **spec)
    with torch.no_grad():
        for p in ref.parameters():  # diffusers zero-initialises some layers: make every weight matter
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("vae") / "vae"
    ref.eval().save_pretrained(folder)
    return ref, read_vae(folder).module()


def use_tiles(ref, f: int, tile: int, overlap: float) -> None:
    """diffusers' tiling knobs (enable_tiling() sets them from the config's sample_size)."""
    ref.enable_tiling()
    ref.tile_sample_min_size, ref.tile_latent_min_size, ref.tile_overlap_factor = tile, tile // f, overlap


def assert_max_abs(ours: torch.Tensor, ref: torch.Tensor, bound: float = 1e-4) -> None:
    assert ours.shape == ref.shape
    assert ref.abs().max() > 1e-2, "degenerate reference output"
    err = (ours - ref).abs().max().item()
    assert err <= bound, f"max abs error {err:.3g} > {bound}"


# latent sizes (h, w) per case: several tiles, odd sizes, sizes not a multiple of the stride, a ragged last tile
CASES = [(32, 0.25, (1, 37, 50)), (32, 0.5, (2, 20, 9)), (64, 0.25, (1, 33, 33)), (16, 0.25, (2, 11, 6))]


@pytest.mark.parametrize("tile_px,overlap,size", CASES)
def test_decode_matches_diffusers_tiled_decode(vaes, tile_px, overlap, size):
    ref, ours = vaes
    f = ours.config.downscale
    tile = tile_px * f // 2  # the same number of latents per tile for f=2 and f=8
    batch, h, w = size
    z = torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(h * w))
    use_tiles(ref, f, tile, overlap)
    with torch.no_grad():
        expected = ref.tiled_decode(z).sample
    assert expected.shape == (batch, 3, h * f, w * f)  # these settings are ones where diffusers keeps the size
    assert_max_abs(decode_tiled(ours, z, tile=tile, overlap=overlap), expected)


@pytest.mark.parametrize("tile_px,overlap,size", CASES)
def test_encode_matches_diffusers_tiled_encode(vaes, tile_px, overlap, size):
    ref, ours = vaes
    f = ours.config.downscale
    tile = tile_px * f // 2
    batch, h, w = size
    x = torch.rand(batch, 3, h * f, w * f, generator=torch.Generator().manual_seed(h + w)) * 2 - 1
    use_tiles(ref, f, tile, overlap)
    with torch.no_grad():
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        expected = DiagonalGaussianDistribution(ref._tiled_encode(x))
    post = encode_tiled(ours, x, tile=tile, overlap=overlap)
    assert isinstance(post, DiagonalGaussian)
    assert_max_abs(post.mean, expected.mean)
    assert_max_abs(post.logvar, expected.logvar)
    # the pipeline samples the posterior with its own generator, as it does vae.encode's
    a, b = (post.sample(torch.Generator().manual_seed(7)) for _ in range(2))
    assert torch.equal(a, b) and a.shape == (batch, 4, h, w)


def test_odd_pixel_sizes_encode_to_the_untiled_latent_size(vaes):
    _, ours = vaes
    f = ours.config.downscale
    x = torch.rand(1, 3, 13 * f + f - 1, 9 * f + 1) * 2 - 1  # not multiples of f: the encoder floors, tiled too
    with torch.no_grad():
        untiled = ours.encode(x).mean
    assert encode_tiled(ours, x, tile=4 * f, overlap=0.25).mean.shape == untiled.shape


def test_one_tile_is_the_untiled_pass(vaes):
    """A latent within one tile: tiling changes nothing (bit for bit)."""
    _, ours = vaes
    f = ours.config.downscale
    z = torch.randn(2, 4, 7, 12)
    x = torch.rand(2, 3, 7 * f, 12 * f) * 2 - 1
    with torch.no_grad():
        assert torch.equal(decode_tiled(ours, z, tile=12 * f), ours.decode(z))
        assert torch.equal(encode_tiled(ours, x, tile=12 * f).mean, ours.encode(x).mean)


def test_tiled_decode_memory_is_one_tile_of_one_image(vaes):
    """Spy on every tensor the decoder's layers return: tiled, the largest is the one a single-tile decode makes,
    however many images and tiles; untiled it grows with the image."""
    _, ours = vaes
    f = ours.config.downscale
    calls: list[tuple[int, ...]] = []
    largest = [0]

    def record(module, inputs, output):
        largest[0] = max(largest[0], output.numel())

    def count(module, inputs):
        calls.append(tuple(inputs[0].shape))

    handles = [m.register_forward_hook(record) for m in ours.decoder.modules()]
    handles.append(ours.decoder.register_forward_pre_hook(count))
    try:
        with torch.no_grad():
            ours.decode(torch.randn(1, 4, 16, 16))
            one_tile, largest[0], calls[:] = largest[0], 0, []
            decode_tiled(ours, torch.randn(3, 4, 40, 52), tile=16 * f, overlap=0.25)  # stride 12 latents
            tiled, largest[0], tiles = largest[0], 0, list(calls)
            ours.decode(torch.randn(3, 4, 40, 52))
            untiled = largest[0]
    finally:
        for h in handles:
            h.remove()
    assert len(tiles) == 3 * 4 * 5  # ceil(40 / 12) x ceil(52 / 12) tiles per image, one image at a time
    assert max(c[0] for c in tiles) == 1 and max(max(c[2:]) for c in tiles) == 16
    assert tiled == one_tile
    assert untiled >= 3 * (40 * 52) / (16 * 16) * one_tile * 0.99


def test_bf16_tiles(vaes):
    """bf16 weights: the output keeps the decoder's dtype and stays near the fp32 tiled decode."""
    import copy

    _, ours = vaes
    f = ours.config.downscale
    z = torch.randn(1, 4, 20, 27, generator=torch.Generator().manual_seed(5))
    fp32 = decode_tiled(ours, z, tile=16 * f)
    half = decode_tiled(copy.deepcopy(ours).to(torch.bfloat16), z.to(torch.bfloat16), tile=16 * f)
    assert half.dtype == torch.bfloat16 and half.shape == fp32.shape
    assert (half.float() - fp32).abs().max() <= 0.1 * fp32.abs().max()


def test_bad_arguments_are_refused(vaes):
    _, ours = vaes
    f = ours.config.downscale
    z = torch.randn(1, 4, 8, 8)
    for kwargs in ({"tile": f + 1}, {"tile": 0}, {"tile": 16.0}, {"overlap": 1.0}, {"overlap": -0.1}):
        with pytest.raises(ValueError, match="VAE tile"):
            decode_tiled(ours, z, **kwargs)
    with pytest.raises(ValueError, match="latents"):
        decode_tiled(ours, torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="images"):
        encode_tiled(ours, torch.randn(1, 3, f - 1, 64))
    with pytest.raises(ValueError, match="stride"):
        decode_tiled(ours, z, tile=2 * f, overlap=0.75)
    with circular_padding([ours]):
        assert wraps_around(ours)
        with pytest.raises(ValueError, match="seamless"):
            decode_tiled(ours, z)
    assert not wraps_around(ours)


@pytest.mark.parametrize("preset", ["sd15", "sdxl"])
def test_should_tile_decides_from_the_estimated_decode_memory(preset):
    cfg = PRESETS[preset].vae
    fp32, bf16 = torch.float32, torch.bfloat16
    assert not should_tile(cfg, 512, 512, fp32, budget=8 * GB)
    assert should_tile(cfg, 2048, 2048, fp32, budget=8 * GB)
    assert not should_tile(cfg, 512, 512, fp32, budget=1)  # within one tile: tiling would change nothing
    # the rule is the estimate against the budget: just above and just below it, dtype and batch counted
    need = vae_decode_bytes(cfg, 1024, 768, 2, 4)
    assert should_tile(cfg, 1024, 768, fp32, batch=2, budget=need - 1)
    assert not should_tile(cfg, 1024, 768, fp32, batch=2, budget=need)
    assert not should_tile(cfg, 1024, 768, bf16, batch=2, budget=need // 2 + 1)
    assert not should_tile(cfg, 1024, 768, fp32, batch=1, budget=need // 2 + 1)
    assert should_tile(cfg, 1030, 770, fp32, budget=GB // 4, encode=True)  # sizes need not be multiples of 8
    # the tiled decode of 2048² fits the 8 GB target where the untiled one does not, by the same estimator
    assert tiled_decode_bytes(cfg, 2048, 2048, 1, 4) < 8 * GB < vae_decode_bytes(cfg, 2048, 2048, 1, 4)


def test_should_tile_takes_the_vae_and_refuses_bad_input(vaes):
    _, ours = vaes
    assert should_tile(ours, 4096, 64, torch.float32, budget=1)
    assert not should_tile(ours, 4096, 64, torch.float32, budget=1 << 40)
    with pytest.raises(ValueError, match="VAEConfig"):
        should_tile(object(), 512, 512, torch.float32, budget=GB)
    for kwargs in ({"height": 0}, {"width": 512.0}, {"budget": -1}, {"batch": 0}):
        args = {"height": 512, "width": 512, "budget": GB} | kwargs
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            should_tile(VAEConfig(), args["height"], args["width"], torch.float32, budget=args["budget"],
                        batch=kwargs.get("batch", 1))
    with pytest.raises(ValueError, match="floating"):
        should_tile(VAEConfig(), 512, 512, torch.int8, budget=GB)
