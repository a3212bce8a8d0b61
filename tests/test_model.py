"""Model parts: shapes, patches, audio windows, sampler, shipped weights."""
import math

import pytest
import torch

from engine.model.audio_encoder import AudioEncoder, audio_window
import torch.nn.functional as F

from engine.model.autoencoder import AEConfig, FrameAutoencoder, ResBlock, up_conv3x3, warp
from engine.model.avatar import DEFAULT_WEIGHTS, AvatarModel, load_model
from engine.model.dit import PRESETS, AvatarDiT
from engine.sampler import sample, timesteps

from dit_inputs import random_condition

CFG = PRESETS["ref-XS"]


def test_autoencoder_shapes():
    ae = FrameAutoencoder().eval()
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (2, 16, 8, 8)
    y = ae.decode(z, ae.reference(x[:1]))
    assert y.shape == (2, 3, 128, 128)


def test_warp_moves_pixels_by_the_flow():
    """A flow of k pixels (in normalised units 2k/size) samples the image k pixels over; zero flow is exact."""
    img = torch.rand(1, 3, 32, 32)
    assert torch.equal(warp(img, torch.zeros(1, 2, 32, 32)), img)
    flow = torch.zeros(1, 2, 32, 32)
    flow[:, 0] = 2 * 3 / 32  # x: sample 3 px to the right -> content moves 3 px left
    out = warp(img, flow)
    assert torch.allclose(out[..., :, :-3], img[..., :, 3:], atol=1e-5)
    assert not torch.allclose(out, img, atol=1e-2)


def test_upsampled_convs_run_at_the_low_resolution_exactly():
    """up_conv3x3 and ResBlock.forward_up (the decoder's up path) equal the plain forms on an upsampled
    map: every parity of every pixel, the borders, both kinds of skip, non-square sizes."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 5, 6, 9, generator=g), torch.randn(7, 5, 3, 3, generator=g)
    up = F.interpolate(x, scale_factor=2, mode="nearest")
    assert torch.allclose(up_conv3x3(x, w), F.conv2d(up, w, padding=1), atol=1e-5)
    assert not torch.allclose(up_conv3x3(x, w.flip(2)), F.conv2d(up, w, padding=1), atol=1e-2)  # it can fail
    for c_low, c_rest, c_out in [(8, 8, 16), (8, 8, 8), (16, 6, 8)]:  # a 1x1 skip; an identity skip
        blk = ResBlock(c_low + c_rest, c_out).eval()
        with torch.no_grad():
            for p in blk.parameters():
                p.normal_(0, 0.3, generator=g)
            low, rest = torch.randn(3, c_low, 5, 4, generator=g), torch.randn(3, c_rest, 10, 8, generator=g)
            plain = blk(torch.cat([F.interpolate(low, scale_factor=2, mode="nearest"), rest], 1))
            assert torch.allclose(blk.forward_up(low, rest), plain, atol=1e-5), (c_low, c_rest, c_out)


def test_flow_decoder_starts_as_the_plain_decoder():
    """The flow heads start at zero: a decoder trained without flow loads into a flow decoder (new keys
    only) and decodes bit-identically until the flow is trained; a non-zero flow moves the output."""
    torch.manual_seed(0)
    plain = FrameAutoencoder(AEConfig()).eval()
    with torch.no_grad():
        plain.decoder.head.weight.normal_(0, 0.05)  # a decoder that draws something besides the reference
    flow = FrameAutoencoder(AEConfig(flow=True)).eval()
    missing, unexpected = flow.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("decoder.flow.") for k in missing)
    x = torch.rand(3, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        z = plain.encode(x)
        a = plain.decode(z, plain.reference(x[:1]))
        assert torch.equal(a, flow.decode(z, flow.reference(x[:1])))
        flow.decoder.flow[0].bias.fill_(0.1)
        assert (flow.decode(z, flow.reference(x[:1])) - a).abs().mean() > 1e-3


def test_fine_stage_starts_at_zero_and_then_corrects_the_picture():
    """The 128-px refinement stage (AEConfig.fine) loads a decoder without it (its keys only missing) and
    decodes bit-identically until trained; a trained correction changes the output."""
    torch.manual_seed(0)
    base = FrameAutoencoder(AEConfig(flow=True)).eval()
    with torch.no_grad():
        base.decoder.head.weight.normal_(0, 0.05)
        base.decoder.flow[0].bias.fill_(0.02)
    fine = FrameAutoencoder(AEConfig(flow=True, fine=16)).eval()
    missing, unexpected = fine.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("decoder.fine") for k in missing)
    x = torch.rand(3, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        z = base.encode(x)
        a = base.decode(z, base.reference(x[:1]))
        assert torch.equal(a, fine.decode(z, fine.reference(x[:1])))
        fine.decoder.fine_out.bias.fill_(0.05)  # a flow and a delta correction
        assert (fine.decode(z, fine.reference(x[:1])) - a).abs().mean() > 1e-3


def test_windowed_fine_stage_changes_only_its_window_and_fades_in():
    """AEConfig.fine_window: the 128-px stage corrects only its window (the frame outside it is the plain
    decoder's, bit for bit), and the correction fades in from the window's edge (no seam)."""
    torch.manual_seed(0)
    base = FrameAutoencoder(AEConfig(flow=True)).eval()
    with torch.no_grad():
        base.decoder.head.weight.normal_(0, 0.05)
        base.decoder.flow[0].bias.fill_(0.02)
    win = (24, 96, 28, 100)
    fine = FrameAutoencoder(AEConfig(flow=True, fine=16, fine_window=win)).eval()
    fine.load_state_dict(base.state_dict(), strict=False)
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        z = base.encode(x)
        a = base.decode(z, base.reference(x[:1]))
        assert torch.allclose(a, fine.decode(z, fine.reference(x[:1])), atol=1e-6)  # zero at the start
        fine.decoder.fine_out.bias[2:].fill_(0.05)  # a delta correction only: the change is the taper
        b = fine.decode(z, fine.reference(x[:1]))
    inside = torch.zeros(128, 128, dtype=torch.bool)
    inside[win[0]:win[1], win[2]:win[3]] = True
    change = (b - a).abs().amax((0, 1))
    assert torch.equal(b[..., ~inside], a[..., ~inside])
    assert torch.allclose(change[60, 64], torch.tensor(0.05), atol=1e-4)  # full strength inside
    assert change[win[0], 64] < 0.01 and change[64, win[3] - 1] < 0.01  # barely any at the edge
    with pytest.raises(ValueError, match="fine_window"):
        FrameAutoencoder(AEConfig(flow=True, fine=16, fine_window=(24, 97, 28, 100)))


def test_deeper_fine_stage_loads_a_shallower_decoder_and_starts_where_it_was():
    """AEConfig.fine_blocks: blocks added to a trained 128-px stage are missing keys only and change no frame
    until trained; a trained block changes the window, and only the window."""
    torch.manual_seed(0)
    win = (24, 96, 28, 100)
    base = FrameAutoencoder(AEConfig(flow=True, fine=16, fine_window=win)).eval()
    with torch.no_grad():
        base.decoder.head.weight.normal_(0, 0.05)
        base.decoder.fine_out.weight.normal_(0, 0.05)
    deep = FrameAutoencoder(AEConfig(flow=True, fine=16, fine_window=win, fine_blocks=2)).eval()
    missing, unexpected = deep.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("decoder.fine_blocks.") for k in missing)
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        z = base.encode(x)
        a = base.decode(z, base.reference(x[:1]))
        assert torch.equal(a, deep.decode(z, deep.reference(x[:1])))
        deep.decoder.fine_blocks[1].conv2.weight.normal_(0, 0.05)
        b = deep.decode(z, deep.reference(x[:1]))
    inside = torch.zeros(128, 128, dtype=torch.bool)
    inside[win[0]:win[1], win[2]:win[3]] = True
    assert (b - a)[..., inside].abs().mean() > 1e-3
    assert torch.equal(b[..., ~inside], a[..., ~inside])
    with pytest.raises(ValueError, match="fine_blocks"):
        FrameAutoencoder(AEConfig(flow=True, fine_blocks=2))


def test_image_warp_bicubic_resamples_the_reference_and_keeps_it_where_the_flow_is_zero():
    """AEConfig.image_warp: a bicubic warp of the reference image returns it unchanged where the flow is zero (the
    same frame as bilinear) and draws it differently at a sub-pixel shift; anything else is refused."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    outs = {}
    for mode in ("bilinear", "bicubic"):
        torch.manual_seed(1)
        ae = FrameAutoencoder(AEConfig(flow=True, image_warp=mode)).eval()
        with torch.no_grad():
            z = ae.encode(x)
            zero = ae.decode(z, ae.reference(x[:1]))
            ae.decoder.flow[0].bias.fill_(0.5 / 64)  # a quarter-pixel shift at 128 px
            outs[mode] = zero, ae.decode(z, ae.reference(x[:1]))
    assert torch.allclose(outs["bilinear"][0], outs["bicubic"][0], atol=1e-5)
    assert (outs["bilinear"][1] - outs["bicubic"][1]).abs().mean() > 1e-3
    with pytest.raises(ValueError, match="image_warp"):
        FrameAutoencoder(AEConfig(flow=True, image_warp="nearest"))


def test_dit_shapes_and_patches():
    dit = AvatarDiT(CFG).eval()
    x = torch.randn(2, CFG.frames, CFG.latent_channels, CFG.latent_size, CFG.latent_size)
    assert torch.equal(dit.unpatchify(dit.patchify(x), CFG.frames), x)
    v = dit(x, torch.rand(2), random_condition(dit, 2))
    assert v.shape == x.shape


def test_audio_bias_is_local():
    dit = AvatarDiT(CFG)
    bias = dit.audio_bias()
    n_tok, n_aud = CFG.frames * CFG.tokens_per_frame, CFG.audio_frames * 2
    assert bias.shape == (n_tok, n_aud)
    assert torch.isfinite(bias).any(1).all()  # every token sees some audio
    # the first frame's tokens see no audio from after frame 0 + attend[1]
    last_seen = CFG.lookback + CFG.attend[1]
    assert torch.isinf(bias[0, 2 * (last_seen + 1):]).all()


def test_audio_window_and_encoder():
    audio = torch.arange(16000, dtype=torch.float32)
    w = audio_window(audio, -2, 4, margin=0)
    assert w.shape == (4 * 640,) and (w[:1280] == 0).all() and torch.equal(w[1280:], audio[:1280])
    enc = AudioEncoder()
    frames = 10
    tokens = enc(torch.randn(1, (frames + 2) * 640))
    assert tokens.shape == (1, frames * 2, 128)
    assert enc.frame_openness(tokens).shape == (1, frames)


def test_audio_features_window_normalised_half_ignores_gain():
    """The window-normalised half of the encoder's input cancels a microphone's gain; the fixed half keeps
    loudness (so silence and speech stay apart)."""
    enc = AudioEncoder()
    g = torch.Generator().manual_seed(0)
    speech = torch.randn(1, 12 * 640, generator=g) * torch.linspace(0.05, 0.5, 12 * 640)
    a, b = enc.features(speech), enc.features(4 * speech)
    assert a.shape == (1, 160, 48)
    # 4x the amplitude is a shift of log(16) / 4 = 0.69 on the fixed scale; the window-normalised half
    # removes it (up to the log's 1e-5 floor in the quietest bins)
    assert abs((b[:, :80] - a[:, :80]).mean() - 0.69) < 0.02
    assert (b[:, 80:] - a[:, 80:]).abs().max() < 0.1


def test_sampler_integrates_velocity():
    ts = timesteps(20)
    assert ts[0] == 1 and ts[-1] == 0 and len(ts) == 21 and (ts[1:] < ts[:-1]).all()

    class Const(torch.nn.Module):  # v = noise - x0 with x0 = 0, noise = x: straight path to zero
        def forward(self, x, t, cond):
            return x / t.clamp_min(1e-6)[:, None, None, None, None]
    noise = torch.randn(1, 4, 16, 8, 8)
    timer = {}
    out = sample(Const(), None, noise, steps=10, timer=timer)
    assert out.abs().max() < 1e-4 and timer["dit_ms"] > 0


def test_shipped_weights_load_and_fit_budget():
    size = sum(p.stat().st_size for p in DEFAULT_WEIGHTS.parent.glob("*.safetensors"))
    assert size <= 60 * 2 ** 20
    model = load_model()
    assert isinstance(model, AvatarModel)
    n = sum(p.numel() for p in model.parameters())
    assert n > 1e6
    assert model.cfg.frames >= 1 and math.isfinite(float(model.dit.final_layer.linear.weight.detach().abs().sum()))


def test_a_narrower_decoder_draws_the_same_latents_and_a_decoder_file_loads_only_for_them(tmp_path):
    """AEConfig.decoder_widths: the decoder's own widths, the reference features it fuses as wide as the
    encoders'. save_decoder writes the decoding side alone; load_decoder shares the model's encoder and
    refuses a file made for other latents (other statistics or encoder widths)."""
    from engine.model.avatar import AvatarModel, load_decoder, save_decoder
    from engine.model.dit import PRESETS
    model = AvatarModel(PRESETS["ref-XS"], AEConfig(flow=True, fine=8, fine_window=(24, 96, 28, 100))).eval()
    lite = FrameAutoencoder(AEConfig(flow=True, fine=8, fine_window=(24, 96, 28, 100),
                                     decoder_widths=(16, 16, 32, 64, 128))).eval()
    lite.latent_mean.copy_(model.ae.latent_mean)
    torch.nn.init.normal_(lite.decoder.head.weight, std=0.02)  # not the reference copy a new decoder starts as
    save_decoder(lite, tmp_path / "lite.safetensors")
    loaded = load_decoder(tmp_path / "lite.safetensors", model)
    assert loaded.encoder is model.ae.encoder
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        z = model.ae.encode(x)
        y = loaded.decode(z, loaded.reference(x[:1]))
        want = lite.decode(z, lite.reference(x[:1]))
    assert y.shape == (2, 3, 128, 128) and torch.allclose(y, want, atol=1e-2)  # fp16 storage
    assert sum(p.numel() for p in lite.decoder.parameters()) < sum(p.numel() for p in model.ae.decoder.parameters())
    other = AvatarModel(PRESETS["ref-XS"], AEConfig(flow=True)).eval()
    other.ae.latent_mean.fill_(0.5)
    with pytest.raises(ValueError, match="other latents"):
        load_decoder(tmp_path / "lite.safetensors", other)
    wide = AvatarModel(PRESETS["ref-XS"], AEConfig(flow=True, widths=(16, 32, 64, 128, 256))).eval()
    with pytest.raises(ValueError, match="decodes other latents"):
        load_decoder(tmp_path / "lite.safetensors", wide)
    with pytest.raises(FileNotFoundError):
        load_decoder(tmp_path / "none.safetensors", model)
    with pytest.raises(ValueError, match="one width per scale"):
        FrameAutoencoder(AEConfig(flow=True, decoder_widths=(16, 16, 32, 64)))
