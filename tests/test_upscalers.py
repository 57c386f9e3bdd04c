"""Model upscalers (sdengine/upscalers): random-weight nets saved in each published key layout (ESRGAN's original
`model.N` one, BasicSR's Real-ESRGAN one, BSRGAN's, SRVGGNetCompact's), detected and loaded back, their outputs
equal to a direct computation written here from the papers' layer definitions over the files' own keys; tiling;
folder lookup; bad files; `sdengine upscale`; the hires fix with a model upscaler.

spandrel (the library that loads these files elsewhere) is not the oracle: its package imports every architecture
at import, LaMa's and RestoreFormer's import torchvision, and PyPI's torchvision does not import next to our CPU
torch build (issue 32). The layouts are checked against the published files' key names and shapes instead.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_helpers import assert_cli_error, run_cli
from PIL import Image
from safetensors.torch import save_file

from sdengine.images import tensor_to_images
from sdengine.upscalers import (
    UpscalerError,
    build,
    inspect_upscaler,
    list_upscalers,
    load_upscaler,
    resolve_upscaler,
    target_size,
    upscale_image,
    upscale_tensor,
)
from sdengine.upscalers.detect import detect
from sdengine.upscalers.nets import CompactConfig, RRDBConfig
from sdengine.upscalers.swinir import RGB_MEAN, SwinIRConfig

TINY = dict(num_feat=8, num_block=2, num_grow_ch=4)


def random_net(config, seed: int = 0) -> torch.nn.Module:
    """A net with random weights large enough that every layer matters (default inits shrink deep nets to ~0)."""
    torch.manual_seed(seed)
    net = build(config).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim == 4:
                p.normal_(0, 1.0 / (p.shape[1] * p.shape[2] * p.shape[3]) ** 0.5)
            elif "body" in name and p.ndim == 1 and isinstance(config, CompactConfig) and ".weight" in name:
                p.uniform_(0.0, 0.5)  # PReLU slopes
            else:
                p.normal_(0, 0.05)
    return net


# --- the published layouts, written from their definitions ---------------------------------------------------------

def old_esrgan_layout(sd: dict[str, torch.Tensor], c: RRDBConfig) -> dict[str, torch.Tensor]:
    """xinntao's original ESRGAN (RRDBNet_arch / architecture.py): a flattened Sequential `model`: 0 conv,
    1 ShortcutBlock(`sub`: RRDB 0..nb-1 each RDB1-3 with conv1-5 as Sequential(conv, lrelu) -> `.0.`, then the trunk
    conv at nb), then [Upsample, conv, lrelu] per x2 (convs at 3, 6, ...), the HR conv, lrelu, the last conv."""
    n = c.num_upsample
    out = {}
    for k, v in sd.items():
        m = re.match(r"body\.(\d+)\.rdb(\d)\.conv(\d)\.(weight|bias)$", k)
        m1 = re.match(r"body\.(\d+)\.rdb(\d)\.conv1x1\.weight$", k)
        m2 = re.match(r"(conv_first|conv_body|conv_hr|conv_last|conv_up(\d))\.(weight|bias)$", k)
        if m:
            out[f"model.1.sub.{m[1]}.RDB{m[2]}.conv{m[3]}.0.{m[4]}"] = v
        elif m1:
            out[f"model.1.sub.{m1[1]}.RDB{m1[2]}.conv1x1.weight"] = v
        else:
            assert m2, k
            index = {"conv_first": "0", "conv_body": f"1.sub.{c.num_block}", "conv_hr": str(3 * n + 2),
                     "conv_last": str(3 * n + 4)}.get(m2[1]) or str(3 * int(m2[2]))
            out[f"model.{index}.{m2[3]}"] = v
    return out


def bsrgan_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BSRGAN / RealSR (cszn's RRDBNet): RRDB_trunk.N.RDBk.convj, trunk_conv, upconv1/2, HRconv."""
    names = {"conv_body": "trunk_conv", "conv_up1": "upconv1", "conv_up2": "upconv2", "conv_hr": "HRconv"}
    out = {}
    for k, v in sd.items():
        head, _, tail = k.partition(".")
        if head == "body":
            n, rdb, rest = tail.split(".", 2)
            out[f"RRDB_trunk.{n}.RDB{rdb[-1]}.{rest}"] = v
        else:
            out[f"{names.get(head, head)}.{tail}"] = v
    return out


def test_full_size_nets_have_the_published_files_keys_and_shapes():
    """RealESRGAN_x4plus.pth / x2plus (params_ema), ESRGAN's RRDB_ESRGAN_x4.pth and realesr-general-x4v3.pth /
    realesr-animevideov3.pth, as those files list them."""
    with torch.device("meta"):
        x4, x2 = build(RRDBConfig()).state_dict(), build(RRDBConfig(num_upsample=2, unshuffle=2)).state_dict()
        general, anime = build(CompactConfig(num_conv=32)).state_dict(), build(CompactConfig()).state_dict()
    assert len(x4) == 702 and x4["conv_first.weight"].shape == (64, 3, 3, 3)
    assert x4["body.22.rdb3.conv5.weight"].shape == (64, 192, 3, 3) and x4["body.0.rdb1.conv1.weight"].shape[0] == 32
    assert {"conv_body.weight", "conv_up1.weight", "conv_up2.bias", "conv_hr.weight", "conv_last.bias"} <= set(x4)
    assert x2["conv_first.weight"].shape == (64, 12, 3, 3)
    old = old_esrgan_layout(x4, RRDBConfig())
    assert {"model.0.weight", "model.1.sub.0.RDB1.conv1.0.weight", "model.1.sub.22.RDB3.conv5.0.bias",
            "model.1.sub.23.weight", "model.3.weight", "model.6.weight", "model.8.weight", "model.10.bias"} <= set(old)
    assert {k.split(".")[1] for k in old} == {"0", "1", "3", "6", "8", "10"} and len(old) == 702
    assert general["body.66.weight"].shape == (48, 64, 3, 3) and general["body.65.weight"].shape == (64,)
    assert anime["body.34.weight"].shape == (48, 64, 3, 3) and len(anime) == 35 + 18
    for sd, want in [(old, RRDBConfig()), (x2, RRDBConfig(unshuffle=2)), (general, CompactConfig(num_conv=32)),
                     (bsrgan_layout(x4), RRDBConfig())]:
        assert detect(sd)[0] == want


# --- direct computations over the files' keys ----------------------------------------------------------------------

def _conv(sd: dict[str, torch.Tensor], key: str, x: torch.Tensor) -> torch.Tensor:
    w = sd[f"{key}.weight"]
    return F.conv2d(x, w, sd.get(f"{key}.bias"), padding=w.shape[-1] // 2)


def reference_old_esrgan(sd: dict[str, torch.Tensor], x: torch.Tensor, c: RRDBConfig) -> torch.Tensor:
    """ESRGAN (Wang et al. 2018) over the original layout's keys: dense blocks x_j = lrelu(conv_j([x, x_1..x_j-1])),
    out = conv_5([...]) * 0.2 + x; RRDB = RDB3(RDB2(RDB1(x))) * 0.2 + x; ESRGAN+ adds 1x1(x) to x_2 and x_2 to x_4."""
    lrelu = lambda t: F.leaky_relu(t, 0.2)  # noqa: E731
    if c.unshuffle > 1:
        x = F.pixel_unshuffle(x, c.unshuffle)
    fea = _conv(sd, "model.0", x)
    t = fea
    for b in range(c.num_block):
        r = t
        for k in (1, 2, 3):
            p = f"model.1.sub.{b}.RDB{k}"
            feats = [r]
            for j in (1, 2, 3, 4):
                y = lrelu(_conv(sd, f"{p}.conv{j}.0", torch.cat(feats, 1)))
                if c.plus and j == 2:
                    y = y + F.conv2d(r, sd[f"{p}.conv1x1.weight"])
                if c.plus and j == 4:
                    y = y + feats[2]
                feats.append(y)
            r = _conv(sd, f"{p}.conv5.0", torch.cat(feats, 1)) * 0.2 + r
        t = r * 0.2 + t
    t = fea + _conv(sd, f"model.1.sub.{c.num_block}", t)
    n = c.num_upsample
    for i in range(1, n + 1):
        t = lrelu(_conv(sd, f"model.{3 * i}", F.interpolate(t, scale_factor=2, mode="nearest")))
    return _conv(sd, f"model.{3 * n + 4}", lrelu(_conv(sd, f"model.{3 * n + 2}", t)))


def reference_compact(sd: dict[str, torch.Tensor], x: torch.Tensor, scale: int) -> torch.Tensor:
    """SRVGGNetCompact: convs with per-channel PReLUs between, pixel shuffle, plus the nearest-upsampled input."""
    t = x
    for i in range(len({k.split(".")[1] for k in sd})):
        w = sd[f"body.{i}.weight"]
        t = _conv(sd, f"body.{i}", t) if w.ndim == 4 else torch.where(t >= 0, t, t * w[None, :, None, None])
    return F.pixel_shuffle(t, scale) + F.interpolate(x, scale_factor=scale, mode="nearest")


def save(sd: dict[str, torch.Tensor], path: Path, wrapper: str | None = None) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        torch.save({wrapper: sd} if wrapper else sd, path)
    return path


RRDB_CASES = {  # name: (config, layout, suffix, wrapper)
    "esrgan-old-x4": (RRDBConfig(**TINY), "old", ".pth", None),
    "esrgan-old-x2": (RRDBConfig(**TINY, num_upsample=1), "old", ".pth", None),
    "esrgan-old-x1": (RRDBConfig(**TINY, num_upsample=0), "old", ".safetensors", None),
    "esrgan-old-x8": (RRDBConfig(**TINY, num_upsample=3), "old", ".pth", None),
    "esrgan-plus-x4": (RRDBConfig(**TINY, plus=True), "old", ".pth", None),
    "realesrgan-x4plus": (RRDBConfig(**TINY), "basicsr", ".pth", "params_ema"),
    "realesrgan-x2plus": (RRDBConfig(**TINY, unshuffle=2), "basicsr", ".pth", "params_ema"),
    "realesrnet-x1": (RRDBConfig(**TINY, unshuffle=4), "basicsr", ".pth", "params"),
    "realesrgan-x4-st": (RRDBConfig(**TINY), "basicsr", ".safetensors", None),
    "bsrgan-x4": (RRDBConfig(**TINY), "bsrgan", ".pth", None),
}


@pytest.mark.parametrize("case", list(RRDB_CASES))
def test_rrdbnet_in_each_layout_loads_by_detection_and_computes_esrgan(case, tmp_path):
    config, layout, suffix, wrapper = RRDB_CASES[case]
    ours = random_net(config).state_dict()
    published = {"old": lambda sd: old_esrgan_layout(sd, config), "basicsr": dict, "bsrgan": bsrgan_layout}[layout]
    path = save(published(ours), tmp_path / f"{case}{suffix}", wrapper)
    up = load_upscaler(path)
    assert up.config == config and up.scale == {0: 1, 1: 2, 2: 4, 3: 8}[config.num_upsample] // config.unshuffle
    assert (up.name, up.architecture) == (case, "ESRGAN")
    x = torch.rand(1, 3, 12, 8)
    with torch.no_grad():
        got = up.net(x)
        want = reference_old_esrgan(old_esrgan_layout(ours, config), x, config)
    assert got.shape == (1, 3, 12 * up.scale, 8 * up.scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want.abs().mean() > 0.05  # the computation is not trivially near zero


@pytest.mark.parametrize("scale,num_conv,suffix", [(4, 2, ".pth"), (2, 1, ".safetensors"), (1, 3, ".pth")])
def test_compact_loads_by_detection_and_computes_srvgg(scale, num_conv, suffix, tmp_path):
    config = CompactConfig(num_feat=8, num_conv=num_conv, upscale=scale)
    sd = random_net(config).state_dict()
    assert sorted(sd, key=lambda k: int(k.split(".")[1]))[:3] == ["body.0.weight", "body.0.bias", "body.1.weight"]
    up = load_upscaler(save(sd, tmp_path / f"compact{suffix}", "params" if suffix == ".pth" else None))
    assert up.config == config and up.architecture == "SRVGGNetCompact"
    x = torch.rand(2, 3, 9, 7)
    with torch.no_grad():
        torch.testing.assert_close(up.net(x), reference_compact(sd, x, scale), rtol=1e-5, atol=1e-5)


def test_params_ema_is_preferred_to_params(tmp_path):
    config = CompactConfig(num_feat=4, num_conv=1, upscale=2)
    ema, raw = random_net(config, 1).state_dict(), random_net(config, 2).state_dict()
    path = tmp_path / "both.pth"
    torch.save({"params": raw, "params_ema": ema}, path)
    got = load_upscaler(path).net.state_dict()
    assert all(torch.equal(got[k], ema[k]) for k in ema)


def test_unshuffle_models_take_any_size():
    """Real-ESRGAN x2/x1 pad (reflect) to a multiple of their unshuffle factor and crop the result back."""
    net = random_net(RRDBConfig(**TINY, unshuffle=4))
    for h, w in [(1, 1), (5, 3), (13, 17)]:
        assert net(torch.rand(1, 3, h, w)).shape == (1, 3, h, w)
    x = torch.rand(1, 3, 13, 17)
    padded = F.pad(x, (0, 3, 0, 3), mode="reflect")
    with torch.no_grad():
        torch.testing.assert_close(net(x), net(padded)[..., :13, :17])


# --- SwinIR ---------------------------------------------------------------------------------------------------------

def swinir_published(sd: dict[str, torch.Tensor], c: SwinIRConfig, img_size: int) -> dict[str, torch.Tensor]:
    """The model zoo's files also hold two buffers per block: `attn.relative_position_index` (N, N) and, on the
    shifted (odd) blocks, `attn_mask` (windows of the training size, N, N); written here from the paper."""
    ws, n = c.window_size, c.window_size ** 2
    pos = [(y, x) for y in range(ws) for x in range(ws)]
    index = torch.tensor([[(a[0] - b[0] + ws - 1) * (2 * ws - 1) + a[1] - b[1] + ws - 1 for b in pos] for a in pos])
    out = dict(sd)
    for i, depth in enumerate(c.depths):
        for j in range(depth):
            p = f"layers.{i}.residual_group.blocks.{j}"
            out[f"{p}.attn.relative_position_index"] = index
            if j % 2:
                out[f"{p}.attn_mask"] = torch.zeros((img_size // ws) ** 2, n, n)
    return out


def reference_swinir(sd: dict[str, torch.Tensor], x: torch.Tensor, c: SwinIRConfig) -> torch.Tensor:
    """SwinIR from the paper over the files' keys, one window at a time: tokens of a window attend to each other
    with a learned bias per relative offset; odd blocks work on the image rolled by half a window, where pixels
    brought together from opposite borders are kept apart (-100 before the softmax)."""
    ws, shift = c.window_size, c.window_size // 2
    hh, ww = x.shape[-2:]
    x = F.pad(x, (0, -ww % ws, 0, -hh % ws), mode="reflect")
    mean = torch.tensor(RGB_MEAN).view(1, 3, 1, 1) if c.in_chans == 3 else torch.zeros(1)
    x = (x - mean) * c.img_range

    def ln(t, p):
        return F.layer_norm(t, t.shape[-1:], sd[f"{p}.weight"], sd[f"{p}.bias"])

    def lin(t, p):
        return F.linear(t, sd[f"{p}.weight"], sd[f"{p}.bias"])

    def resi(p, t):
        if f"{p}.weight" in sd:
            return _conv(sd, p, t)
        t = F.leaky_relu(_conv(sd, f"{p}.0", t), 0.2)
        return _conv(sd, f"{p}.4", F.leaky_relu(_conv(sd, f"{p}.2", t), 0.2))

    first = _conv(sd, "conv_first", x)
    b, dim, h, w = first.shape
    t = ln(first.permute(0, 2, 3, 1), "patch_embed.norm")  # (b, h, w, C)
    pos = [(y, q) for y in range(ws) for q in range(ws)]
    region = lambda r, size: 0 if r < size - ws else 1 if r < size - shift else 2  # noqa: E731
    for i, depth in enumerate(c.depths):
        heads, start = c.num_heads[i], t
        for j in range(depth):
            p, s = f"layers.{i}.residual_group.blocks.{j}", shift if j % 2 else 0
            table = sd[f"{p}.attn.relative_position_bias_table"]
            y = torch.roll(ln(t, f"{p}.norm1"), (-s, -s), (1, 2))
            out = torch.zeros_like(y)
            for wy in range(0, h, ws):
                for wx in range(0, w, ws):
                    tok = y[:, wy:wy + ws, wx:wx + ws].reshape(b, ws * ws, dim)
                    q, k, v = lin(tok, f"{p}.attn.qkv").view(b, ws * ws, 3, heads, dim // heads).unbind(2)
                    logits = torch.einsum("bnhd,bmhd->bhnm", q, k) / (dim // heads) ** 0.5
                    for n, (yn, xn) in enumerate(pos):
                        for m, (ym, xm) in enumerate(pos):
                            logits[:, :, n, m] += table[(yn - ym + ws - 1) * (2 * ws - 1) + xn - xm + ws - 1]
                            apart = (region(wy + yn, h), region(wx + xn, w)) != (region(wy + ym, h), region(wx + xm, w))
                            logits[:, :, n, m] -= 100.0 if s and apart else 0.0
                    o = torch.einsum("bhnm,bmhd->bnhd", logits.softmax(-1), v).reshape(b, ws * ws, dim)
                    out[:, wy:wy + ws, wx:wx + ws] = lin(o, f"{p}.attn.proj").view(b, ws, ws, dim)
            t = t + torch.roll(out, (s, s), (1, 2))
            t = t + lin(F.gelu(lin(ln(t, f"{p}.norm2"), f"{p}.mlp.fc1")), f"{p}.mlp.fc2")
        t = resi(f"layers.{i}.conv", t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1) + start
    body = resi("conv_after_body", ln(t, "norm").permute(0, 3, 1, 2)) + first
    if c.upsampler == "pixelshuffle":
        t = F.leaky_relu(_conv(sd, "conv_before_upsample.0", body), 0.01)
        for k in sorted(int(key.split(".")[1]) for key in sd if re.match(r"upsample\.\d+\.weight$", key)):
            r = int((sd[f"upsample.{k}.weight"].shape[0] // t.shape[1]) ** 0.5)
            t = F.pixel_shuffle(_conv(sd, f"upsample.{k}", t), r)
        out = _conv(sd, "conv_last", t)
    elif c.upsampler == "pixelshuffledirect":
        out = F.pixel_shuffle(_conv(sd, "upsample.0", body), c.upscale)
    elif c.upsampler == "nearest+conv":
        t = F.leaky_relu(_conv(sd, "conv_before_upsample.0", body), 0.01)
        for k in range(1, c.upscale.bit_length()):
            t = F.leaky_relu(_conv(sd, f"conv_up{k}", F.interpolate(t, scale_factor=2, mode="nearest")), 0.2)
        out = _conv(sd, "conv_last", F.leaky_relu(_conv(sd, "conv_hr", t), 0.2))
    else:
        out = x + _conv(sd, "conv_last", body)
    return (out / c.img_range + mean)[..., : hh * c.upscale, : ww * c.upscale]


SWINIR_CASES = {
    "classical-x2": SwinIRConfig(embed_dim=12, depths=(2, 2), num_heads=(2, 3), window_size=4, upscale=2, num_feat=8),
    "classical-x4": SwinIRConfig(embed_dim=12, depths=(2,), num_heads=(3,), window_size=4, upscale=4, num_feat=8),
    "lightweight-x3": SwinIRConfig(embed_dim=12, depths=(2,), num_heads=(4,), window_size=4, upscale=3,
                                   upsampler="pixelshuffledirect"),
    "realsr-x4-3conv": SwinIRConfig(embed_dim=16, depths=(2,), num_heads=(2,), window_size=4, upscale=4,
                                    upsampler="nearest+conv", resi_connection="3conv", num_feat=8),
    "jpeg-gray": SwinIRConfig(in_chans=1, embed_dim=12, depths=(2,), num_heads=(2,), window_size=7, upscale=1,
                              upsampler="", img_range=255.0),
}


@pytest.mark.parametrize("case", list(SWINIR_CASES))
def test_swinir_loads_by_detection_and_computes_the_papers_net(case, tmp_path):
    config = SWINIR_CASES[case]
    torch.manual_seed(0)
    net = build(config).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    sd = net.state_dict()
    path = save(swinir_published(sd, config, 8 * config.window_size), tmp_path / f"{case}.pth", "params_ema")
    up = load_upscaler(path)
    assert up.config == config and up.architecture == "SwinIR" and up.scale == config.upscale
    x = torch.rand(1, config.in_chans, 9, 11)  # padded (reflect) to whole windows, cropped back
    with torch.no_grad():
        got, want = up.net(x), reference_swinir(sd, x, config)
    assert got.shape == (1, config.in_chans, 9 * config.upscale, 11 * config.upscale)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_full_size_swinir_has_the_model_zoos_keys_and_shapes():
    """001_classicalSR_DF2K_s64w8_SwinIR-M_x4.pth and 003_realSR_BSRGAN_DFOWMFC_s64w8_SwinIR-L_x4_GAN.pth."""
    medium = SwinIRConfig(embed_dim=180, depths=(6,) * 6, num_heads=(6,) * 6, upscale=4)
    large = SwinIRConfig(embed_dim=240, depths=(6,) * 9, num_heads=(8,) * 9, upscale=4, upsampler="nearest+conv",
                         resi_connection="3conv")
    with torch.device("meta"):
        m, g = build(medium).state_dict(), build(large).state_dict()
    assert m["layers.5.residual_group.blocks.5.attn.relative_position_bias_table"].shape == (225, 6)
    assert m["layers.0.residual_group.blocks.0.mlp.fc1.weight"].shape == (360, 180)
    assert m["conv_before_upsample.0.weight"].shape == (64, 180, 3, 3)
    assert m["upsample.0.weight"].shape == m["upsample.2.weight"].shape == (256, 64, 3, 3)
    assert {"patch_embed.norm.weight", "norm.bias", "conv_after_body.weight", "layers.5.conv.weight"} <= set(m)
    assert g["conv_after_body.0.weight"].shape == (60, 240, 3, 3) and g["layers.8.conv.4.weight"].shape[0] == 240
    assert {"conv_up1.weight", "conv_up2.weight", "conv_hr.weight", "conv_last.bias"} <= set(g)
    for sd, config in [(m, medium), (g, large)]:
        assert detect(swinir_published(sd, config, 64))[0] == config


# --- tiling ---------------------------------------------------------------------------------------------------------

def test_tiles_give_the_untiled_output_when_the_fade_margin_exceeds_the_receptive_field():
    """Three 3x3 convs see 3 pixels around each output; the tiles' outer quarter-overlap (4 pixels) is never used."""
    net = random_net(CompactConfig(num_feat=8, num_conv=1, upscale=2))
    x = torch.rand(1, 3, 50, 37)
    whole = upscale_tensor(net, x, 2, tile=0)
    tiled = upscale_tensor(net, x, 2, tile=20, overlap=16)
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-5)


def test_deep_net_tiles_are_exact_away_from_seams_and_blended_across_them():
    net = random_net(RRDBConfig(**TINY))  # a receptive field of ~20 input pixels
    x = torch.rand(1, 3, 30, 80)
    whole = upscale_tensor(net, x, 4, tile=0)
    tiled = upscale_tensor(net, x, 4, tile=48, overlap=16)  # column starts 0 and 32; one row
    torch.testing.assert_close(tiled[..., : 28 * 4], whole[..., : 28 * 4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tiled[..., 52 * 4:], whole[..., 52 * 4:], rtol=1e-5, atol=1e-5)
    seam = (tiled - whole)[..., 28 * 4: 52 * 4].abs()
    assert torch.isfinite(tiled).all() and seam.mean() < 0.1 * whole.abs().mean()


def test_tiles_run_in_another_dtype():
    net = random_net(CompactConfig(num_feat=8, num_conv=2, upscale=4))
    x = torch.rand(1, 3, 24, 20)
    want = upscale_tensor(net, x, 4, tile=0)
    got = upscale_tensor(net.to(torch.bfloat16), x, 4, tile=16, overlap=8)
    assert got.dtype == torch.float32 and (got - want).abs().max() < 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tiles_run_on_cuda_in_fp16():
    net = random_net(RRDBConfig(**TINY))
    x = torch.rand(1, 3, 40, 36)
    want = upscale_tensor(net, x, 4, tile=24, overlap=8)
    got = upscale_tensor(net.to("cuda", torch.float16), x, 4, tile=24, overlap=8)
    assert got.device.type == "cpu" and (got - want).abs().max() < 2e-2


def test_bad_overlap_is_refused():
    net = random_net(CompactConfig(num_feat=4, num_conv=1, upscale=2))
    with pytest.raises(ValueError, match="overlap"):
        upscale_tensor(net, torch.rand(1, 3, 8, 8), 2, tile=8, overlap=8)


# --- images, the folder, bad files ----------------------------------------------------------------------------------

@pytest.fixture()
def folder(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "upscalers"
    folder.mkdir()
    save(random_net(CompactConfig(num_feat=8, num_conv=1, upscale=2)).state_dict(), folder / "tiny-x2.pth",
         "params_ema")
    save(old_esrgan_layout(random_net(RRDBConfig(**TINY)).state_dict(), RRDBConfig(**TINY)),
         folder / "4x-tiny.safetensors")
    (folder / "notes.txt").write_text("not a model")
    monkeypatch.setenv("SDENGINE_UPSCALERS", str(folder))
    return folder


def test_folder_lookup_by_name_never_by_path(folder):
    assert list_upscalers() == ["4x-tiny", "tiny-x2"]
    assert [inspect_upscaler(resolve_upscaler(n)).scale for n in list_upscalers()] == [4, 2]
    assert resolve_upscaler("tiny-x2") == folder / "tiny-x2.pth"
    assert resolve_upscaler("4x-tiny.safetensors") == folder / "4x-tiny.safetensors"
    with pytest.raises(UpscalerError, match=f"no upscaler 'nope' in {re.escape(str(folder))}.*found: 4x-tiny"):
        resolve_upscaler("nope")
    for name in [str(folder / "tiny-x2.pth"), "../upscalers/tiny-x2", ".hidden", ""]:
        with pytest.raises(UpscalerError, match="not paths"):
            resolve_upscaler(name)


def test_a_scale_other_than_the_models_is_reached_as_a1111_does(folder):
    """A1111's Upscaler.upscale: sides int(w * scale) // 8 * 8; the model until it covers them; then Lanczos."""
    up = load_upscaler(folder / "tiny-x2.pth")
    image = Image.fromarray((torch.rand(21, 30, 3) * 255).byte().numpy())
    once = upscale_image(image, up, tile=0)
    assert once.size == (56, 40) == target_size(30, 21, 2)
    direct = upscale_tensor(up.net, torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float().div(255), 2,
                            tile=0)
    assert once.tobytes() == tensor_to_images(direct)[0].resize((56, 40), Image.LANCZOS).tobytes()
    assert upscale_image(image, up, scale=3, tile=8, overlap=4).size == (88, 56)  # two passes (x4), then down
    assert upscale_image(image, up, scale=1, tile=0).size == (24, 16)  # a scale of 1 still runs the model once


@pytest.mark.parametrize("what", ["sd-keys", "truncated", "code-pickle", "broken-shapes", "empty-compact"])
def test_bad_files_are_one_line_errors_naming_the_file(what, tmp_path):
    path = tmp_path / f"{what}.pth"
    if what == "sd-keys":
        save({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, path)
        match = "not a known upscaler architecture: expected ESRGAN"
    elif what == "truncated":
        path.write_bytes(b"PK\x03\x04garbage")
        match = "unreadable"
    elif what == "code-pickle":
        torch.save({"net": Path("x")}, path)  # an object the weights-only unpickler refuses
        match = "refused"
    elif what == "broken-shapes":
        sd = random_net(RRDBConfig(**TINY)).state_dict()
        sd["body.1.rdb2.conv3.weight"] = torch.zeros(4, 7, 3, 3)
        save(sd, path)
        match = "body.1.rdb2.conv3.weight"
    else:
        save({"body.0.weight": torch.zeros(8, 3, 3, 3), "body.1.weight": torch.zeros(8)}, path)
        match = "SRVGGNetCompact"
    with pytest.raises(UpscalerError, match=match) as e:
        load_upscaler(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


# --- the command line -----------------------------------------------------------------------------------------------

def test_upscale_command_end_to_end(folder, tmp_path):
    from sdengine.metadata import read_parameters, save_png

    image = Image.fromarray((torch.rand(20, 28, 3) * 255).byte().numpy())
    src, out = tmp_path / "in.png", tmp_path / "out.png"
    save_png(image, src, "a red circle\nSteps: 20, Seed: 1")
    proc = run_cli("upscale", src, "--upscaler", "4x-tiny", "--scale", "2", "--tile", "16", "--tile-overlap", "8",
                   "--precision", "fp32", "--out", out)  # the Python call below runs fp32; auto may pick bf16
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as result:
        result.load()
    want = upscale_image(image, load_upscaler(folder / "4x-tiny.safetensors"), 2, tile=16, overlap=8)
    assert result.size == (56, 40) and result.tobytes() == want.tobytes()
    assert read_parameters(out) == "a red circle\nSteps: 20, Seed: 1"
    assert_cli_error(run_cli("upscale", src, "--upscaler", "4x-tiny", "--out", out), "exists", "--force")
    assert_cli_error(run_cli("upscale", src, "--upscaler", "missing", "--out", tmp_path / "o2.png"),
                     "no upscaler 'missing'", str(folder))
    (folder / "bad.pth").write_bytes(b"\x80\x02}q\x00.")  # an empty pickled dict
    assert_cli_error(run_cli("upscale", src, "--upscaler", "bad", "--out", tmp_path / "o3.png"), "bad.pth")
    save({"foo.weight": torch.zeros(3)}, folder / "odd.safetensors")
    assert_cli_error(run_cli("upscale", src, "--upscaler", "odd", "--out", tmp_path / "o4.png"), "odd.safetensors",
                     "not a known upscaler architecture", "expected ESRGAN")
    assert_cli_error(run_cli("upscale", src, "--upscaler", "tiny-x2", "--tile", "8", "--tile-overlap", "8", "--out",
                             tmp_path / "o5.png"), "--tile-overlap")


# --- the hires fix --------------------------------------------------------------------------------------------------

def test_hires_fix_with_a_model_upscaler(sd1_folder, folder):
    import sdengine
    from sdengine.hires import HiresFix, upscale_pixels
    from sdengine.images import images_to_tensor
    from sdengine.pipeline import Pipeline, Request

    pipe = Pipeline(sdengine.load(sd1_folder))
    W, H = 24, 16
    req = Request(prompt="a red circle", steps=3, cfg_scale=5, seed=2, width=W, height=H,
                  hires=HiresFix(2, upscaler="tiny-x2", steps=2, denoising_strength=0.5))
    f = pipe.model.config.vae.downscale
    first = pipe.sample(req)
    pixels = pipe.decode(first)
    # by hand: 8-bit truncation as A1111 does, the model (its own x2 = the target here), Lanczos only if needed
    up = load_upscaler(folder / "tiny-x2.pth")
    image = tensor_to_images(pixels, rounding=False)[0]
    want = images_to_tensor([upscale_image(image, up, 2)])
    assert want.shape[-2:] == (2 * H, 2 * W)
    torch.testing.assert_close(upscale_pixels(pixels, req.hires, W, H, f), want)
    latents = pipe.second_pass(req, first)
    second = req.second_pass(f)
    expected = pipe.sample(second, init=want, first_pass_steps=req.steps)
    torch.testing.assert_close(latents, expected)
    assert "Hires upscaler: tiny-x2" in pipe.generate(**{k: getattr(req, k) for k in (
        "prompt", "steps", "cfg_scale", "seed", "width", "height", "hires")})[0].info["parameters"]

    in_folder = re.escape(str(folder))
    with pytest.raises(ValueError, match=f"unknown hires upscaler 'gone'.*no upscaler 'gone' in {in_folder}"):
        HiresFix(upscaler="gone")  # refused when the request is made, before any pass
    with pytest.raises(ValueError, match="not paths"):
        HiresFix(upscaler=str(folder / "tiny-x2.pth"))
    (folder / "tiny-x2.pth").rename(folder / "moved.pth")  # gone between the request and its second pass
    with pytest.raises(ValueError, match=f"hires upscaler: no upscaler 'tiny-x2' in {in_folder}"):
        pipe.second_pass(req, first)
