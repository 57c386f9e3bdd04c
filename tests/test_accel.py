"""The opt-in accelerations (sdengine/accel): DeepCache, token merging (ToMe), CFG skipping.

Exactness where they are off (bit for bit), counters and spies where they are on: which UNet blocks run at which
step, how many tokens attention sees, which batch halves guidance runs; DeepCache's partial call against the full
call it cached from (equal: the same blocks on the same features); ToMe against the tomesd package when it is
installed."""
from __future__ import annotations

import pytest
import torch

import sdengine
from sdengine.accel import Accelerations, DeepCacheUNet, accelerated, bipartite_soft_matching_2d, token_merging
from sdengine.accel.deepcache import nonuniform_steps
from sdengine.config import UNetConfig
from sdengine.diffusion.samplers import BatchNoise
from sdengine.metadata import parse_parameters
from sdengine.nn.attention import CrossAttention
from sdengine.nn.unet import UNetModel
from sdengine.pipeline import Pipeline, follow_steps
from sdengine.request import FieldError, Request, fields_from_parameters

W = H = 32  # the tiny VAE halves: latents 16x16
OFF = Accelerations()


@pytest.fixture(scope="module")
def model(sd1_folder):
    return sdengine.load(sd1_folder)


class Calls:
    """Records (step, batch size, deep block ran) for every UNet call of a sampling run."""

    def __init__(self, unet: UNetModel, guided=None):
        self.records: list[tuple[int, int, bool]] = []
        self.deep = 0
        self.guided = guided
        self.handles = [unet.middle_block.register_forward_hook(self._deep),
                        unet.input_blocks[0].register_forward_pre_hook(self._call)]

    def _deep(self, *_):
        self.deep += 1
        step, batch, _ = self.records[-1]
        self.records[-1] = (step, batch, True)

    def _call(self, _m, args):
        self.records.append((self.guided.step if self.guided else -1, args[0].shape[0], False))

    def close(self):
        for h in self.handles:
            h.remove()


def sample(model, settings: Accelerations = OFF, sampler: str = "euler", steps: int = 6,
           cfg: float = 7.5, prepare=None) -> tuple[torch.Tensor, Calls]:
    """txt2img latents as Pipeline._sample makes them, with `accelerated` around the sampler (the integration the
    pipeline gets); prepare(guided) may change the denoiser before sampling."""
    pipe = Pipeline(model)
    req = Request(prompt="a red circle", negative_prompt="blue", steps=steps, sampler=sampler, cfg_scale=cfg,
                  seed=7).sized(W, H)
    cond, uncond = pipe.condition(req)
    sigmas = pipe.sigmas(req, img2img=False)
    guided = pipe.denoiser(req, cond, uncond)
    if prepare is not None:
        prepare(guided)
    spec = req.sampler_spec
    noise = BatchNoise([torch.Generator().manual_seed(7)], (1, 4, H // 2, W // 2), "cpu")
    x = noise() * spec.initial_scale(float(sigmas[0]), req.spacing)
    extra = {"prediction": model.config.prediction} if spec.uses_prediction else {}
    calls = Calls(model.unet, guided)
    before = (guided.denoiser, guided.guidance_until, list(guided.step_listeners))
    try:
        with torch.no_grad(), accelerated(guided, settings, len(sigmas) - 1):
            out = spec(guided, x, sigmas, callback=follow_steps(guided, None), noise=noise, **extra)
    finally:
        calls.close()
    assert (guided.denoiser, guided.guidance_until, guided.step_listeners) == before  # restored on exit
    return out, calls


# ---- DeepCache ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_deepcache_every_step_full_is_exact(model, sampler):
    """Interval 1, and a schedule whose every step is full (the caching path taken each time): the plain run, bit
    for bit."""
    exact, _ = sample(model, sampler=sampler)

    def cache(full_steps):
        def prepare(guided):
            d = guided.denoiser
            cached = DeepCacheUNet(d.unet, 1 if full_steps is None else 3, 0, full_steps)
            guided.denoiser = type(d)(cached, d.schedule, d.prediction)
            guided.step_listeners.append(cached.set_step)
        return prepare

    for full_steps in (None, frozenset(range(6))):
        out, _ = sample(model, sampler=sampler, prepare=cache(full_steps))
        assert torch.equal(out, exact)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_deepcache_runs_the_deep_blocks_on_one_step_in_three(model, sampler):
    exact, plain = sample(model, sampler=sampler)
    out, calls = sample(model, Accelerations(deepcache=3), sampler=sampler)
    assert len(calls.records) == len(plain.records)  # the sampler's evaluations are the same
    for step, batch, deep in calls.records:
        assert batch == 2  # guidance's halves in one call
        assert deep == (step % 3 == 0), calls.records  # every evaluation of a full step (Heun's two) is full
    assert {s for s, _, d in calls.records if d} == {0, 3}
    assert torch.isfinite(out).all() and not torch.equal(out, exact)
    assert (out - exact).abs().max() < 0.5 * exact.abs().max()  # an approximation, not another image


def test_deepcache_with_cfg_skip_recomputes_when_the_batch_shrinks(model):
    """CFG skipping halves the batch for the last steps: the cache (of the two-half batch) is not reused for it."""
    _, calls = sample(model, Accelerations(deepcache=3, cfg_skip=2), steps=6)
    assert [(s, b, d) for s, b, d in calls.records] == [
        (0, 2, True), (1, 2, False), (2, 2, False), (3, 2, True), (4, 1, True), (5, 1, False)]


def random_unet(cfg: UNetConfig, seed: int = 0) -> UNetModel:
    torch.manual_seed(seed)
    unet = UNetModel(cfg).eval()
    with torch.no_grad():
        for p in unet.parameters():  # the output layers start at zero in some inits: every weight matters here
            p.add_(torch.randn_like(p) * 0.05)
    return unet


SD1_TINY = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=(2, 2), attention_resolutions=(1, 2),
                      context_dim=32, num_heads=2)
SDXL_TINY = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=(2, 2, 2),
                       attention_resolutions=(2, 4), transformer_depth=(0, 1, 2), context_dim=32,
                       num_heads=-1, num_head_channels=16, use_linear_in_transformer=True, adm_in_channels=48)


@pytest.mark.parametrize("name, cfg, size", [("sd1", SD1_TINY, (16, 16)), ("sdxl", SDXL_TINY, (12, 20)),
                                             ("odd", SD1_TINY, (13, 11))])
def test_deepcache_partial_call_equals_the_full_call_it_cached(name, cfg, size):
    """A partial call on the inputs of the full call that filled the cache runs the same shallow blocks on the same
    deep features: the same output, at every branch, with ControlNet residuals and SDXL's vector y, at odd sizes."""
    unet = random_unet(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *size, generator=g)
    t = torch.tensor([999.0, 500.0])
    context = torch.randn(2, 7, 32, generator=g)
    y = torch.randn(2, 48, generator=g) if cfg.adm_in_channels else None
    with torch.no_grad():
        skips = []
        hooks = [b.register_forward_hook(lambda _m, _a, out: skips.append(out)) for b in unet.input_blocks]
        unet(x, t, context, y)
        for h in hooks:
            h.remove()
        control = [torch.randn(s.shape, generator=g) for s in skips] + [torch.randn(skips[-1].shape, generator=g)]
        for ctrl in (None, control):
            exact = unet(x, t, context, y, ctrl)
            for branch in range(len(unet.input_blocks) - 1):
                cached = DeepCacheUNet(unet, interval=3, branch=branch)
                assert torch.equal(cached(x, t, context, y, ctrl), exact)  # step 0: full
                cached.set_step(1)
                partial = cached(x, t, context, y, ctrl)
                assert (cached.full_calls, cached.partial_calls) == (1, 1)
                torch.testing.assert_close(partial, exact, rtol=1e-5, atol=1e-5)
                # another input at a partial step: the shallow blocks see it, the deep features do not
                other = cached(x * 0.5, t, context, y, ctrl)
                assert not torch.allclose(other, exact) and not torch.allclose(other, unet(x * 0.5, t, context, y))


def test_deepcache_refuses_bad_settings():
    unet = random_unet(SD1_TINY)
    with pytest.raises(ValueError, match="interval"):
        DeepCacheUNet(unet, interval=0)
    with pytest.raises(ValueError, match="branch must be in 0..4"):
        DeepCacheUNet(unet, branch=5)
    with pytest.raises(TypeError, match="UNetModel"):
        DeepCacheUNet(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="deepcache interval"):
        Accelerations(deepcache=-1)
    with pytest.raises(ValueError, match="token merging ratio"):
        Accelerations(tome=1.0)
    with pytest.raises(ValueError, match="cfg skip"):
        Accelerations(cfg_skip=-2)


def test_deepcache_start_runs_the_early_steps_full():
    cached = DeepCacheUNet(random_unet(SD1_TINY), interval=3, start=4)
    assert [s for s in range(12) if cached.is_full_step(s)] == [0, 1, 2, 3, 4, 7, 10]
    with pytest.raises(ValueError, match="start"):
        DeepCacheUNet(random_unet(SD1_TINY), start=-1)


def test_nonuniform_schedule():
    steps = nonuniform_steps(50, 3)
    assert 0 in steps and 12 <= len(steps) <= 17 and max(steps) < 50
    gaps = sorted(steps)
    near = [b - a for a, b in zip(gaps, gaps[1:]) if a >= 8 and b <= 16]
    far = [b - a for a, b in zip(gaps, gaps[1:]) if a >= 30]
    assert max(near) < min(far)  # denser at the center (step 12) than far from it
    assert nonuniform_steps(9, 3, power=1.0) == {0, 4, 8}  # power 1: evenly spaced, ceil(9 / 3) of them


# ---- token merging ------------------------------------------------------------------------------------------------

def test_tome_ratio_zero_is_exact_and_restores(model):
    unet = model.unet
    g = torch.Generator().manual_seed(2)
    x, t, context = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([700.0, 700.0]), torch.randn(2, 77, 32)
    with torch.no_grad():
        exact = unet(x, t, context)
        with token_merging(unet, 0.0):
            assert torch.equal(unet(x, t, context), exact)
        with token_merging(unet, 0.5, seed=3):
            merged = unet(x, t, context)
            with pytest.raises(RuntimeError, match="already patched"):
                with token_merging(unet, 0.5):
                    pass
        with token_merging(unet, 0.5, seed=3):
            assert torch.equal(unet(x, t, context), merged)  # deterministic given the seed
        assert not torch.equal(merged, exact)
        assert torch.equal(unet(x, t, context), exact)  # restored


def test_tome_token_counts(model):
    """Self-attention at the full latent resolution sees half the tokens; deeper levels and cross-attention's
    queries are untouched (tomesd's defaults: max_downsample 1, merge_attn only)."""
    unet = model.unet
    seen: dict[str, int] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, a, name=name: seen.__setitem__(name, a[0].shape[1]))
             for name, m in unet.named_modules() if isinstance(m, CrossAttention)]
    x, t, context = torch.randn(2, 4, 16, 16), torch.tensor([700.0, 700.0]), torch.randn(2, 77, 32)
    try:
        with torch.no_grad():
            unet(x, t, context)
            plain = dict(seen)
            with token_merging(unet, 0.5) as settings:
                unet(x, t, context)
    finally:
        for h in hooks:
            h.remove()
    full_res = [n for n, tokens in plain.items() if tokens == 256]
    assert full_res and settings.merged_calls == len(full_res) // 2
    for name, tokens in seen.items():
        merged = name in full_res and name.endswith("attn1")
        assert tokens == (128 if merged else plain[name]), name


def test_bipartite_matching_merge_unmerge():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6 * 5, 8, generator=g)  # a 6 x 5 grid: the last row lies outside whole 2x2 cells
    merge, unmerge = bipartite_soft_matching_2d(x, w=5, h=6, sx=2, sy=2, r=10, generator=g)
    m = merge(x)
    assert m.shape == (2, 20, 8) and unmerge(m).shape == x.shape
    same = torch.ones(2, 30, 8)  # identical tokens: merging averages equals, unmerging copies them back
    merge, unmerge = bipartite_soft_matching_2d(same, w=5, h=6, sx=2, sy=2, r=10, generator=None)
    assert torch.equal(unmerge(merge(same)), same)
    merge, unmerge = bipartite_soft_matching_2d(x, w=5, h=6, sx=2, sy=2, r=0, generator=g)
    assert merge(x) is x and unmerge(x) is x


def test_tome_matches_tomesd(tmp_path):
    """tomesd 0.1.3 on a diffusers UNet (its own patch) against ours on the same weights, the same draws."""
    tomesd = pytest.importorskip("tomesd")
    from reference import save_pipeline

    parts = save_pipeline("sd1", tmp_path / "pipe", seed=4)
    ours = sdengine.load(tmp_path / "pipe").unet
    ref = parts["unet"]
    g = torch.Generator().manual_seed(5)
    x, t, context = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([600, 600]), torch.randn(2, 77, 32)
    tomesd.apply_patch(ref, ratio=0.5)
    try:
        ref._tome_info["args"]["generator"] = torch.Generator().manual_seed(9)
        with torch.no_grad():
            expected = ref(x, t, encoder_hidden_states=context).sample
            with token_merging(ours, 0.5, seed=9):
                got = ours(x, t, context)
            plain = ours(x, t, context)
    finally:
        tomesd.remove_patch(ref)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert (plain - expected).abs().max() > 1e-3  # merging changed the output


# ---- CFG skipping -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_cfg_skip_runs_the_cond_half_alone_in_the_last_steps(model, sampler):
    exact, plain = sample(model, sampler=sampler)
    off, _ = sample(model, Accelerations(cfg_skip=0), sampler=sampler)
    assert torch.equal(off, exact)
    out, calls = sample(model, Accelerations(cfg_skip=2), sampler=sampler)
    assert len(calls.records) == len(plain.records)  # the same evaluations, fewer rows in the last ones
    assert all(batch == (1 if step >= 4 else 2) for step, batch, _ in calls.records), calls.records
    assert not torch.equal(out, exact)
    # what skipping is: the last steps unguided, i.e. the same as guidance_until set by hand
    manual, _ = sample(model, sampler=sampler, prepare=lambda guided: setattr(guided, "guidance_until", 4))
    assert torch.equal(manual, out)


def test_cfg_skip_validates_and_says_so_in_the_parameters():
    from sdengine.diffusion.denoiser import CFGDenoiser

    with pytest.raises(ValueError, match="guidance_until"):
        CFGDenoiser(None, None, None, 7.5, guidance_until=-1)  # type: ignore[arg-type]
    assert Accelerations().infotext_fields() == {}
    assert Accelerations(deepcache=3, tome=0.5, cfg_skip=2).infotext_fields() == {
        "DeepCache interval": 3, "DeepCache branch": 0, "Token merging ratio": 0.5, "CFG skip last steps": 2}


# ---- the integration: Request fields -> Pipeline -> PNG parameters ---------------------------------------------------

def test_request_to_png(sd1_folder):
    pipe = Pipeline(sdengine.load(sd1_folder))
    kw = dict(prompt="a red circle", negative_prompt="blue", steps=6, seed=3, width=32, height=32)
    exact = pipe.generate(**kw)[0]
    fast = pipe.generate(**kw, deepcache=3, tome=0.5, cfg_skip=2)[0]
    assert exact.tobytes() != fast.tobytes()
    params = parse_parameters(fast.info["parameters"])
    assert params["DeepCache interval"] == 3 and params["Token merging ratio"] == 0.5
    assert params["CFG skip last steps"] == 2
    assert "DeepCache" not in exact.info["parameters"]
    fields = fields_from_parameters(params)
    assert (fields["deepcache"], fields["tome"], fields["cfg_skip"]) == (3, 0.5, 2)
    again = pipe.generate(**kw, deepcache=3, tome=0.5, cfg_skip=2)[0]
    assert again.tobytes() == fast.tobytes()
    with pytest.raises(FieldError, match="token merging ratio"):
        Request(tome=2.0)
    assert torch.equal(torch.tensor(list(pipe.generate(**kw)[0].tobytes())), torch.tensor(list(exact.tobytes())))
