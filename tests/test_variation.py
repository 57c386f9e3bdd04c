"""Variation seeds (A1111's subseed, subseed_strength, seed_resize_from): the slerp, the noise they start from,
and what generation does with them. The HTTP fields are checked in test_server.py."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdengine.diffusion.samplers import BatchNoise
from sdengine.diffusion.variation import Variation, initial_noise, slerp


def reference_slerp(t: float, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Slerp of each (channel, column) vector of two (C, H, W) noises, written out one vector at a time."""
    out = np.empty_like(low)
    for c in range(low.shape[0]):
        for w in range(low.shape[2]):
            a, b = low[c, :, w].astype(np.float64), high[c, :, w].astype(np.float64)
            theta = math.acos(float(np.dot(a / np.linalg.norm(a), b / np.linalg.norm(b))))
            out[c, :, w] = (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)
    return out


def randn(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_matches_a_per_vector_reference(t):
    low, high = randn(1, (4, 8, 6)), randn(2, (4, 8, 6))
    expected = reference_slerp(t, low.numpy(), high.numpy())
    np.testing.assert_allclose(slerp(t, low, high).numpy(), expected, atol=1e-5)


def test_slerp_of_parallel_noise_blends_linearly():
    low = randn(1, (4, 8, 8))
    torch.testing.assert_close(slerp(0.25, low, low * 1.0000001), low, rtol=1e-5, atol=1e-6)


def source(seeds: list[int], shape=(4, 8, 8)) -> BatchNoise:
    return BatchNoise([torch.Generator().manual_seed(s) for s in seeds], (len(seeds), *shape), "cpu")


def test_initial_noise_interpolates_each_image_towards_its_variation_seed():
    noise = initial_noise(source([5, 6]), [5, 6], Variation([70, 71], 0.4))
    for i, (seed, subseed) in enumerate(((5, 70), (6, 71))):
        torch.testing.assert_close(noise[i], slerp(0.4, randn(seed, (4, 8, 8)), randn(subseed, (4, 8, 8))))
    # strength 0 and 1: the seed's and the variation seed's own noise
    torch.testing.assert_close(initial_noise(source([5]), [5], Variation([70], 0.0))[0], randn(5, (4, 8, 8)))
    torch.testing.assert_close(initial_noise(source([5]), [5], Variation([70], 1.0))[0], randn(70, (4, 8, 8)),
                               atol=1e-5, rtol=1e-5)


def test_initial_noise_leaves_the_generators_where_plain_noise_does():
    """Ancestral samplers keep drawing from image i's generator: a variation must not shift that stream."""
    plain, varied = source([5]), source([5])
    plain()
    initial_noise(varied, [5], Variation([70], 0.5))
    assert torch.equal(plain(), varied())


def test_seed_resize_from_keeps_the_seeds_noise_in_the_middle():
    bigger = initial_noise(source([5]), [5], Variation([0], 0.0, resize_from=(12, 10)))[0]  # drawn at 12x10
    torch.testing.assert_close(bigger, randn(5, (4, 12, 10))[:, 2:10, 1:9])
    smaller = initial_noise(source([5]), [5], Variation([0], 0.0, resize_from=(4, 6)))[0]   # drawn at 4x6
    torch.testing.assert_close(smaller[:, 2:6, 1:7], randn(5, (4, 4, 6)))
    outside = smaller.clone()
    outside[:, 2:6, 1:7] = 0
    base = randn(5, (4, 8, 8))  # the rest comes from the image's own generator, as plain noise would
    base[:, 2:6, 1:7] = 0
    torch.testing.assert_close(outside, base)


@pytest.mark.slow
def test_generation_with_variation_seeds(sd1_folder):
    import sdengine
    from sdengine.pipeline import Pipeline
    pipe = Pipeline(sdengine.load(sd1_folder))
    kw = dict(steps=3, cfg_scale=3.0, width=64, height=64)

    def pixels(**extra):
        return np.asarray(pipe.generate("a red circle", **kw, **extra)[0], dtype=np.int16)

    plain = pixels(seed=5)
    assert (pixels(seed=5, subseed=9, subseed_strength=0.0) == plain).all()
    assert np.abs(pixels(seed=5, subseed=9, subseed_strength=1.0) - pixels(seed=9)).max() <= 1
    half = pixels(seed=5, subseed=9, subseed_strength=0.5)
    assert np.abs(half - plain).mean() > 1
    assert (pixels(seed=5, seed_resize_from=(64, 64)) == plain).all()  # the same size: the same noise
    images = pipe.generate("a red circle", **kw, seed=5, batch_size=2, subseed=9, subseed_strength=0.5,
                           seed_resize_from=(96, 80))
    texts = [im.info["parameters"] for im in images]
    assert "Variation seed: 9, Variation seed strength: 0.5, Seed resize from: 96x80" in texts[0]
    assert "Seed: 5," in texts[1] and "Variation seed: 10," in texts[1]  # A1111: the seed stays, the variation counts
    second = pipe.generate("a red circle", **kw, seed=5, subseed=10, subseed_strength=0.5, seed_resize_from=(96, 80))
    assert np.abs(np.asarray(images[1], np.int16) - np.asarray(second[0], np.int16)).max() <= 1
    assert "Variation seed" not in pipe.generate("a red circle", **kw, seed=5)[0].info["parameters"]


@pytest.mark.parametrize("fields,match", [
    (dict(subseed_strength=1.5), "variation strength"),
    (dict(subseed_strength=float("nan")), "variation strength"),
    (dict(subseed=-5), "variation seed"),
    (dict(seed_resize_from=(0, 64)), "seed resize from"),
])
def test_bad_variation_values_are_refused(fields, match):
    from sdengine.pipeline import Request
    with pytest.raises(ValueError, match=match):
        Request(prompt="x", width=64, height=64, **fields)
